"""Tensor exchange: send/recv between tasks, over the Rust server's gRPC transport."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import distsrv_pb2
import distsrv_pb2_grpc
import grpc
import numpy as np
import pytest
from conftest import pair_cluster

import distsrv
from distsrv import errors, tensors

A, B = ("worker", 0), ("worker", 1)


@pytest.fixture(params=[True, False], ids=["shm", "grpc"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[distsrv.Server, distsrv.Server]]:
    """Two tasks of one cluster, each with its own server, on one host: tensors go through shared
    memory, or (``shared_memory=False``) over loopback gRPC."""
    spec = pair_cluster(2)
    config = distsrv.ServerConfig(connect_timeout=2.0, shared_memory=request.param)
    a = distsrv.Server(spec, "worker", 0, config=config)
    b = distsrv.Server(spec, "worker", 1, config=config)
    yield a, b
    a.stop(grace=0)
    b.stop(grace=0)


def _roundtrip(a: distsrv.Server, b: distsrv.Server, array: np.ndarray) -> np.ndarray:
    a.send("t", array, to=B)
    return b.recv("t", source=A, timeout=10)


@pytest.mark.parametrize("dtype", tensors.supported_dtypes(), ids=str)
def test_every_dtype_arrives_intact(pair: tuple[distsrv.Server, distsrv.Server], dtype) -> None:
    a, b = pair
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 5)) * 50).astype(dtype)
    got = _roundtrip(a, b, array)
    assert got.dtype == array.dtype
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable
    got[...] = 0  # an ordinary array the receiver owns


def test_bfloat16_travels_as_tensorflow_code_14(pair) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a, b = pair
    array = np.arange(6, dtype=ml_dtypes.bfloat16).reshape(2, 3)
    assert tensors.dtype_code(array.dtype) == 14
    np.testing.assert_array_equal(_roundtrip(a, b, array), array)


@pytest.mark.parametrize(
    "array",
    [
        np.float64(3.5) * np.ones(()),  # 0-d
        np.zeros((0,), np.float32),
        np.zeros((4, 0, 3), np.int16),
        np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2],  # non-contiguous
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.arange(10, dtype=">i4"),  # big-endian
        np.array([True, False, True]),
    ],
    ids=["0d", "empty", "empty-3d", "strided", "fortran", "big-endian", "bool"],
)
def test_shapes_and_layouts(pair, array: np.ndarray) -> None:
    a, b = pair
    got = _roundtrip(a, b, array)
    assert got.shape == array.shape
    assert got.dtype == array.dtype.newbyteorder("=")
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, array)


def test_received_arrays_are_aligned_for_their_dtype(pair) -> None:
    a, b = pair
    got = _roundtrip(a, b, np.ones(1001, np.complex128))
    assert got.ctypes.data % 16 == 0
    assert got.flags.aligned


def test_unsupported_dtypes_are_type_errors(local_server: distsrv.Server) -> None:
    with pytest.raises(TypeError, match="cannot send arrays of dtype"):
        local_server.send("s", np.array(["a", "b"]), to=local_server.task)
    with pytest.raises(TypeError, match="cannot send"):
        local_server.send("o", np.array([object()]), to=local_server.task)


def test_send_to_oneself_needs_no_network(local_server: distsrv.Server) -> None:
    array = np.arange(5.0)
    local_server.send("me", array, to=local_server.task)
    np.testing.assert_array_equal(local_server.recv("me", source=local_server.task), array)
    array[0] = 99  # the inbox holds its own copy
    local_server.send("me", array, to=("localhost", 0))
    assert local_server.recv("me", source="/job:localhost/replica:0/task:0")[0] == 99


def test_unknown_tasks_are_refused_before_sending(local_server: distsrv.Server) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="not in the cluster spec"):
        local_server.send("x", np.zeros(3), to=("ps", 0))
    with pytest.raises(errors.InvalidArgumentError, match="not in the cluster spec"):
        local_server.recv("x", source="/job:localhost/task:7", timeout=1)
    with pytest.raises(ValueError, match="not a task name"):
        local_server.recv("x", source="localhost:0")
    with pytest.raises(TypeError, match="a task is"):
        local_server.recv("x", source=["localhost", 0])  # type: ignore[arg-type]


def test_tasks_are_named_or_paired_everywhere(local_server: distsrv.Server) -> None:
    local_server.send("t", np.ones(2), to=("localhost", np.int64(0)))
    assert local_server.recv("t", source="/job:localhost/task:0").shape == (2,)
    with pytest.raises(TypeError, match="a task is"):
        local_server.send("t", np.ones(2), to=("localhost", True))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a task is"):
        local_server.all_reduce(np.ones(2), group=[("localhost", "0")])  # type: ignore[list-item]


def test_a_sent_array_is_lent_until_acknowledged() -> None:
    """A C-contiguous array is read where it is, not copied: the send holds it (numpy refuses
    to resize an array something else refers to) until the receiver has the tensor."""
    spec = pair_cluster()
    with (
        distsrv.Server(spec, "worker", 0) as a,
        distsrv.Server(spec, "worker", 1, start=False) as b,
    ):
        array = np.arange(1000.0)
        sending = a.isend("lent", array, to=B)
        with pytest.raises(ValueError, match="resize"):
            array.resize(2000)
        b.start()
        sending.wait(timeout=30)
        np.testing.assert_array_equal(b.recv("lent", source=A), np.arange(1000.0))
        array.resize(2000)


def test_recv_before_send_and_order_per_name(pair) -> None:
    a, b = pair
    early = b.irecv("seq", source=A)
    assert not early.done()
    for i in range(20):
        a.send("seq", np.array([i]), to=B)
    assert early.wait(timeout=10)[0] == 0
    assert [int(b.recv("seq", source=A, timeout=10)[0]) for _ in range(19)] == list(range(1, 20))


def test_isend_keeps_call_order(pair) -> None:
    a, b = pair
    handles = [a.isend("burst", np.full(50_000, i, np.int64), to=B) for i in range(10)]
    for handle in handles:
        handle.wait(timeout=10)
    assert [int(b.recv("burst", source=A, timeout=10)[0]) for _ in range(10)] == list(range(10))


def test_many_names_from_many_threads(pair) -> None:
    a, b = pair
    names = [f"grad/{i}" for i in range(32)]

    def send(name: str) -> None:
        a.send(name, np.full(1000, hash(name) % 1000, np.float32), to=B)

    def recv(name: str) -> float:
        return float(b.recv(name, source=A, timeout=20)[0])

    with concurrent.futures.ThreadPoolExecutor(2 * len(names)) as pool:
        received = pool.map(recv, names)
        list(pool.map(send, names))
        assert list(received) == [float(hash(n) % 1000) for n in names]


def test_recv_timeout_is_deadline_exceeded(pair) -> None:
    _, b = pair
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceededError, match="never"):
        b.recv("never", source=A, timeout=0.3)
    assert time.monotonic() - started < 5
    with pytest.raises(errors.DeadlineExceededError):
        b.irecv("never", source=A).wait(timeout=0.2)


def test_a_timed_out_recv_loses_nothing(pair) -> None:
    a, b = pair
    with pytest.raises(errors.DeadlineExceededError):
        b.recv("late", source=A, timeout=0.1)
    a.send("late", np.array([7]), to=B)
    assert b.recv("late", source=A, timeout=5)[0] == 7


def test_a_task_that_is_down_is_unavailable_in_bounded_time() -> None:
    spec = pair_cluster(2)
    config = distsrv.ServerConfig(connect_timeout=1.0)
    with distsrv.Server(spec, "worker", 0, config=config) as a:
        started = time.monotonic()
        with pytest.raises(errors.UnavailableError, match="/job:worker/task:1"):
            a.send("x", np.zeros(4), to=B)
        with pytest.raises(errors.UnavailableError, match="/job:worker/task:1"):
            a.recv("x", source=B)
        assert time.monotonic() - started < 10


def test_peer_that_stops_while_we_wait_is_reported(pair) -> None:
    a, b = pair
    waiting = b.irecv("orphan", source=A)
    a.stop(grace=0)
    with pytest.raises(errors.UnavailableError, match="/job:worker/task:0"):
        waiting.wait(timeout=15)


def test_pending_bytes_are_bounded() -> None:
    spec = pair_cluster(2)
    # One sender, so the task's whole budget is its share.
    config = distsrv.ServerConfig(max_pending_bytes=1 << 20, connect_timeout=2.0, peer_share=1.0)
    with (
        distsrv.Server(spec, "worker", 0, config=config) as a,
        distsrv.Server(spec, "worker", 1, config=config) as b,
    ):
        a.send("fill", np.zeros(200_000, np.float32), to=B)  # 800 kB held, unreceived
        with pytest.raises(errors.ResourceExhaustedError, match="max_pending_bytes"):
            a.send("over", np.zeros(100_000, np.float32), to=B)
        b.recv("fill", source=A)  # receiving frees the room
        a.send("over", np.zeros(100_000, np.float32), to=B)
        assert b.recv("over", source=A).nbytes == 400_000


@pytest.mark.slow
def test_hundreds_of_mib_in_one_tensor(pair) -> None:
    a, b = pair
    array = np.arange(75 << 20, dtype=np.float32)  # 300 MiB
    a.send("big", array, to=B)
    got = b.recv("big", source=A, timeout=60)
    assert got.shape == array.shape
    assert got[0] == 0
    assert got[-1] == array[-1]
    assert got[12_345_678] == 12_345_678
    assert np.array_equal(got[:: 1 << 16], array[:: 1 << 16])


def test_asyncio_forms_overlap(pair) -> None:
    a, b = pair

    async def main() -> list[float]:
        receives = [b.arecv(f"n{i}", source=A, timeout=10) for i in range(8)]
        sends = [a.asend(f"n{i}", np.full(10, i, np.float64), to=B) for i in range(8)]
        results = await asyncio.gather(*receives, *sends)
        return [float(r[0]) for r in results[:8]]

    assert asyncio.run(main()) == [float(i) for i in range(8)]


def test_a_handle_gives_its_result_once(pair) -> None:
    a, b = pair
    a.send("once", np.ones(2), to=B)
    handle = b.irecv("once", source=A)
    handle.wait(timeout=5)
    assert handle.done()
    with pytest.raises(errors.FailedPreconditionError, match="already taken"):
        handle.wait()


def test_dropping_an_unfinished_irecv_cancels_it(pair) -> None:
    a, b = pair
    handle = b.irecv("cancelled", source=A)
    del handle
    a.send("cancelled", np.array([1.0]), to=B)
    # The tensor was not swallowed by the abandoned receive.
    assert b.recv("cancelled", source=A, timeout=5)[0] == 1.0


# -- stock grpcio clients ---------------------------------------------------------------------


def _chunks(name: str, array: np.ndarray, chunk: int = 1000) -> Iterator[distsrv_pb2.TensorChunk]:
    payload = array.tobytes()
    yield distsrv_pb2.TensorChunk(
        header=distsrv_pb2.TensorHeader(
            name=name,
            source=distsrv_pb2.TaskId(job="localhost", index=0),
            dtype=tensors.dtype_code(array.dtype),
            shape=distsrv_pb2.TensorShapeProto(
                dim=[distsrv_pb2.TensorShapeProto.Dim(size=s) for s in array.shape]
            ),
            total_bytes=len(payload),
        )
    )
    for start in range(0, len(payload), chunk):
        yield distsrv_pb2.TensorChunk(data=payload[start : start + chunk])


def test_stock_grpcio_client_sends_and_receives(local_server, channel) -> None:
    stub = distsrv_pb2_grpc.WorkerStub(channel)
    array = np.arange(3000, dtype=np.float32).reshape(30, 100)
    reply = stub.SendTensor(_chunks("from-grpcio", array), timeout=10)
    assert reply.received_bytes == array.nbytes
    np.testing.assert_array_equal(local_server.recv("from-grpcio", source=local_server.task), array)

    local_server.send("to-grpcio", array * 2, to=local_server.task)
    request = distsrv_pb2.RecvTensorRequest(
        name="to-grpcio", source=distsrv_pb2.TaskId(job="localhost", index=0), timeout_millis=5000
    )
    chunks = list(stub.RecvTensor(request, timeout=10))
    header = chunks[0].header
    assert header.dtype == distsrv_pb2.DT_FLOAT
    assert [d.size for d in header.shape.dim] == [30, 100]
    payload = b"".join(c.data for c in chunks[1:])
    np.testing.assert_array_equal(np.frombuffer(payload, np.float32).reshape(30, 100), array * 2)


def test_stock_client_recv_times_out(channel) -> None:
    stub = distsrv_pb2_grpc.WorkerStub(channel)
    request = distsrv_pb2.RecvTensorRequest(
        name="nothing", source=distsrv_pb2.TaskId(job="localhost", index=0), timeout_millis=100
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.RecvTensor(request, timeout=10))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_stock_client_recv_of_an_overlong_name_is_refused(local_server, channel) -> None:
    stub = distsrv_pb2_grpc.WorkerStub(channel)
    request = distsrv_pb2.RecvTensorRequest(
        name="n" * (1 << 20), source=distsrv_pb2.TaskId(job="localhost", index=0)
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.RecvTensor(request, timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert "tensor name" in raised.value.details()
    with pytest.raises(errors.InvalidArgumentError, match="tensor name"):
        local_server.send("n" * (1 << 20), np.ones(2), to=local_server.task)
    local_server.send("short", np.ones(2), to=local_server.task)
    assert local_server.recv("short", source=local_server.task, timeout=5).tolist() == [1, 1]


def test_a_stalled_stream_is_given_up_and_its_reservation_freed() -> None:
    config = distsrv.ServerConfig(max_pending_bytes=1 << 20, peer_timeout=0.5, peer_share=1.0)
    with distsrv.Server.create_local_server(config=config) as server:
        release = threading.Event()

        def stalling() -> Iterator[distsrv_pb2.TensorChunk]:
            chunks = _chunks("stalled", np.zeros(200_000, np.float32), chunk=4000)
            yield next(chunks)  # the header: 800 kB reserved
            yield next(chunks)
            release.wait(30)  # then nothing

        with grpc.insecure_channel(server.address) as channel:
            stub = distsrv_pb2_grpc.WorkerStub(channel)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pushing = pool.submit(stub.SendTensor, stalling(), timeout=30)
                with pytest.raises(grpc.RpcError) as raised:
                    pushing.result(timeout=20)
                release.set()
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, raised.value.details()
        assert "sent nothing" in raised.value.details()
        # The stalled stream's 800 kB are free again, and nothing of it was delivered.
        server.send("after", np.zeros(200_000, np.float32), to=server.task)
        with pytest.raises(errors.DeadlineExceededError):
            server.recv("stalled", source=server.task, timeout=0.1)


def _bad_streams() -> Iterator[tuple[str, list[distsrv_pb2.TensorChunk], grpc.StatusCode]]:
    good = list(_chunks("bad", np.arange(100, dtype=np.float64), chunk=200))
    yield "truncated", good[:-1], grpc.StatusCode.DATA_LOSS
    yield "too long", [*good, distsrv_pb2.TensorChunk(data=b"x")], grpc.StatusCode.INVALID_ARGUMENT
    wrong_size = distsrv_pb2.TensorChunk()
    wrong_size.CopyFrom(good[0])
    wrong_size.header.total_bytes = 799
    yield "size disagrees", [wrong_size, *good[1:]], grpc.StatusCode.INVALID_ARGUMENT
    no_header = good[1:]
    yield "no header", no_header, grpc.StatusCode.INVALID_ARGUMENT
    bad_dtype = distsrv_pb2.TensorChunk()
    bad_dtype.CopyFrom(good[0])
    bad_dtype.header.dtype = distsrv_pb2.DT_STRING
    yield "string dtype", [bad_dtype, *good[1:]], grpc.StatusCode.INVALID_ARGUMENT
    stranger = distsrv_pb2.TensorChunk()
    stranger.CopyFrom(good[0])
    stranger.header.source.job = "nobody"
    yield "unknown source", [stranger, *good[1:]], grpc.StatusCode.INVALID_ARGUMENT
    long_name = distsrv_pb2.TensorChunk()
    long_name.CopyFrom(good[0])
    long_name.header.name = "n" * (40 << 10)
    yield "long name", [long_name, *good[1:]], grpc.StatusCode.INVALID_ARGUMENT
    high_rank = distsrv_pb2.TensorChunk()
    high_rank.CopyFrom(good[0])
    del high_rank.header.shape.dim[:]
    high_rank.header.shape.dim.extend([distsrv_pb2.TensorShapeProto.Dim(size=1)] * 65)
    high_rank.header.shape.dim[0].size = 100
    yield "rank 65", [high_rank, *good[1:]], grpc.StatusCode.INVALID_ARGUMENT
    yield "empty", [], grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("case", list(_bad_streams()), ids=lambda c: c[0])
def test_bad_streams_are_refused_and_nothing_is_delivered(local_server, channel, case) -> None:
    _, stream, code = case
    stub = distsrv_pb2_grpc.WorkerStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.SendTensor(iter(stream), timeout=10)
    assert raised.value.code() == code, raised.value.details()
    with pytest.raises(errors.DeadlineExceededError):
        local_server.recv("bad", source=local_server.task, timeout=0.1)
    # The server keeps serving.
    reply = stub.SendTensor(_chunks("after", np.ones(3)), timeout=10)
    assert reply.received_bytes == 24


def test_ctrl_c_interrupts_a_blocking_recv() -> None:
    script = textwrap.dedent(
        """
        import distsrv
        server = distsrv.Server.create_local_server()
        print("ready", flush=True)
        try:
            server.recv("never", source=server.task)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    started = time.monotonic()
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=10)
    assert "interrupted" in out, err
    assert child.returncode == 0, err
    assert time.monotonic() - started < 5


