"""The same-host fast path: tensors between tasks of one machine through shared memory."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import distsrv_pb2
import distsrv_pb2_grpc
import grpc
import numpy as np
import pytest
from conftest import pair_cluster, read_line

import distsrv
from distsrv import errors, tensors

A, B = ("worker", 0), ("worker", 1)
#: Past this, tensors travel in a shared segment rather than inline on the local socket.
INLINE_BYTES = 64 << 10


def _pair(
    spec: distsrv.ClusterSpec, shm_a: bool = True, shm_b: bool = True
) -> tuple[distsrv.Server, distsrv.Server]:
    a = distsrv.Server(
        spec, "worker", 0, config=distsrv.ServerConfig(connect_timeout=2.0, shared_memory=shm_a)
    )
    b = distsrv.Server(
        spec, "worker", 1, config=distsrv.ServerConfig(connect_timeout=2.0, shared_memory=shm_b)
    )
    return a, b


@pytest.fixture
def pair() -> Iterator[tuple[distsrv.Server, distsrv.Server]]:
    a, b = _pair(pair_cluster(2))
    yield a, b
    a.stop(grace=0)
    b.stop(grace=0)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _memfds() -> list[str]:
    """This process's descriptors of memory files (shared segments and handshake tokens)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("/memfd:distsrv"):
            found.append(target)
    return found


def test_same_host_tensors_take_shared_memory(pair) -> None:
    a, b = pair
    small, large = np.arange(1000, dtype=np.float32), np.arange(1 << 20, dtype=np.float64)
    a.send("small", small, to=B)
    a.send("large", large, to=B)
    np.testing.assert_array_equal(b.recv("small", source=A, timeout=10), small)
    np.testing.assert_array_equal(b.recv("large", source=A, timeout=10), large)
    assert a.transport_counts() == {
        "shm_sent": 2,
        "grpc_sent": 0,
        "shm_received": 0,
        "shm_calls_served": 0,
    }
    assert b.transport_counts()["shm_received"] == 2


@pytest.mark.parametrize(("shm_a", "shm_b"), [(False, True), (True, False), (False, False)])
def test_the_switch_forces_grpc_either_side(shm_a: bool, shm_b: bool) -> None:
    a, b = _pair(pair_cluster(2), shm_a, shm_b)
    try:
        for size in (10, INLINE_BYTES * 4):
            array = np.arange(size, dtype=np.int32)
            a.send("t", array, to=B)
            np.testing.assert_array_equal(b.recv("t", source=A, timeout=10), array)
        assert a.transport_counts()["shm_sent"] == 0
        assert a.transport_counts()["grpc_sent"] == 2
        assert b.transport_counts()["shm_received"] == 0
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


@pytest.mark.parametrize("dtype", tensors.supported_dtypes(), ids=str)
@pytest.mark.parametrize("elements", [7, 50_000], ids=["inline", "segment"])
def test_every_dtype_round_trips(pair, dtype, elements: int) -> None:
    a, b = pair
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((elements, 2)) * 50).astype(dtype)
    a.send("t", array, to=B)
    got = b.recv("t", source=A, timeout=10)
    assert got.dtype == array.dtype
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert got.ctypes.data % 16 == 0
    got[...] = 0  # writable, and the receiver's own
    assert a.transport_counts()["shm_sent"] == 1


def test_received_segments_outlive_the_server_and_are_reused(pair) -> None:
    a, b = pair
    first = np.full(1 << 20, 3, np.float32)
    a.send("t", first, to=B)
    kept = b.recv("t", source=A, timeout=10)
    second = np.full(1 << 20, 4, np.float32)
    a.send("t", second, to=B)  # lands in another segment: `kept` still holds the first
    np.testing.assert_array_equal(b.recv("t", source=A, timeout=10), second)
    np.testing.assert_array_equal(kept, first)
    a.stop(grace=0)
    b.stop(grace=0)
    assert kept.sum() == 3 * (1 << 20)
    kept[0] = 1
    del kept
    assert _memfds() == []


