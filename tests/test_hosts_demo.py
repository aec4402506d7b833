"""The main job (`distsrv demo`'s workers) across three namespace hosts (``hosts.py``): it trains,
and when a worker crashes or its link is cut, the others stop with an error naming it, in
bounded time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from hosts import TestHosts, require_hosts

PORT = 7100
WORKERS = 3
# The demo's own step timeout is 30 s; peers are lost within the default 5 s peer_timeout.
ENDS_WITHIN = 60.0


def start_workers(hosts: TestHosts, *options: str) -> list[subprocess.Popen[str]]:
    cluster = {"worker": [f"{host.address}:{PORT}" for host in hosts]}
    workers = []
    for index, host in enumerate(hosts):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        environment = {**os.environ, "TF_CONFIG": json.dumps(tf_config)}
        command = [sys.executable, "-m", "distsrv", "demo-worker", *options]
        workers.append(
            host.popen(
                command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return workers


def outcomes(workers: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    """Each worker's exit status and output, once all have ended (killed past ENDS_WITHIN)."""
    deadline = time.monotonic() + ENDS_WITHIN
    ended = []
    for worker in workers:
        try:
            stdout, stderr = worker.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            stdout, stderr = worker.communicate(timeout=10)
            pytest.fail(f"a worker ran past {ENDS_WITHIN} s:\n{stdout}\n{stderr}")
        ended.append((worker.returncode, stdout + stderr))
    return ended


@pytest.fixture
def hosts() -> Iterator[TestHosts]:
    require_hosts()
    with TestHosts(WORKERS) as made:
        yield made


def test_the_main_job_trains_across_hosts(hosts: TestHosts) -> None:
    ended = outcomes(start_workers(hosts, "--epochs=3"))
    for status, output in ended:
        assert status == 0, output
    accuracy = re.search(r"test accuracy ([\d.]+)%", ended[0][1])
    assert accuracy is not None, ended[0][1]
    assert float(accuracy[1]) >= 80.0, ended[0][1]


def test_a_crashed_worker_stops_the_others_naming_it(hosts: TestHosts) -> None:
    ended = outcomes(start_workers(hosts, "--epochs=20", "--crash-worker=1"))
    stops = []
    for index in (0, 2):
        status, output = ended[index]
        assert status == 1, output
        stop = re.search(r"stopping: (Unavailable|Aborted)Error: .*", output)
        assert stop is not None, output
        stops.append(stop[0])
    # The first to find worker 1 gone names it and stops; the other may then find that one gone
    # first (both refuse connections at once), and names it instead.
    assert any("/job:worker/task:1" in stop for stop in stops), stops


def test_a_cut_link_stops_the_others_naming_the_cut_worker(hosts: TestHosts) -> None:
    workers = start_workers(hosts, "--epochs=200")
    assert workers[0].stdout is not None
    # Training is under way a moment after worker 0 announces it (200 epochs take over 20 s).
    for line in workers[0].stdout:
        if line.startswith("training a "):
            break
    time.sleep(1.0)
    hosts[1].cut()
    ended = outcomes(workers)
    for index in (0, 2):
        status, output = ended[index]
        assert status == 1, output
        assert "stopping: UnavailableError" in output, output
    # The first to find worker 1 lost names it and stops; the other may find that one gone
    # first (a stopped task refuses at once, a cut one is silent for peer_timeout).
    stops = [re.search(r"stopping: .*", ended[index][1]) for index in (0, 2)]
    assert any(stop and "/job:worker/task:1" in stop[0] for stop in stops), stops
    # The cut worker finds itself alone: it stops too, naming a peer it lost.
    status, output = ended[1]
    assert status == 1, output
    assert "stopping: UnavailableError" in output, output
