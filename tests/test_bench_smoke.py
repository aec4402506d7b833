"""The benchmarks still run end to end (CI builds benchmarks but does not time them)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

BENCHES = pathlib.Path(__file__).resolve().parent.parent / "benches"
BENCH = BENCHES / "bench_exchange.py"


def test_quick_benchmark_runs_and_prints_ratios() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--allow-debug", "--peers", "distsrv", "tcp"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.lstrip().startswith(("4 KiB", "1 MiB"))]
    assert {(row[0], row[1], row[2]) for row in rows} >= {
        ("4", "KiB", "distsrv"),
        ("1", "MiB", "raw"),
    }
    # Each peer row carries a median; each raw TCP row the ratio distsrv achieved against it.
    assert all(row[-1].endswith("x") for row in rows if row[2] == "raw"), result.stdout


def test_rounds_pool_each_peers_samples_and_keep_a_skipped_peer_skipped() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_exchange", BENCH)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rounds = [
        {"distsrv": {4096: [1.0, 2.0], "receiver_peak_extra": {"4096": 5}}, "gloo": "skipped"},
        {"distsrv": {4096: [3.0], "receiver_peak_extra": {"4096": 7}}, "gloo": "skipped"},
    ]
    assert bench.pooled(rounds) == {
        "distsrv": {4096: [1.0, 2.0, 3.0], "receiver_peak_extra": {"4096": 7}},
        "gloo": "skipped",
    }


def test_a_short_soak_keeps_descriptors_and_memory_flat() -> None:
    # `make soak` runs it for minutes; the soak itself fails past its slack.
    result = subprocess.run(
        [sys.executable, str(BENCHES / "soak.py"), "--seconds", "12"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reports = [line for line in result.stdout.splitlines() if "descriptors" in line]
    assert len(reports) == 3, result.stdout


def test_the_benchmark_refuses_a_debug_build_by_default() -> None:
    import distsrv._native

    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=60
    )
    if distsrv._native.BUILD_PROFILE == "release":
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert "debug build" in result.stderr


def test_quick_collectives_benchmark_runs_every_case() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHES / "bench_collectives.py"),
            "--quick",
            "--allow-debug",
            "--peers",
            "distsrv",
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.lstrip().startswith("2 ")]
    cases = {" ".join(row[1:-3]) for row in rows}
    assert cases == {
        "all_reduce 4 KiB distsrv",
        "all_reduce 1 MiB distsrv",
        "all_reduce 1 float distsrv",
        "barrier distsrv",
        "matmul alone distsrv",
        "matmul, all_reduce distsrv",
        "matmul || all_reduce distsrv",
    }, result.stdout


def test_quick_handlers_benchmark_runs_and_prints_ratios() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHES / "bench_handlers.py"),
            "--quick",
            "--allow-debug",
            "--peers",
            "distsrv",
            "grpcio",
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[3:]}
    assert set(rows) == {"distsrv", "Python"}, result.stdout
    # Each row: p50 and p99 in µs, calls/s from 1 and 8 threads; grpcio's ends with the ratios.
    assert rows["distsrv"][1].endswith("µs")
    assert rows["Python"][-1].endswith("x"), result.stdout


def test_quick_collectives_benchmark_runs_torch_on_distsrv_beside_gloo() -> None:
    pytest.importorskip("torch", reason="`make develop` installs torch (the torch extra)")
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHES / "bench_collectives.py"),
            *("--quick", "--allow-debug", "--peers", "distsrv-torch", "gloo"),
        ],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stderr
    peers = re.findall(r"^\s+2\s+all_reduce 4 KiB\s+(.+?)\s+\d+µs", result.stdout, re.MULTILINE)
    assert sorted(peers) == ["torch gloo", "torch on distsrv"], result.stdout


def test_quick_ddp_benchmark_times_distsrv_gloo_and_one_process() -> None:
    pytest.importorskip("torch", reason="`make develop` installs torch (the torch extra)")
    result = subprocess.run(
        [sys.executable, str(BENCHES / "bench_ddp.py"), "--quick", "--allow-debug"],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stderr
    runs = re.findall(r"^\s+2  (.+?)\s+([\d.]+)\s+([\d.]+)x$", result.stdout, re.MULTILINE)
    assert [run for run, _, _ in runs] == ["DDP over distsrv", "DDP over gloo", "one process"]
    assert all(float(ms) > 0 for _, ms, _ in runs), result.stdout
