"""The main job (`distsrv demo`: data-parallel training on a local cluster, run by the launcher
of tests/test_launch.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest


def demo(*options: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distsrv", "demo", "--timeout", "60", *options],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def accuracies(stdout: str) -> tuple[float, float]:
    """Worker 0's distributed and single-process test accuracies, in percent."""
    distributed = re.search(r"\[worker:0\] test accuracy ([\d.]+)%", stdout)
    single = re.search(r"\[worker:0\] single process.*?test accuracy ([\d.]+)%", stdout)
    assert distributed is not None, stdout
    assert single is not None, stdout
    return float(distributed[1]), float(single[1])


def pids(stdout: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"serving \S+ at \S+ \(pid (\d+)[,)]", stdout)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_all_reduce_training_matches_the_single_process_run() -> None:
    result = demo("--workers", "3", "--epochs", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # Worker 0 alone shows progress, one line per epoch.
    progress = [line for line in out.splitlines() if " epoch " in line]
    assert len(progress) == 8, out
    assert all(line.startswith("[worker:0] epoch ") for line in progress), out
    distributed, single = accuracies(out)
    assert distributed >= 93.0, out
    # The same global batches, the same mean gradients: only the order of float additions differs.
    assert abs(distributed - single) <= 1.0, out
    assert re.search(r"[\d,]+ samples/s, exchanged [\d.]+ MiB", out), out
    # Every worker took the same steps, so every one ends with the same model.
    finals = re.findall(r"\[worker:\d\] (?:done: )?test accuracy ([\d.]+)%", out)
    assert len(finals) == 3
    assert len(set(finals)) == 1, out


def test_torch_ddp_over_distsrv_matches_gloo_and_one_process() -> None:
    pytest.importorskip("torch", reason="`make develop` installs torch (the torch extra)")
    result = demo("--framework", "torch", "--workers", "2", "--epochs", "3", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    runs = dict(re.findall(r"\[worker:0\] (.+?): +test accuracy ([\d.]+)%, [\d.]+ ms/step", out))
    assert set(runs) == {"DDP over distsrv", "DDP over gloo", "one process"}, out
    accuracy = {name: float(value) for name, value in runs.items()}
    assert accuracy["DDP over distsrv"] >= 85.0, out
    # The same global batches and mean gradients: only the order of float additions differs.
    assert abs(accuracy["DDP over distsrv"] - accuracy["DDP over gloo"]) <= 1.0, out
    assert abs(accuracy["DDP over distsrv"] - accuracy["one process"]) <= 1.0, out
    assert re.search(r"distsrv step time [\d.]+x gloo's", out), out
    assert "[worker:1] done: test accuracy" in out, out


def test_torch_demo_refuses_the_numpy_model_s_options() -> None:
    result = demo("--framework", "torch", "--ps")
    assert result.returncode == 2
    assert "--ps and --crash-worker are for the numpy model" in result.stderr


def test_parameter_server_training_matches_the_single_process_run() -> None:
    result = demo("--ps", "--workers", "2", "--epochs", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[ps:0] hosting 4 variables" in out, out
    assert "[ps:0] the workers are done" in out, out
    assert "2 workers (parameter server)" in out, out
    distributed, single = accuracies(out)
    assert distributed >= 90.0, out
    assert abs(distributed - single) <= 1.0, out


@pytest.mark.parametrize("mode", [(), ("--ps",)], ids=["all-reduce", "ps"])
def test_a_crashing_worker_stops_the_run_naming_it_and_leaves_no_process(
    mode: tuple[str, ...],
) -> None:
    began = time.monotonic()
    result = demo(*mode, "--workers", "3", "--epochs", "50", "--crash-worker", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - began < 45, "the other tasks did not stop"
    assert "[worker:1] crashing on purpose" in result.stdout
    assert "/job:worker/task:1 exited with status 3" in result.stderr, result.stderr
    started = pids(result.stdout)
    assert len(started) == 3 + len(mode), result.stdout
    assert not [pid for pid in started if alive(pid)]