def test_receive_from_many_threads_while_stopping(pair) -> None:
    _, b = pair
    outcomes: list[BaseException] = []

    def wait() -> None:
        try:
            b.recv("shutdown", source=A, timeout=20)
        except errors.OpError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=wait) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    b.stop(grace=0)
    for thread in threads:
        thread.join(timeout=10)
    assert len(outcomes) == 4
    assert all(isinstance(e, errors.CancelledError) for e in outcomes), outcomes


# -- receiving from any source, objects ----------------------------------------------------------


def test_recv_any_takes_whichever_source_sends_first() -> None:
    spec = pair_cluster(3)
    config = distsrv.ServerConfig(connect_timeout=2.0)
    servers = [distsrv.Server(spec, "worker", index, config=config) for index in range(3)]
    try:
        receiver, first, second = servers
        first.send("grad", np.array([1]), to=receiver.task)
        source, array = receiver.recv_any("grad", timeout=10)
        assert (source, int(array[0])) == ("/job:worker/task:1", 1)
        second.send("grad", np.array([2]), to=receiver.task)
        first.send("grad", np.array([3]), to=receiver.task)
        sources = [B, ("worker", 2)]
        got = [receiver.recv_any("grad", sources=sources, timeout=10) for _ in range(2)]
        assert {(task, int(value[0])) for task, value in got} == {
            ("/job:worker/task:1", 3),
            ("/job:worker/task:2", 2),
        }
        with pytest.raises(errors.DeadlineExceededError, match="from any of 2 sources"):
            receiver.recv_any("grad", sources=[B, ("worker", 2)], timeout=0.2)
        with pytest.raises(errors.InvalidArgumentError, match="no sources"):
            receiver.recv_any("grad", sources=[])
    finally:
        for server in servers:
            server.stop(grace=0)