@pytest.mark.parametrize("blocking", [True, False], ids=["send", "isend"])
def test_a_restarted_peer_is_reached_again_through_shared_memory(blocking: bool) -> None:
    spec = pair_cluster(2)
    a, b = _pair(spec)
    try:
        for round_ in range(2):
            for size in (16, 16, INLINE_BYTES):  # inline on the link, then through a segment
                array = np.full(size, round_, np.float32)
                if blocking:
                    a.send("t", array, to=B)
                else:
                    a.isend("t", array, to=B).wait(timeout=10)
                np.testing.assert_array_equal(b.recv("t", source=A, timeout=10), array)
            # The first tensor to the restarted task may take gRPC: the handshake's connection
            # broke with the old one. The link is dialled again for the next.
            assert b.transport_counts()["shm_received"] >= (3 if round_ == 0 else 2)
            b.stop(grace=0)
            # The same task again, on the same port: the link to the old one has hung up.
            b = distsrv.Server(spec, "worker", 1, config=distsrv.ServerConfig(connect_timeout=2.0))
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


def test_many_threads_many_sizes(pair) -> None:
    a, b = pair
    sizes = [0, 1, 1000, INLINE_BYTES // 4, INLINE_BYTES // 4 + 1, 300_000, 2_000_000]
    errors_seen: list[BaseException] = []

    def sender(thread: int) -> None:
        try:
            for round_ in range(4):
                for size in sizes:
                    a.send(f"t{thread}", np.full(size, thread * 100 + round_, np.float32), to=B)
        except BaseException as error:
            errors_seen.append(error)

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for t in range(6):
        for round_ in range(4):
            for size in sizes:
                got = b.recv(f"t{t}", source=A, timeout=30)
                assert got.shape == (size,)
                assert (got == t * 100 + round_).all()
    for thread in threads:
        thread.join(timeout=30)
    assert errors_seen == []
    assert a.transport_counts()["shm_sent"] == 6 * 4 * len(sizes)


def test_collectives_take_shared_memory(pair) -> None:
    a, b = pair
    results: list[np.ndarray] = []
    other = threading.Thread(
        target=lambda: results.append(b.all_reduce(np.full(100_000, 2.0), timeout=20))
    )
    other.start()
    mine = a.all_reduce(np.full(100_000, 1.0), timeout=20)
    other.join(timeout=20)
    np.testing.assert_array_equal(mine, np.full(100_000, 3.0))
    np.testing.assert_array_equal(results[0], mine)
    assert a.transport_counts()["shm_sent"] > 0
    assert a.transport_counts()["grpc_sent"] == 0


def test_calls_between_tasks_of_one_host_take_the_link(pair) -> None:
    a, b = pair
    b.add_handler("scale", lambda x, by: {"scaled": x * by, "by": by})
    large = np.arange(1 << 20, dtype=np.float32)
    result = a.call(B, "scale", x=large, by=2)
    np.testing.assert_array_equal(result["scaled"], large * 2)
    assert result["by"] == 2
    assert b.transport_counts()["shm_calls_served"] == 1
    assert a.transport_counts()["shm_calls_served"] == 0


@pytest.mark.parametrize(("shm_a", "shm_b"), [(False, True), (True, False)])
def test_the_switch_keeps_calls_on_grpc_either_side(shm_a: bool, shm_b: bool) -> None:
    a, b = _pair(pair_cluster(2), shm_a, shm_b)
    try:
        b.add_handler("echo", lambda value: value)
        assert a.call(B, "echo", value=[1, "two"]) == [1, "two"]
        assert b.transport_counts()["shm_calls_served"] == 0
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


def test_a_call_given_up_leaves_the_link_serving(pair) -> None:
    a, b = pair
    release, finished = threading.Event(), threading.Event()

    def slow() -> str:
        release.wait(10)
        finished.set()
        return "late"

    b.add_handler("slow", slow)
    b.add_handler("echo", lambda value: value)
    with pytest.raises(errors.DeadlineExceededError):
        a.call(B, "slow", timeout=0.2)
    # While the slow call still runs on B, its link goes on carrying tensors and calls.
    a.send("t", np.arange(10), to=B)
    np.testing.assert_array_equal(b.recv("t", source=A, timeout=10), np.arange(10))
    assert a.call(B, "echo", value="on") == "on"
    # Its late answer reaches nobody, and what follows is not mistaken for it.
    release.set()
    assert finished.wait(10)
    time.sleep(0.2)
    assert [a.call(B, "echo", value=i) for i in range(3)] == [0, 1, 2]
    assert a.transport_counts()["grpc_sent"] == 0
    assert b.transport_counts()["shm_calls_served"] == 5


@pytest.mark.slow
def test_hundreds_of_mib_through_shared_memory(pair) -> None:
    a, b = pair
    array = np.arange(100 << 20, dtype=np.float32)  # 400 MiB
    for _ in range(2):
        a.send("big", array, to=B)
        got = b.recv("big", source=A, timeout=60)
        assert np.array_equal(got[:: 1 << 12], array[:: 1 << 12])
        assert got[-1] == array[-1]
        del got
    assert a.transport_counts()["shm_sent"] == 2


def test_pending_bytes_bound_shared_memory_too() -> None:
    spec = pair_cluster(2)
    config = distsrv.ServerConfig(max_pending_bytes=3 << 20, connect_timeout=2.0, peer_share=1.0)
    with (
        distsrv.Server(spec, "worker", 0, config=config) as a,
        distsrv.Server(spec, "worker", 1, config=config) as b,
    ):
        a.send("fill", np.zeros(1 << 19, np.float32), to=B)  # 2 MiB held, unreceived
        with pytest.raises(errors.ResourceExhaustedError, match="max_pending_bytes"):
            a.send("over", np.zeros(1 << 19, np.float32), to=B)
        b.recv("fill", source=A)
        a.send("over", np.zeros(1 << 19, np.float32), to=B)
        assert b.recv("over", source=A).nbytes == 2 << 20
        assert a.transport_counts()["shm_sent"] == 3


def test_arrays_kept_past_the_descriptor_budget_arrive_and_leave_descriptors_for_the_rest() -> None:
    # Under a limit of 256 descriptors, 300 kept arrays each in its own memory file would make
    # every later memfd, accept and connect fail; past half of the budget of segments (a
    # quarter of the limit), arrived tensors move to plain memory instead.
    script = textwrap.dedent(
        """
        import os, resource, sys
        import numpy as np
        import distsrv
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        spec = distsrv.ClusterSpec({"worker": sys.argv[1:3]})
        a = distsrv.Server(spec, "worker", 0)
        b = distsrv.Server(spec, "worker", 1)
        before = len(os.listdir("/proc/self/fd"))
        kept = []
        for i in range(300):
            a.send("t", np.full(100_000, i % 251, np.uint8), to=("worker", 1), timeout=10)
            kept.append(b.recv("t", source=("worker", 0), timeout=10))
        assert all(array[0] == array[-1] == i % 251 for i, array in enumerate(kept))
        assert a.transport_counts()["shm_sent"] == 300
        grew = len(os.listdir("/proc/self/fd")) - before
        # A new connection and a new segment still work: the task serves on.
        a.add_handler("echo", lambda value: value)
        assert b.call(a.task, "echo", value=7, timeout=10) == 7
        a.send("after", np.ones(200_000, np.uint8), to=("worker", 1), timeout=10)
        assert b.recv("after", source=("worker", 0), timeout=10).sum() == 200_000
        print(grew)
        """
    )
    spec = pair_cluster(2)
    addresses = [spec.task_address("worker", index) for index in range(2)]
    result = subprocess.run(
        [sys.executable, "-c", script, *addresses], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # At most half of the 64 segments the budget allows stay with kept arrays, and a few more.
    assert int(result.stdout.split()[-1]) <= 40, result.stdout


def _handshake(server: distsrv.Server, pid: int) -> Any:
    with grpc.insecure_channel(server.address) as channel:
        stub = distsrv_pb2_grpc.WorkerStub(channel)
        request = distsrv_pb2.ShmHandshakeRequest(
            source=distsrv_pb2.TaskId(job="localhost", index=0), pid=pid
        )
        return stub.ShmHandshake(request, timeout=10)


def _hello(socket_name: str, ticket: bytes) -> bytes:
    """What the task answers a connection to its socket that presents `ticket`."""
    hello = distsrv_pb2.ShmMessage(id=0, hello=ticket).SerializeToString()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect("\0" + socket_name)
        sock.sendall(len(hello).to_bytes(4, "little") + hello)
        return sock.recv(1024)


def test_a_ticket_for_another_process_admits_nobody_else(local_server) -> None:
    # The socket's credentials name this process, not the one the ticket was for.
    answer = _handshake(local_server, pid=2**31 - 1)
    assert _hello(answer.socket, answer.ticket) == b""  # closed without a welcome


def test_a_connection_without_a_ticket_gets_nothing(local_server) -> None:
    # A real handshake, from this process, for the socket's name; then a forged ticket.
    answer = _handshake(local_server, pid=os.getpid())
    assert _hello(answer.socket, b"\0" * 16) == b""  # closed without a welcome


def test_the_handshake_opens_nothing_and_waits_for_nothing(local_server, tmp_path) -> None:
    """The handshake used to open /proc/<pid>/fd/<fd> as the caller named it: a FIFO there froze
    a runtime worker. Now it reads nothing at all: a handshake naming a process that holds a FIFO
    open answers at once, many of them at a time, and the task keeps serving."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time; os.open({str(fifo)!r}, os.O_RDWR); time.sleep(60)",
        ]
    )
    try:
        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _handshake(local_server, holder.pid), range(8)))
        assert time.monotonic() - began < 5
        assert all(answer.ticket for answer in answers)
        assert local_server.list_devices(timeout=5)
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_shared_memory_switch_is_validated() -> None:
    with pytest.raises(errors.InvalidArgumentError, match="shared_memory"):
        distsrv.ServerConfig(shared_memory="yes")  # type: ignore[arg-type]


_SENDER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import distsrv

    spec = distsrv.ClusterSpec({"worker": sys.argv[1:3]})
    server = distsrv.Server(spec, "worker", 0)
    array = np.ones(64 << 20, np.float32)  # 256 MiB
    server.send("big", array, to=("worker", 1))
    print("sent", flush=True)
    while True:
        server.send("big", array, to=("worker", 1))
    """
)


def _start_task_0(script: str, spec: distsrv.ClusterSpec) -> subprocess.Popen[str]:
    """Task 0 of ``spec``'s worker job, running ``script`` in a child process."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *spec.job_tasks("worker")],
        stdout=subprocess.PIPE,
        text=True,
    )


def _end(child: subprocess.Popen[str]) -> None:
    child.kill()
    child.wait(timeout=10)
    assert child.stdout is not None
    child.stdout.close()


def _receive_whole_tensors_until_error(receiver: distsrv.Server) -> None:
    """Tensors acknowledged before the kill arrive whole; after them, the receive fails."""
    while True:
        got = receiver.recv("big", source=A, timeout=30)
        assert got[0] == 1
        assert got[-1] == 1
        del got


def test_a_sender_killed_mid_transfer_leaves_nothing_behind() -> None:
    shm_before = set(os.listdir("/dev/shm"))
    fds_before = _open_fds()
    spec = pair_cluster(2)
    receiver = distsrv.Server(spec, "worker", 1, config=distsrv.ServerConfig(connect_timeout=1.0))
    child = _start_task_0(_SENDER, spec)
    try:
        assert read_line(child, timeout=60) == "sent"
        first = receiver.recv("big", source=A, timeout=30)
        assert first[-1] == 1
        del first
        time.sleep(0.02)  # the next 256 MiB are being written
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        with pytest.raises(errors.UnavailableError, match="/job:worker/task:0"):
            _receive_whole_tensors_until_error(receiver)
        assert receiver.transport_counts()["shm_received"] >= 1
    finally:
        _end(child)
        receiver.stop(grace=0)
    assert set(os.listdir("/dev/shm")) == shm_before
    assert _memfds() == []
    assert _open_fds() <= fds_before


_CALLER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import distsrv
    spec = distsrv.ClusterSpec({"worker": sys.argv[1:]})
    server = distsrv.Server(spec, "worker", 0)
    server.wait_for_cluster(timeout=30)
    print("calling", flush=True)
    server.call(("worker", 1), "hold", x=np.ones(8 << 20, np.float32))
    """
)


def test_a_caller_killed_mid_call_leaves_nothing_behind() -> None:
    fds_before = _open_fds()
    entered, release = threading.Event(), threading.Event()

    def hold(x: np.ndarray) -> np.ndarray:
        entered.set()
        release.wait(30)
        return x

    spec = pair_cluster(2)
    callee = distsrv.Server(spec, "worker", 1, handlers={"hold": hold, "echo": lambda value: value})
    child = _start_task_0(_CALLER, spec)
    try:
        assert read_line(child, timeout=60) == "calling"
        assert entered.wait(30)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        # Its 32 MiB answer goes to a link that is gone; the callee serves on.
        release.set()
        assert callee.call(callee.task, "echo", value="still here", timeout=10) == "still here"
        assert callee.transport_counts()["shm_calls_served"] >= 1
    finally:
        release.set()
        _end(child)
        callee.stop(grace=0)
    assert _memfds() == []
    assert _open_fds() <= fds_before
