"""distsrv as a torch.distributed backend (python/distsrv/torch.py): torch's collectives against
their expected values on 2 and 3 processes, DDP training matching gloo's, a timeout as torch's
error. Each rank is a process running tests/torch_ranks.py."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from distsrv.launch import free_ports

torch = pytest.importorskip(
    "torch", reason="torch is installed by `make develop` (the torch extra)"
)

RANKS = pathlib.Path(__file__).with_name("torch_ranks.py")


def run_ranks(
    scenario: str,
    backend: str,
    world: int,
    *,
    env_init: bool = False,
    output: str = "",
    finishing: int | None = None,
    rank_env: dict[str, str] | None = None,
) -> list[str]:
    """Runs ``world`` ranks of ``scenario``, the first ``finishing`` (all by default) to their
    end, then kills the rest; the output of those that finished. ``rank_env``'s variables are
    set to their value followed by the rank."""
    port = free_ports(1)[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if env_init:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        init_method = "env://"
    else:
        init_method = f"tcp://127.0.0.1:{port}"
    processes = [
        subprocess.Popen(
            [sys.executable, str(RANKS), scenario, backend, str(rank), str(world), init_method]
            + ([f"{output}.{rank}"] if output else []),
            env={**env, **{name: f"{value}{rank}" for name, value in (rank_env or {}).items()}},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for rank, process in enumerate(processes[:finishing]):
            out, _ = process.communicate(timeout=90)
            assert process.returncode == 0, f"rank {rank} of {scenario} failed:\n{out}"
            assert f"ok {scenario}" in out, out
            outputs.append(out)
    finally:
        for process in processes:
            process.kill()
            process.communicate()
    return outputs


@pytest.mark.parametrize("world", [2, 3])
def test_torch_collectives_give_their_expected_values(world: int) -> None:
    run_ranks("collectives", "distsrv", world, env_init=world == 2)


def test_ddp_over_distsrv_trains_as_over_gloo(tmp_path: pathlib.Path) -> None:
    run_ranks("ddp", "distsrv", 2, output=str(tmp_path / "distsrv"))
    run_ranks("ddp", "gloo", 2, output=str(tmp_path / "gloo"))
    ours = [torch.load(tmp_path / f"distsrv.{rank}") for rank in range(2)]
    gloo = [torch.load(tmp_path / f"gloo.{rank}") for rank in range(2)]
    for name, value in ours[0].items():
        torch.testing.assert_close(ours[1][name], value, rtol=0, atol=0)  # replicas agree
        torch.testing.assert_close(value, gloo[0][name], rtol=1e-12, atol=1e-12)
    untrained = torch.nn.Linear(4 * 6 * 6, 10)
    assert ours[0]["3.weight"].shape == untrained.weight.shape


def test_a_collective_past_the_group_timeout_is_torch_s_backend_error() -> None:
    run_ranks("timeout", "distsrv", 2)


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_rank_fails_the_others_within_peer_timeout(how: str) -> None:
    """pg_options=distsrv.ServerConfig(peer_timeout=1.0): a rank that dies, or stops answering,
    fails the others' next all_reduce with DistBackendError (UnavailableError) in seconds."""
    run_ranks(how, "distsrv", 3, finishing=2)


def test_ranks_with_different_tokens_cannot_form_a_group() -> None:
    run_ranks("wrong-token", "distsrv", 2, rank_env={"DISTSRV_TOKEN": "secret-of-rank-"})


def test_ranks_with_one_token_form_a_secured_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTSRV_TOKEN", "the-cluster-s-token")
    run_ranks("collectives", "distsrv", 2, env_init=True)