def test_recv_any_loses_nothing_to_the_sources_it_did_not_take(pair) -> None:
    a, b = pair
    # Both sources' tensors are there at once: one is taken, the other stays for the next receive.
    a.send("x", np.array([10]), to=b.task)
    b.send("x", np.array([20]), to=b.task)
    taken = [b.recv_any("x", sources=[A, B], timeout=10) for _ in range(2)]
    assert sorted(int(array[0]) for _, array in taken) == [10, 20]
    with pytest.raises(errors.DeadlineExceededError):
        b.recv_any("x", sources=[A, B], timeout=0.1)


def test_recv_any_outlives_a_lost_source() -> None:
    spec = pair_cluster(3)
    config = distsrv.ServerConfig(connect_timeout=2.0, peer_timeout=0.5)
    receiver = distsrv.Server(spec, "worker", 0, config=config)
    doomed = distsrv.Server(spec, "worker", 1, config=config)
    survivor = distsrv.Server(spec, "worker", 2, config=config)
    try:
        receiver.wait_for_cluster(timeout=10)
        got: list[tuple[str, np.ndarray]] = []
        waiting = threading.Thread(target=lambda: got.append(receiver.recv_any("y", timeout=20)))
        waiting.start()
        doomed.stop(grace=0)
        time.sleep(1.5)  # past peer_timeout: the lost source is waited on no more
        survivor.send("y", np.array([5]), to=receiver.task)
        waiting.join(20)
        assert [(task, int(array[0])) for task, array in got] == [("/job:worker/task:2", 5)]
        with pytest.raises(errors.UnavailableError):
            receiver.recv_any("y", sources=[B], timeout=10)
    finally:
        for server in (receiver, doomed, survivor):
            server.stop(grace=0)


