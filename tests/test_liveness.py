"""No call waits forever on a silent peer: a frozen (SIGSTOPped) or killed task makes every call
waiting on it raise within ``peer_timeout``, and a task restarted on its address is seen as a
new incarnation that the next calls work with. Peers here share 127.0.0.1 (so the same-host
link carries their tensors and calls)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import pair_cluster, read_line
from hosts import freeze

import distsrv
from distsrv import errors

PEER_TIMEOUT = 1.0
# A wait on a lost peer ends within peer_timeout and one heartbeat; the rest is slack for a
# loaded machine, not a speed target (detection times are reported by the namespace tests).
BOUND = PEER_TIMEOUT + 2.0
B = ("worker", 1)
B_NAME = "/job:worker/task:1"

# Task 1: serves a handler that naps, hosts a variable, and joins all-reduces on request.
PEER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import distsrv
    spec = distsrv.ClusterSpec({"worker": sys.argv[1].split(",")})
    config = distsrv.ServerConfig(peer_timeout=float(sys.argv[2]))
    nap = {"nap": lambda seconds: time.sleep(seconds)}
    server = distsrv.Server(spec, "worker", 1, config=config, handlers=nap)
    server.create_variable("v", np.zeros(4, np.float32), on=server.task)
    for command in sys.stdin:
        command = command.strip()
        if command == "all_reduce":
            print(server.all_reduce(np.ones(3, np.float32))[0], flush=True)
        elif command == "large all_reduce":
            try:
                server.all_reduce(np.ones(4 << 20, np.float32), timeout=60)
                print("done", flush=True)
            except distsrv.errors.OpError as error:
                print(type(error).__name__, error, flush=True)
        elif command.startswith("send "):
            server.send(command.split()[1], np.arange(5), to=("worker", 0))
            print("sent", flush=True)
        elif command == "ready":
            server.wait_for_cluster(timeout=30)
            print("ready", flush=True)
    """
)


