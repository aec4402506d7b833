"""Faults between hosts: three tasks, each in a network namespace of its own (``hosts.py``).
For each of recv, send, call, a variable op and an all-reduce, task 0 waits on task 1 while
task 1's link is cut or its process frozen; every wait must raise ``UnavailableError`` naming
task 1 within ``peer_timeout`` + 1 s. The detection times are printed (``pytest -s``)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from conftest import read_line
from hosts import TestHosts, freeze, require_hosts, thaw

PEER_TIMEOUT = 1.0
PORT = 7000  # every host has its own ports
WAITS = ["recv", "send", "call", "variable", "all_reduce"]
FAULTS = ["cut", "freeze"]
# How long into a wait the fault comes: the wait is under way, not about to begin.
FAULT_AFTER = 0.3

# Every task: serves, hosts variable "v" (task 1), and, as task 0, runs the waits it is told to
# on task 1, printing how each ended and when (the test's clock: CLOCK_MONOTONIC is the host's).
TASK = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import distsrv
    from distsrv import errors
    spec = distsrv.ClusterSpec({"worker": sys.argv[1].split(",")})
    config = distsrv.ServerConfig(peer_timeout=float(sys.argv[3]), shared_memory=False)
    nap = {"nap": lambda seconds: time.sleep(seconds)}
    server = distsrv.Server(spec, "worker", int(sys.argv[2]), config=config, handlers=nap)
    one = ("worker", 1)
    if server.task_index == 1:
        server.create_variable("v", np.zeros(4, np.float32), on=server.task)
    server.wait_for_cluster(timeout=60)
    print("ready", flush=True)

    def wait(kind):
        if kind == "recv":
            server.recv("never", source=one)
        elif kind == "send":
            while True:
                server.send("big", np.ones(8 << 20, np.uint8), to=one)
        elif kind == "call":
            server.call(one, "nap", seconds=60)
        elif kind == "variable":
            variable = server.variable("v", on=one)
            while True:
                variable.read()
        elif kind == "all_reduce":
            # Task 1 never contributes: the wait is on it alone.
            server.all_reduce(np.ones(3, np.float32), group=[server.task, one])

    for command in sys.stdin:
        kind = command.strip()
        for event in server.watch_peers(timeout=30):
            if event.task == "/job:worker/task:1" and event.state != "lost":
                break
        print("waiting", flush=True)
        try:
            wait(kind)
            outcome = "returned"
        except errors.OpError as error:
            outcome = f"{type(error).__name__}: {error}"
        print(json.dumps({"ended": time.monotonic(), "outcome": outcome}), flush=True)
    """
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[TestHosts, list[subprocess.Popen[str]]]]:
    require_hosts()
    with TestHosts(3) as hosts:
        addresses = ",".join(f"{host.address}:{PORT}" for host in hosts)
        tasks = [
            host.popen(
                [sys.executable, "-c", TASK, addresses, str(index), str(PEER_TIMEOUT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for index, host in enumerate(hosts)
        ]
        for task in tasks:
            assert read_line(task, 60) == "ready"
        yield hosts, tasks
        detections = _DETECTIONS
        if detections:
            print(
                f"\ndetection over {len(detections)} cases: median "
                f"{statistics.median(detections):.2f} s, max {max(detections):.2f} s "
                f"(peer_timeout {PEER_TIMEOUT} s)"
            )


_DETECTIONS: list[float] = []


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("wait", WAITS)
def test_a_cut_or_frozen_peer_ends_each_wait_on_it(cluster, wait: str, fault: str) -> None:
    hosts, tasks = cluster
    waiter, peer = tasks[0], tasks[1]
    assert waiter.stdin is not None
    waiter.stdin.write(wait + "\n")
    waiter.stdin.flush()
    assert read_line(waiter, 30) == "waiting"
    time.sleep(FAULT_AFTER)
    if fault == "cut":
        hosts[1].cut()
    else:
        freeze(peer)
    # Timed from when the fault is in place: `ip` can take a while on a busy machine.
    faulted = time.monotonic()
    try:
        ended = json.loads(read_line(waiter, 30))
    finally:
        if fault == "cut":
            hosts[1].restore()
        else:
            thaw(peer)
    detection = ended["ended"] - faulted
    _DETECTIONS.append(detection)
    print(f"{wait} / {fault}: {detection:.2f} s: {ended['outcome']}")
    assert ended["outcome"].startswith("UnavailableError"), ended
    assert "/job:worker/task:1" in ended["outcome"], ended
    assert detection <= PEER_TIMEOUT + 1.0, ended