OBJECTS = [
    None,
    {"epoch": 3, "loss": 0.25, "tags": ["a", "b"], "ok": True, "raw": b"\x00\xff"},
    [1, [2, [3, {"deep": "yes"}]]],
    "plain text",
]


@pytest.mark.parametrize("value", OBJECTS, ids=["none", "dict", "nested", "str"])
def test_objects_travel_by_the_value_codec(pair, value) -> None:
    a, b = pair
    a.send_object("config", value, to=b.task)
    assert b.recv_object("config", source=A, timeout=10) == value


def test_an_object_may_hold_arrays_and_tuples_arrive_as_lists(pair) -> None:
    a, b = pair
    a.send_object("state", {"weights": np.arange(4.0), "shape": (2, 2)}, to=b.task)
    got = b.recv_object("state", source=A, timeout=10)
    np.testing.assert_array_equal(got["weights"], np.arange(4.0))
    assert got["shape"] == [2, 2]


def test_objects_the_codec_cannot_carry_are_refused_before_sending(pair) -> None:
    a, b = pair

    class Custom:
        pass

    with pytest.raises(TypeError):
        a.send_object("bad", Custom(), to=b.task)
    with pytest.raises(TypeError):
        a.send_object("bad", {1: "not a str key"}, to=b.task)
    with pytest.raises(errors.DeadlineExceededError):
        b.recv_object("bad", source=A, timeout=0.1)


