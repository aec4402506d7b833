"""Load on one task, bounded in count and time, on 127.0.0.1: many concurrent clients calling
handlers, sending tensors and updating a variable, with no error and no tensor lost, duplicated
or reordered; and a slow-loris attack during which a well-behaved peer is served as usual."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import pair_cluster

import distsrv

CLIENT_TASKS = 4
THREADS_PER_TASK = 16
OPS_PER_CLIENT = 1000


@pytest.fixture
def cluster() -> Iterator[list[distsrv.Server]]:
    # Every tensor over gRPC: the path a remote or hostile peer uses.
    config = distsrv.ServerConfig(shared_memory=False, connect_timeout=5.0)
    spec = pair_cluster(1 + CLIENT_TASKS)
    servers = [distsrv.Server(spec, "worker", i, config=config) for i in range(1 + CLIENT_TASKS)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_64_clients_of_1000_calls_sends_and_updates_each_end_with_no_error_or_lost_tensor(
    cluster: list[distsrv.Server],
) -> None:
    target, *callers = cluster
    target.add_handler("add", lambda x, y: x + y)
    counter = target.create_variable("counter", np.zeros(1, np.int64), on=target.task)
    clients = [(task, thread) for task in range(CLIENT_TASKS) for thread in range(THREADS_PER_TASK)]
    sends_each = len(range(1, OPS_PER_CLIENT, 3))

    def client(task: int, thread: int) -> int:
        server = callers[task]
        variable = server.variable("counter", on=target.task)
        name = f"stream-{task}-{thread}"
        sent = 0
        for op in range(OPS_PER_CLIENT):
            if op % 3 == 0:
                assert server.call(target.task, "add", x=op, y=thread, timeout=30) == op + thread
            elif op % 3 == 1:
                server.send(name, np.full(256, sent, np.int64), to=target.task, timeout=30)
                sent += 1
            else:
                variable.assign_add(np.ones(1, np.int64), timeout=30)
        return sent

    def receive(task: int, thread: int) -> list[int]:
        source = callers[task].task
        name = f"stream-{task}-{thread}"
        return [int(target.recv(name, source=source, timeout=60)[0]) for _ in range(sends_each)]

    began = time.monotonic()
    with ThreadPoolExecutor(len(clients)) as senders, ThreadPoolExecutor(16) as receivers:
        sending = [senders.submit(client, *c) for c in clients]
        receiving = [receivers.submit(receive, *c) for c in clients]
        assert [f.result(timeout=300) for f in sending] == [sends_each] * len(clients)
        received = [f.result(timeout=300) for f in receiving]
    elapsed = time.monotonic() - began
    # Each client's tensors arrived once each, in the order sent; nothing else is left over.
    assert all(values == list(range(sends_each)) for values in received)
    for task, thread in clients:
        handle = target.irecv(f"stream-{task}-{thread}", source=callers[task].task, timeout=0.05)
        with pytest.raises(distsrv.errors.DeadlineExceededError):
            handle.wait()
    updates = len(clients) * len(range(2, OPS_PER_CLIENT, 3))
    assert int(counter.read()[0]) == updates
    total = len(clients) * OPS_PER_CLIENT
    print(f"\n{len(clients)} clients x {OPS_PER_CLIENT} ops = {total} in {elapsed:.1f} s, 0 errors")


def _latencies(call: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)
    return samples


def _tls_channel(address: str, security: distsrv.Security) -> grpc.Channel:
    """A stock client's own connection, under ``security``'s certificate."""
    assert security.tls_pem is not None
    ca, cert, key = security.tls_pem
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.secure_channel(address, credentials, [("grpc.use_local_subchannel_pool", 1)])


def test_a_well_behaved_peer_is_served_beside_hundreds_of_stalled_streams() -> None:
    # The attacker opens as many stalled tensor streams as the task serves calls; the peer is
    # another task, proven by its certificate, so the attacker's share is not the peer's.
    names = [f"/job:worker/task:{index}" for index in range(2)]
    issued = distsrv.Security.temporary_for_tasks(names)
    channels, streams_each = 4, 100  # HTTP/2 serves 200 streams at once per connection
    stalls = channels * streams_each
    config = distsrv.ServerConfig(
        shared_memory=False, connection_limit=stalls, peer_timeout=20.0, connect_timeout=5.0
    )
    spec = pair_cluster(2)
    target, peer = (
        distsrv.Server(spec, "worker", i, config=config, security=issued[names[i]]) for i in (0, 1)
    )
    attacker = issued[names[0]]
    metadata = (("authorization", f"Bearer {attacker.token}"),)
    release = threading.Event()

    def nothing() -> Iterator[bytes]:
        release.wait(60)
        yield b""

    def echo() -> object:
        # A call that does not finish in seconds has not been served as usual.
        assert peer.call(target.task, "echo", value=1, timeout=5) == 1
        return None

    try:
        target.add_handler("echo", lambda value: value)
        _latencies(echo, 50)
        unloaded = _latencies(echo, 300)
        opened = [_tls_channel(target.address, attacker) for _ in range(channels)]
        try:
            futures = [
                channel.stream_unary("/distsrv.v1.Worker/SendTensor").future(
                    nothing(), metadata=metadata
                )
                for channel in opened
                for _ in range(streams_each)
            ]
            # Half are held, stalled; the rest are refused at once, past the attacker's share.
            deadline = time.monotonic() + 20
            while sum(future.done() for future in futures) < stalls // 2:
                assert time.monotonic() < deadline, "streams past the share were not refused"
                time.sleep(0.05)
            refused = [future.exception() for future in futures if future.done()]
            assert len(refused) == stalls // 2
            assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # type: ignore[union-attr]
            loaded = _latencies(echo, 300)
            assert sum(future.done() for future in futures) == stalls // 2
            release.set()
            for future in futures:
                future.exception(timeout=30)
        finally:
            release.set()
            for channel in opened:
                channel.close()
        print(
            f"\necho median {statistics.median(unloaded) * 1e3:.2f} ms alone, "
            f"{statistics.median(loaded) * 1e3:.2f} ms beside {stalls // 2} stalled streams"
        )
    finally:
        release.set()
        target.stop()
        peer.stop()
