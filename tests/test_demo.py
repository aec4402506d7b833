"""The main job (`distsrv demo`) and the local launcher under it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from distsrv.launch import run_local_cluster


def test_the_demo_cluster_finds_itself_and_sums_a_ring() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "distsrv", "demo", "--workers", "3", "--timeout", "90"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for index in range(3):
        lines = [
            line for line in result.stdout.splitlines() if line.startswith(f"[worker:{index}]")
        ]
        assert any("cluster of 3 tasks up" in line for line in lines), lines
        assert any("ring sum of 1 MiB = 6 (expected 6): ok" in line for line in lines), lines


def test_one_failing_task_stops_the_others_and_is_named(capsys) -> None:
    script = textwrap.dedent(
        """
        import json, os, sys, time
        task = json.loads(os.environ["TF_CONFIG"])["task"]
        print("started", task["index"], flush=True)
        if task["index"] == 1:
            sys.exit(3)
        time.sleep(60)
        """
    )
    began = time.monotonic()
    status = run_local_cluster({"worker": 3}, [sys.executable, "-c", script], timeout=60)
    assert status == 1
    assert time.monotonic() - began < 20, "the other tasks were not stopped"
    assert "/job:worker/task:1 exited with status 3" in capsys.readouterr().err