def test_a_tensor_that_is_not_an_object_is_refused_by_recv_object(pair) -> None:
    a, b = pair
    a.send("config", np.ones(3, np.float32), to=b.task)
    with pytest.raises(errors.InvalidArgumentError, match="where an object was due"):
        b.recv_object("config", source=A, timeout=10)
    a.send("config", np.frombuffer(b"\xff\xff\xff", np.uint8), to=b.task)
    with pytest.raises(errors.InvalidArgumentError, match="object's values"):
        b.recv_object("config", source=A, timeout=10)


def test_broadcast_object_gives_every_member_the_roots_value(pair) -> None:
    a, b = pair
    value = {"seed": 1234, "vocab": ["x", "y"]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        root = pool.submit(a.broadcast_object, value, A, timeout=10)
        other = pool.submit(b.broadcast_object, None, A, timeout=10)
        assert root.result() == value
        assert other.result() == value


def test_import_leaves_ml_dtypes_until_bfloat16_is_used() -> None:
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import distsrv
        assert "ml_dtypes" not in sys.modules, "imported with distsrv"
        server = distsrv.Server.create_local_server()
        server.send("f", np.ones(2, np.float32), to=server.task)
        server.recv("f", source=server.task, timeout=10)
        assert "ml_dtypes" not in sys.modules, "imported by a float32 exchange"
        import ml_dtypes
        server.send("b", np.array([1.5, -2.0], ml_dtypes.bfloat16), to=server.task)
        got = server.recv("b", source=server.task, timeout=10)
        print(got.dtype, got.tolist())
        server.stop()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["bfloat16", "[1.5,", "-2.0]"]


def test_a_bfloat16_arriving_loads_its_dtype() -> None:
    # The receiving side of a bfloat16 tensor may never have imported ml_dtypes itself.
    script = (
        "import sys, distsrv; print(distsrv.tensors.CODE_DTYPES[14], 'ml_dtypes' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["bfloat16", "True"]
