"""``distsrv launch`` and ``distsrv.launch.launch``: one process per task of a local cluster,
its cluster in TF_CONFIG, output prefixed, the first failure named and the rest stopped,
restarts on the same address, signals passed on to every task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import read_line

from distsrv.launch import launch, parse_jobs

TIMEOUT = 60
LAUNCH = [sys.executable, "-m", "distsrv", "launch"]


def environment(**variables: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("TF_CONFIG", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        and not name.startswith("DISTSRV_")
    }
    return {**env, **variables}


def run(*options: str, script: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAUNCH, *options, "--", sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=environment(**variables),
        stdin=subprocess.DEVNULL,
    )


def test_every_task_gets_its_cluster_and_prefixed_output() -> None:
    result = run(
        "--jobs",
        "worker=2,ps=1",
        script="""
        import json, os
        config = json.loads(os.environ["TF_CONFIG"])
        print(json.dumps(config), os.environ["DISTSRV_TASK"], os.environ["OMP_NUM_THREADS"])
        """,
    )
    assert result.returncode == 0, result.stderr
    lines = {}
    for line in result.stdout.splitlines():
        prefix, printed = line.split(" ", 1)
        config, task, threads = printed.rsplit(" ", 2)
        lines[prefix] = (json.loads(config), task, threads)
    assert set(lines) == {"[worker:0]", "[worker:1]", "[ps:0]"}
    config, task, threads = lines["[worker:1]"]
    assert config["task"] == {"type": "worker", "index": 1}
    assert task == "/job:worker/task:1"
    # Two cores, or what this process may use, shared among three tasks: one thread each.
    assert threads == str(max(1, len(os.sched_getaffinity(0)) // 3))
    addresses = [*config["cluster"]["worker"], *config["cluster"]["ps"]]
    assert len(set(addresses)) == 3
    assert all(address.startswith("127.0.0.1:") for address in addresses)
    assert all(lines[prefix][0]["cluster"] == config["cluster"] for prefix in lines)
    assert "3 tasks on 127.0.0.1" in result.stderr


def test_the_tasks_form_a_working_cluster() -> None:
    result = run(
        "--jobs",
        "worker=3",
        script="""
        import distsrv, numpy as np
        spec, job, index = distsrv.ClusterSpec.from_tf_config()
        with distsrv.Server(spec, job, index) as server:
            total = server.all_reduce(np.array([server.task_index + 1.0]), timeout=30)
            print("sum", float(total[0]))
            server.barrier(timeout=30)
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("sum 6.0") == 3, result.stdout


def test_one_failing_task_stops_the_others_and_is_named(capsys: pytest.CaptureFixture[str]) -> None:
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
    status = launch([sys.executable, "-c", script], {"worker": 3}, timeout=60)
    assert status == 1
    assert time.monotonic() - began < 20, "the other tasks were not stopped"
    assert "/job:worker/task:1 exited with status 3" in capsys.readouterr().err


def test_a_failed_task_restarts_on_its_address_while_restarts_remain(tmp_path: Path) -> None:
    script = """
        import json, os, sys
        config = json.loads(os.environ["TF_CONFIG"])
        task = config["task"]
        me = config["cluster"]["worker"][task["index"]]
        restart = int(os.environ["DISTSRV_RESTART"])
        print("at", me, "restart", restart)
        if task["index"] == 1 and restart < 2:
            sys.exit(5)
        """
    result = run(
        "--jobs", "worker=2", "--max-restarts", "2", "--log-dir", str(tmp_path), script=script
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/job:worker/task:1 exited with status 5; restarting it (2 of 2)" in result.stderr
    runs = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("[worker:1]")]
    assert len(runs) == 3, result.stdout
    assert len(set(runs)) == 1, result.stdout  # one address for all three runs
    log = (tmp_path / "worker-1.log").read_text()
    assert [line.split()[-1] for line in log.splitlines()] == ["0", "1", "2"]
    # With no restarts left, the failure ends the run.
    result = run("--jobs", "worker=2", "--max-restarts", "1", script=script)
    assert result.returncode == 1
    assert "/job:worker/task:1 exited with status 5; stopped the other tasks" in result.stderr


def test_sigterm_reaches_every_task_and_the_launcher_exits_after_them() -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        def stop(signum, frame):
            print("stopping on", signal.Signals(signum).name, flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    launcher = subprocess.Popen(
        [*LAUNCH, "--jobs", "worker=2", "--", sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=environment(),
    )
    try:
        assert read_line(launcher, TIMEOUT).endswith("ready")
        assert read_line(launcher, TIMEOUT).endswith("ready")
        launcher.send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=TIMEOUT)
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, stderr
    assert sorted(line.split()[0] for line in stdout.splitlines()) == ["[worker:0]", "[worker:1]"]
    assert stdout.count("stopping on SIGTERM") == 2
    assert "SIGTERM: stopping every task" in stderr


def test_a_task_that_ignores_the_signal_is_killed_after_the_grace(
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    began = time.monotonic()
    status = launch([sys.executable, "-c", script], {"worker": 1}, timeout=1, grace=1)
    assert status == 1
    assert time.monotonic() - began < 15
    assert "did not finish within 1s" in capsys.readouterr().err


def test_temporary_security_and_thread_counts_reach_the_tasks() -> None:
    script = """
        import os
        print(bool(os.environ.get("DISTSRV_TOKEN")), os.environ["OPENBLAS_NUM_THREADS"])
        """
    result = run(
        "--jobs", "worker=1", "--security", "temporary", "--threads-per-task", "2", script=script
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[worker:0]", "True", "2"]
    # A count the environment sets is kept.
    result = run("--jobs", "worker=1", script=script, OPENBLAS_NUM_THREADS="3")
    assert result.stdout.split() == ["[worker:0]", "False", "3"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--jobs", "worker", "--", "true"], "--jobs: 'worker' is not JOB=COUNT"),
        (["--jobs", "worker=0", "--", "true"], "at least 1"),
        (["--jobs", "worker=1,worker=2", "--", "true"], "given twice"),
        (["--jobs", "worker=1", "--max-restarts", "-1", "--", "true"], "--max-restarts"),
        (["--jobs", "worker=1", "--"], "needs a command"),
    ],
)
def test_bad_options_are_one_line_and_status_2(options: list[str], message: str) -> None:
    result = subprocess.run(
        [*LAUNCH, *options], capture_output=True, text=True, timeout=TIMEOUT, env=environment()
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith("usage: distsrv launch")


def test_parse_jobs_keeps_the_order_given() -> None:
    assert list(parse_jobs("worker=4, ps=1")) == ["worker", "ps"]
    assert parse_jobs("chief=1") == {"chief": 1}