def start_peer(spec: distsrv.ClusterSpec) -> subprocess.Popen[str]:
    addresses = ",".join(spec.task_address("worker", i) for i in range(2))
    return subprocess.Popen(
        [sys.executable, "-c", PEER, addresses, str(PEER_TIMEOUT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ask(peer: subprocess.Popen[str], command: str, timeout: float = 30) -> str:
    assert peer.stdin is not None
    peer.stdin.write(command + "\n")
    peer.stdin.flush()
    return read_line(peer, timeout)


def end(peer: subprocess.Popen[str]) -> None:
    peer.send_signal(signal.SIGCONT)
    peer.kill()
    peer.communicate(timeout=10)


@pytest.fixture
def pair() -> Iterator[tuple[distsrv.Server, subprocess.Popen[str]]]:
    """This process's task 0 and task 1 in a child, both up."""
    yield from _pair(distsrv.ServerConfig(peer_timeout=PEER_TIMEOUT, connect_timeout=5.0))


@pytest.fixture
def grpc_pair() -> Iterator[tuple[distsrv.Server, subprocess.Popen[str]]]:
    """Like ``pair``, with task 0's tensors sent over gRPC, not the same-host link."""
    config = distsrv.ServerConfig(
        peer_timeout=PEER_TIMEOUT, connect_timeout=5.0, shared_memory=False
    )
    yield from _pair(config)


def _pair(config: distsrv.ServerConfig) -> Iterator[tuple[distsrv.Server, subprocess.Popen[str]]]:
    spec = pair_cluster(2)
    server = distsrv.Server(spec, "worker", 0, config=config)
    peer = start_peer(spec)
    try:
        assert ask(peer, "ready") == "ready"
        server.wait_for_cluster(timeout=30)
        # Heard from once: from now on, silence is a loss.
        assert next(server.watch_peers(timeout=10)).state == "up"
        yield server, peer
    finally:
        end(peer)
        server.stop(grace=0)


def _recv(server: distsrv.Server) -> Any:
    return server.recv("never", source=B)


def _send(server: distsrv.Server) -> Any:
    # Large enough that the frozen receiver cannot have taken it all before it froze.
    return server.send("big", np.ones(64 << 20, np.uint8), to=B)


def _call(server: distsrv.Server) -> Any:
    return server.call(B, "nap", seconds=60)


def _variable(server: distsrv.Server) -> Any:
    return server.variable("v", on=B).read()


def _all_reduce(server: distsrv.Server) -> Any:
    return server.all_reduce(np.ones(3, np.float32))


WAITS: dict[str, Callable[[distsrv.Server], Any]] = {
    "recv": _recv,
    "send": _send,
    "call": _call,
    "variable": _variable,
    "all_reduce": _all_reduce,
}


@pytest.mark.parametrize("wait", sorted(WAITS))
def test_a_frozen_peer_ends_each_wait_on_it_within_peer_timeout(pair, wait: str) -> None:
    server, peer = pair
    if wait == "call":
        # Frozen mid-call: the nap has begun when the freeze comes.
        timer = _later(0.5, lambda: freeze(peer))
    else:
        freeze(peer)
        timer = None
    started = time.monotonic()
    with pytest.raises(errors.UnavailableError, match="/job:worker/task:1") as info:
        WAITS[wait](server)
    elapsed = time.monotonic() - started
    if timer is not None:
        timer.join()
    assert elapsed < BOUND + (0.5 if timer else 0), (elapsed, str(info.value))


def test_a_thawed_peer_is_up_again_and_a_killed_one_ends_a_wait_at_once(pair) -> None:
    server, peer = pair
    events = server.watch_peers(timeout=10)
    up = next(events)
    assert (up.task, up.state) == (B_NAME, "up")
    freeze(peer)
    with pytest.raises(errors.UnavailableError):
        server.recv("never", source=B)
    lost = next(events)
    assert (lost.task, lost.state, lost.incarnation) == (B_NAME, "lost", up.incarnation)
    assert "did not answer a heartbeat" in str(lost.reason)
    peer.send_signal(signal.SIGCONT)
    # Thawed, the same incarnation answers again, and calls on it work.
    assert next(events) == up
    assert server.variable("v", on=B).read(timeout=5).tolist() == [0, 0, 0, 0]
    waiting = server.irecv("never", source=B)
    started = time.monotonic()
    peer.kill()
    with pytest.raises(errors.UnavailableError, match="/job:worker/task:1"):
        waiting.wait(timeout=30)
    # Nothing listens at its address: no need to wait out peer_timeout.
    assert time.monotonic() - started < BOUND
    gone = next(events)
    assert (gone.state, gone.reason) == ("lost", "is gone: nothing listens at its address")


def test_a_member_thawed_after_the_others_gave_up_a_collective_is_told(grpc_pair) -> None:
    # The peer freezes in the middle of a large all-reduce that this task then gives up on: once
    # thawed, it must not wait out its timeout for pieces that will never come.
    server, peer = grpc_pair
    assert peer.stdin is not None
    peer.stdin.write("large all_reduce\n")
    peer.stdin.flush()
    time.sleep(0.5)
    freeze(peer)
    with pytest.raises(errors.UnavailableError, match="/job:worker/task:1"):
        server.all_reduce(np.ones(4 << 20, np.float32))
    thawed = time.monotonic()
    peer.send_signal(signal.SIGCONT)
    outcome = read_line(peer, 60)
    assert outcome.startswith("AbortedError"), outcome
    assert time.monotonic() - thawed < BOUND


@pytest.mark.parametrize("timeout", [0.3, None], ids=["timed-out", "peer-lost"])
def test_a_send_cut_short_gives_the_array_back(grpc_pair, timeout: float | None) -> None:
    # The frozen receiver leaves HTTP/2 holding frames of the array: cut short by its timeout or
    # by the peer's loss, the send still returns promptly, with the array's export released
    # (none leaked), which takes dropping those frames.
    server, peer = grpc_pair
    array = np.ones(64 << 20, np.uint8)
    references = sys.getrefcount(array)
    freeze(peer)
    expected = errors.UnavailableError if timeout is None else errors.DeadlineExceededError
    started = time.monotonic()
    with pytest.raises(expected):
        server.send("big", array, to=B, timeout=timeout)
    assert time.monotonic() - started < BOUND
    assert sys.getrefcount(array) == references


def _later(delay: float, action: Callable[[], Any]) -> threading.Timer:
    timer = threading.Timer(delay, action)
    timer.start()
    return timer


def test_a_restarted_peer_is_a_new_incarnation_that_the_next_calls_work_with() -> None:
    spec = pair_cluster(2)
    config = distsrv.ServerConfig(peer_timeout=PEER_TIMEOUT, connect_timeout=20.0)
    with distsrv.Server(spec, "worker", 0, config=config) as server:
        peer = start_peer(spec)
        try:
            assert ask(peer, "ready") == "ready"
            first = server.wait_for_cluster(timeout=30)["/job:worker/task:1"]
            events = server.watch_peers(timeout=30)
            assert next(events) == ("/job:worker/task:1", "up", first, None)
            ask_all_reduce = _later(0, lambda: ask(peer, "all_reduce"))
            assert server.all_reduce(np.ones(3, np.float32)).tolist() == [2, 2, 2]
            ask_all_reduce.join()
            peer.kill()
            peer.communicate(timeout=10)
            lost = next(events)
            assert (lost.task, lost.state, lost.incarnation) == (
                "/job:worker/task:1",
                "lost",
                first,
            )
            # Issued while the task is down: it waits for the task to come back.
            waiting = server.irecv("after", source=B, timeout=30)
            peer = start_peer(spec)
            assert ask(peer, "ready") == "ready"
            back = next(events)
            assert (back.task, back.state) == ("/job:worker/task:1", "restarted")
            assert back.incarnation not in (None, first)
            assert server.wait_for_cluster(timeout=10)["/job:worker/task:1"] == back.incarnation
            assert ask(peer, "send after") == "sent"
            assert waiting.wait(timeout=30).tolist() == [0, 1, 2, 3, 4]
            # The group counts its collectives anew with the new incarnation.
            ask_all_reduce = _later(0, lambda: ask(peer, "all_reduce"))
            assert server.all_reduce(np.ones(3, np.float32), timeout=30).tolist() == [2, 2, 2]
            ask_all_reduce.join()
            server.send("x", np.ones(2), to=B, timeout=10)
        finally:
            end(peer)


def test_a_send_and_a_variable_op_take_a_timeout(pair) -> None:
    server, peer = pair
    with pytest.raises(errors.DeadlineExceededError):
        server.call(B, "nap", seconds=5, timeout=0.2)
    freeze(peer)
    with pytest.raises(errors.DeadlineExceededError):
        server.variable("v", on=B).read(timeout=0.2)
    with pytest.raises(errors.DeadlineExceededError):
        server.send("big", np.ones(64 << 20, np.uint8), to=B, timeout=0.2)


def test_peer_timeout_is_checked() -> None:
    with pytest.raises(errors.InvalidArgumentError, match="peer_timeout"):
        distsrv.ServerConfig(peer_timeout=0.01)
    with pytest.raises(errors.InvalidArgumentError, match="peer_timeout"):
        distsrv.ServerConfig(peer_timeout=float("nan"))
    assert distsrv.ServerConfig().peer_timeout == 5.0
