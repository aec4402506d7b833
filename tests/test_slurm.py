"""Under a real Slurm (a one-node cluster of Debian's slurm-wlm, started by tests/slurm/cluster.sh
and stopped at the end): ``srun -n 3`` places the main job's tasks, each reads its place from
Slurm's own environment, and the training converges as under ``distsrv demo``."""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

CLUSTER = pathlib.Path(__file__).parent / "slurm" / "cluster.sh"


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("srun") is None:
        why = "needs root and Slurm (`make test` installs it as root: tests/slurm/cluster.sh)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests: {why}")
        pytest.skip(why)
    subprocess.run([CLUSTER, "start"], check=True, timeout=90)
    try:
        yield
    finally:
        subprocess.run([CLUSTER, "stop"], check=False, timeout=30)


def consecutive_free_ports(count: int) -> int:
    """A first port of ``count`` consecutive ports free on 127.0.0.1 (Slurm's tasks on one node
    listen on consecutive ports)."""
    for _ in range(200):
        first = random.randrange(20000, 60000 - count)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise AssertionError("no consecutive free ports")


def environment() -> dict[str, str]:
    """This process's environment without a cluster of its own: the tasks must take Slurm's."""
    return {
        **{
            name: value
            for name, value in os.environ.items()
            if name != "TF_CONFIG" and not name.startswith(("DISTSRV_", "SLURM_"))
        },
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }


def test_srun_places_the_main_job_and_it_converges(slurm: None) -> None:
    command = [sys.executable, "-m", "distsrv", "demo-worker", "--epochs=8"]
    command.append(f"--slurm-port={consecutive_free_ports(3)}")
    result = subprocess.run(
        ["srun", "--ntasks=3", "--overcommit", "--label", "--kill-on-bad-exit=1", *command],
        capture_output=True,
        text=True,
        timeout=110,
        env=environment(),
        stdin=subprocess.DEVNULL,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # Each task found its place in Slurm's environment, on the one node, on consecutive ports.
    served = re.findall(r"^(\d): serving (\S+) at (\S+) .*cluster from Slurm\)$", out, re.M)
    assert sorted(label for label, _, _ in served) == ["0", "1", "2"], out
    assert {task for _, task, _ in served} == {f"/job:worker/task:{i}" for i in range(3)}
    ports = sorted(int(address.rpartition(":")[2]) for _, _, address in served)
    assert all(address.startswith("grpc://localhost:") for _, _, address in served), out
    assert ports == list(range(ports[0], ports[0] + 3))
    distributed = re.search(r"^0: test accuracy ([\d.]+)%", out, re.M)
    single = re.search(r"^0: single process.*?test accuracy ([\d.]+)%", out, re.M)
    assert distributed is not None, out
    assert single is not None, out
    assert float(distributed[1]) >= 93.0, out
    assert abs(float(distributed[1]) - float(single[1])) <= 1.0, out
