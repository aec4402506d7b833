"""Each peer's share of a task's budgets (``ServerConfig.peer_share``, and
``max_connections_per_address``): a peer past its share of pending bytes, calls in flight or open
connections is refused, and the others are still served."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import pair_cluster

import distsrv
from distsrv import errors
from distsrv.launch import free_ports


@contextlib.contextmanager
def servers(
    cluster: distsrv.ClusterSpec,
    config: distsrv.ServerConfig,
    securities: list[distsrv.Security | None] | None = None,
) -> Iterator[list[distsrv.Server]]:
    count = cluster.num_tasks("worker")
    securities = securities or [None] * count
    started = [
        distsrv.Server(cluster, "worker", index, config=config, security=securities[index])
        for index in range(count)
    ]
    try:
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "grpc"])
def test_a_sender_past_its_share_of_pending_bytes_is_refused_and_another_still_lands(
    shared_memory: bool,
) -> None:
    config = distsrv.ServerConfig(
        max_pending_bytes=4 << 20, connect_timeout=2.0, shared_memory=shared_memory
    )
    with servers(pair_cluster(3), config) as (flooder, other, receiver):
        to = ("worker", 2)
        tensor = np.zeros(256 << 10, np.uint8)
        # Half of 4 MiB holds 7 such tensors, with their names and bookkeeping.
        for sent in range(7):
            flooder.send(f"t{sent}", tensor, to=to, timeout=10)
        sent = 7
        with pytest.raises(errors.ResourceExhaustedError, match="peer_share") as refused:
            flooder.send("t7", tensor, to=to, timeout=10)
        assert "/job:worker/task:0" in str(refused.value)
        # The other sender's tensors still arrive, as many as the flooder's.
        for index in range(sent):
            other.send(f"o{index}", tensor, to=to, timeout=10)
        assert receiver.recv("o0", source=("worker", 1), timeout=10).nbytes == tensor.nbytes
        # Received tensors give their share back to their sender.
        for index in range(sent):
            receiver.recv(f"t{index}", source=("worker", 0), timeout=10)
        flooder.send("again", tensor, to=to, timeout=10)
        assert receiver.recv("again", source=("worker", 0), timeout=10).nbytes == tensor.nbytes


def test_a_caller_past_its_share_of_calls_in_flight_is_refused_and_another_is_served() -> None:
    names = [f"/job:worker/task:{index}" for index in range(3)]
    issued = distsrv.Security.temporary_for_tasks(names)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow() -> str:
        entered.release()
        release.wait(30)
        return "done"

    # Over gRPC, each caller proven by its own certificate; two calls in flight per peer.
    config = distsrv.ServerConfig(connection_limit=4, shared_memory=False, connect_timeout=2.0)
    securities: list[distsrv.Security | None] = [issued[name] for name in names]
    with servers(pair_cluster(3), config, securities) as (greedy, other, callee):
        callee.add_handler("slow", slow)
        callee.add_handler("echo", lambda value: value)
        to = ("worker", 2)
        held = [greedy.icall(to, "slow", timeout=30) for _ in range(2)]
        for _ in held:
            assert entered.acquire(timeout=10)
        with pytest.raises(errors.ResourceExhaustedError, match="peer_share") as refused:
            greedy.call(to, "echo", value=1, timeout=10)
        assert "/job:worker/task:0 has 2 calls in flight" in str(refused.value)
        assert other.call(to, "echo", value=2, timeout=10) == 2
        release.set()
        assert [handle.wait(10) for handle in held] == ["done", "done"]
        assert greedy.call(to, "echo", value=3, timeout=10) == 3


def _closed_at_once(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` without waiting for it to speak."""
    sock.settimeout(1.0)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_an_address_past_its_share_of_connections_is_closed_and_another_is_served() -> None:
    # Silent connections are kept for peer_timeout.
    config = distsrv.ServerConfig(max_connections_per_address=2, peer_timeout=10.0)
    port = free_ports(1)[0]
    with distsrv.Server(
        distsrv.ClusterSpec({"worker": [f"127.0.0.1:{port}"]}), "worker", 0, config=config
    ) as server:

        def connect(source: str) -> socket.socket:
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            return sock

        kept = [connect("127.0.0.1") for _ in range(2)]
        over = connect("127.0.0.1")
        # Another address of this host (all of 127/8 is loopback) is another peer.
        elsewhere = connect("127.0.0.2")
        try:
            assert not any(_closed_at_once(sock) for sock in kept)
            assert _closed_at_once(over)
            assert not _closed_at_once(elsewhere)
            # A closed connection gives its place back, once the server has seen it close.
            kept.pop().close()
            deadline = time.monotonic() + 5
            while _closed_at_once(later := connect("127.0.0.1")):
                later.close()
                assert time.monotonic() < deadline, "the closed connection's place came back"
            kept.append(later)
        finally:
            for sock in [*kept, over, elsewhere]:
                sock.close()
        assert server.status == "running"
