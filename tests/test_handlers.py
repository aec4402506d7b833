"""Remote operations: handlers called by name with keyword arguments, the Value encoding, the
errors a caller sees, concurrency and limits, and a stock grpcio client calling a handler."""

from __future__ import annotations

import asyncio
import functools
import pickle
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import distsrv_pb2 as pb
import distsrv_pb2_grpc
import grpc
import numpy as np
import pytest
from conftest import pair_cluster

import distsrv
from distsrv import errors, tensors


def echo(value: Any) -> Any:
    return value


def add(x: Any, y: Any) -> Any:
    return x + y


@pytest.fixture(params=[True, False], ids=["same-host-link", "grpc"])
def server(request: pytest.FixtureRequest) -> Iterator[distsrv.Server]:
    """A server whose calls to itself go through its same-host link, or over gRPC."""
    config = distsrv.ServerConfig(shared_memory=request.param)
    server = distsrv.Server.create_local_server(config, handlers={"echo": echo, "add": add})
    yield server
    server.stop(grace=0)


@pytest.fixture
def stub(server: distsrv.Server) -> Iterator[distsrv_pb2_grpc.WorkerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield distsrv_pb2_grpc.WorkerStub(channel)


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types all the way down (arrays: dtype, shape and bytes)."""
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and np.isnan(a):
        return bool(np.isnan(b))
    return bool(a == b)


# -- the encoding ---------------------------------------------------------------------------------

SCALARS = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    0.0,
    -2.5,
    float("inf"),
    float("nan"),
    1e308,
    "",
    "ascii",
    "unicode: é ✓ 日本語 🚀",
    "nul\x00inside",
    b"",
    b"\x00\xffbytes",
]


@pytest.mark.parametrize("value", SCALARS, ids=repr)
def test_scalars_round_trip(server: distsrv.Server, value: Any) -> None:
    assert same(server.call(server.task, "echo", value=value), value)


@pytest.mark.parametrize(
    "value",
    [
        [],
        {},
        [[], {}, [[]]],
        {"": None, "ключ": [1, "two", 3.0, b"4", None, True]},
        {"b": 1, "a": 2},  # order kept
        [{"deep": [{"deeper": [[[[{"deepest": "here"}]]]]}]}],
        {"array": np.arange(6, dtype=np.int16).reshape(2, 3), "items": [np.ones(2), "x"]},
        list(range(10_000)),
    ],
    ids=["empty list", "empty dict", "nested empties", "mixed", "order", "deep", "arrays", "long"],
)
def test_containers_round_trip(server: distsrv.Server, value: Any) -> None:
    assert same(server.call(server.task, "echo", value=value), value)


def test_tuples_arrive_as_lists_and_bytearrays_as_bytes(server: distsrv.Server) -> None:
    assert same(server.call(server.task, "echo", value=(1, (2,))), [1, [2]])
    assert same(server.call(server.task, "echo", value=bytearray(b"ab")), b"ab")


@pytest.mark.parametrize("dtype", tensors.supported_dtypes(), ids=str)
def test_arrays_of_every_dtype_round_trip(server: distsrv.Server, dtype: np.dtype[Any]) -> None:
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    assert same(server.call(server.task, "echo", value=array), array)


@pytest.mark.parametrize(
    "array",
    [
        np.array(3.5),
        np.zeros((0, 3), np.float32),
        np.arange(20, dtype=np.int64)[::3],
        np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        np.arange(4, dtype=">i4"),
    ],
    ids=["0-d", "empty", "strided", "fortran", "big-endian"],
)
def test_array_layouts_round_trip(server: distsrv.Server, array: np.ndarray) -> None:
    got = server.call(server.task, "echo", value=array)
    assert got.shape == array.shape
    assert got.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable


def test_numpy_scalars_arrive_as_0d_arrays(server: distsrv.Server) -> None:
    assert same(server.call(server.task, "echo", value=np.float32(1.5)), np.array(1.5, np.float32))
    assert same(server.call(server.task, "echo", value=np.int64(-3)), np.array(-3, np.int64))
    assert same(server.call(server.task, "echo", value=np.float64(0.5)), 0.5)  # a float subclass


def test_a_large_array_round_trips(server: distsrv.Server) -> None:
    array = np.random.default_rng(0).random(4 << 20, dtype=np.float32)  # 16 MiB each way
    got = server.call(server.task, "echo", value=array)
    np.testing.assert_array_equal(got, array)


def test_array_arguments_are_read_in_place_until_the_call_is_over(server: distsrv.Server) -> None:
    # numpy refuses to resize an array something else still refers to: here, the call.
    array = np.arange(1 << 20, dtype=np.float32)
    got = server.call(server.task, "echo", value=[array, {"every other": array[::2]}])
    np.testing.assert_array_equal(got[0], array)
    np.testing.assert_array_equal(got[1]["every other"], array[::2])
    array.resize(5)
    held = np.arange(1 << 20, dtype=np.float32)
    handle = server.icall(server.task, "echo", value=held)
    with pytest.raises(ValueError, match="resize"):
        held.resize(5)
    np.testing.assert_array_equal(handle.wait(10), np.arange(1 << 20, dtype=np.float32))
    held.resize(5)
    dropped = np.arange(1 << 20, dtype=np.float32)
    del handle
    handle = server.icall(server.task, "echo", value=dropped)
    del handle
    dropped.resize(5)


def test_large_arrays_arrive_whole_and_writable_both_ways(server: distsrv.Server) -> None:
    # Over gRPC the first large array stays in the buffer the message arrived in, the others
    # (and small ones) are copied out of it: each must still be its own, whole and writable.
    def double(first: np.ndarray, second: np.ndarray, small: np.ndarray) -> list[np.ndarray]:
        for array in (first, second, small):
            array *= 2
        return [first, second, small]

    server.add_handler("double", double)
    first = np.arange(1 << 18, dtype=np.float64)
    second = np.arange(1 << 18, dtype=np.int32)
    small = np.arange(5, dtype=np.int16)
    got = server.call(server.task, "double", first=first, second=second, small=small)
    for sent, back in zip((first, second, small), got, strict=True):
        np.testing.assert_array_equal(back, sent * 2)
        assert back.dtype == sent.dtype
        assert back.flags.writeable
        assert back.flags.aligned
        back[0] = 7
    np.testing.assert_array_equal(first, np.arange(1 << 18, dtype=np.float64))


def test_calls_past_the_message_limit_are_refused_and_the_server_goes_on() -> None:
    config = distsrv.ServerConfig(shared_memory=False, max_message_bytes=1 << 20)
    big = np.zeros(1 << 20, np.uint8)
    handlers = {"echo": echo, "make": lambda n: np.zeros(n, np.uint8)}
    with distsrv.Server.create_local_server(config, handlers=handlers) as server:
        with pytest.raises(errors.ResourceExhaustedError, match="max_message_bytes"):
            server.call(server.task, "echo", value=big)
        with pytest.raises(errors.ResourceExhaustedError, match="max_message_bytes"):
            server.call(server.task, "make", n=1 << 20)
        with grpc.insecure_channel(server.address) as channel:
            stub = distsrv_pb2_grpc.WorkerStub(channel)
            tensor = pb.TensorProto(
                dtype=pb.DT_UINT8,
                tensor_shape=pb.TensorShapeProto(dim=[pb.TensorShapeProto.Dim(size=big.size)]),
                tensor_content=big.tobytes(),
            )
            request = pb.CallRequest(
                op="echo",
                kwargs=pb.DictValue(
                    entries=[pb.DictEntry(key="value", value=pb.Value(tensor_value=tensor))]
                ),
            )
            with pytest.raises(grpc.RpcError) as raised:
                stub.Call(request, timeout=10)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        np.testing.assert_array_equal(server.call(server.task, "echo", value=big[:1000]), 0)


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (2**63, "64 bits"),
        (-(2**63) - 1, "64 bits"),
        ({1, 2}, "set"),
        (object(), "object"),
        ({1: "int key"}, "keys must be str"),
        ([1, {"nested": {2: 3}}], "keys must be str"),
        (np.array(["a"], dtype=object), "dtype object"),
        (1j, "complex"),
    ],
    ids=[
        "too big",
        "too small",
        "set",
        "object",
        "int key",
        "nested int key",
        "object array",
        "1j",
    ],
)
def test_what_cannot_be_encoded_is_a_type_error_before_sending(value: Any, complaint: str) -> None:
    calls: list[Any] = []
    with distsrv.Server.create_local_server(handlers={"record": calls.append}) as server:
        with pytest.raises(TypeError, match=complaint):
            server.call(server.task, "record", value=value)
        assert calls == []


def test_self_containing_and_too_deep_values_are_type_errors(server: distsrv.Server) -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="nested"):
        server.call(server.task, "echo", value=loop)
    deep: Any = "bottom"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(TypeError, match="nested"):
        server.call(server.task, "echo", value=deep)


# -- errors ---------------------------------------------------------------------------------------


def test_an_unknown_op_is_unimplemented(server: distsrv.Server) -> None:
    with pytest.raises(errors.UnimplementedError, match="nope") as raised:
        server.call(server.task, "nope")
    assert raised.value.task == server.task
    assert server.call(server.task, "add", x=1, y=2) == 3


def test_a_handler_exception_is_a_remote_error_with_type_message_and_task(
    server: distsrv.Server,
) -> None:
    with pytest.raises(errors.RemoteError) as raised:
        server.call(server.task, "add", x=1, y="a")
    error = raised.value
    assert isinstance(error, errors.UnknownError)
    assert error.error_code == errors.UNKNOWN
    assert error.remote_type == "TypeError"
    assert "unsupported operand" in error.message
    assert error.task == server.task
    assert str(error) == f"task {server.task}: TypeError: {error.message}"
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.remote_type, again.message, again.task) == (
        errors.RemoteError,
        "TypeError",
        error.message,
        server.task,
    )
    assert server.call(server.task, "add", x=1, y=2) == 3


class Custom(Exception):
    pass


def test_user_exception_types_are_named_with_their_module(server: distsrv.Server) -> None:
    def fail(text: str) -> None:
        raise Custom(text)

    server.add_handler("fail", fail)
    with pytest.raises(errors.RemoteError, match="ü") as raised:
        server.call(server.task, "fail", text="ü")
    assert raised.value.remote_type == f"{__name__}.Custom"


def test_a_distsrv_error_raised_by_a_handler_keeps_its_class(server: distsrv.Server) -> None:
    def lookup(key: str) -> None:
        raise errors.NotFoundError(f"no key {key!r}")

    server.add_handler("lookup", lookup)
    with pytest.raises(errors.NotFoundError, match="no key 'k'") as raised:
        server.call(server.task, "lookup", key="k")
    assert raised.value.task == server.task


def test_an_unencodable_result_is_the_handler_s_type_error(server: distsrv.Server) -> None:
    server.add_handler("bad", lambda: {1, 2})
    with pytest.raises(errors.RemoteError, match="set") as raised:
        server.call(server.task, "bad")
    assert raised.value.remote_type == "TypeError"


def test_missing_arguments_are_the_handler_s_type_error(server: distsrv.Server) -> None:
    with pytest.raises(errors.RemoteError, match="y") as raised:
        server.call(server.task, "add", x=1)
    assert raised.value.remote_type == "TypeError"


def test_blocked_handlers_are_permission_denied() -> None:
    with distsrv.Server.create_local_server(
        handlers={"add": add, "echo": echo}, blocked_handlers=["add", "never-added"]
    ) as server:
        assert server.blocked_handlers == {"add", "never-added"}
        for op in ("add", "never-added"):
            with pytest.raises(errors.PermissionDeniedError, match=op):
                server.call(server.task, op, x=1, y=2)
        assert server.call(server.task, "echo", value=1) == 1


def test_a_timeout_is_deadline_exceeded_and_the_server_goes_on(server: distsrv.Server) -> None:
    release = threading.Event()
    server.add_handler("wait", lambda: release.wait(10))
    began = time.monotonic()
    with pytest.raises(errors.DeadlineExceededError):
        server.call(server.task, "wait", timeout=0.2)
    assert time.monotonic() - began < 5
    assert server.call(server.task, "add", x=1, y=2) == 3
    release.set()


def test_calls_need_a_running_server_and_a_known_task() -> None:
    server = distsrv.Server.create_local_server(start=False, handlers={"echo": echo})
    try:
        with pytest.raises(errors.FailedPreconditionError):
            server.call(server.task, "echo", value=1)
        server.start()
        with pytest.raises(errors.OpError, match="ps"):
            server.call("/job:ps/task:0", "echo", value=1)
    finally:
        server.stop()


# -- handlers -------------------------------------------------------------------------------------


def test_handlers_are_added_and_removed_while_running(server: distsrv.Server) -> None:
    server.add_handler("mul", lambda x, y: x * y)
    assert server.call(server.task, "mul", x=6, y=7) == 42
    server.add_handler("mul", lambda x, y: -x * y)
    assert server.call(server.task, "mul", x=6, y=7) == -42
    server.remove_handler("mul")
    with pytest.raises(errors.UnimplementedError):
        server.call(server.task, "mul", x=6, y=7)
    with pytest.raises(KeyError):
        server.remove_handler("mul")
    assert set(server.handlers) == {"echo", "add"}
    with pytest.raises(TypeError):
        server.handlers["x"] = echo  # type: ignore[index]
    with pytest.raises(TypeError):
        server.add_handler("x", "not callable")  # type: ignore[arg-type]


def test_arguments_named_like_call_s_own_parameters(server: distsrv.Server) -> None:
    server.add_handler("which", lambda task, op: (task, op))
    assert server.call(server.task, "which", task="t", op="o") == ["t", "o"]


def test_handlers_may_call_operations_themselves(server: distsrv.Server) -> None:
    async def quadruple(x: int) -> Any:
        return await server.acall(server.task, "twice", x=2 * x)

    server.add_handler("twice", lambda x: server.call(server.task, "add", x=x, y=x))
    server.add_handler("quadruple", quadruple)
    assert server.call(server.task, "twice", x=4) == 8
    assert server.call(server.task, "quadruple", x=5) == 20


def test_a_context_parameter_gets_the_caller_and_metadata(server: distsrv.Server) -> None:
    def whoami(context: distsrv.CallContext, extra: int = 0) -> Any:
        return [context.op, context.caller, dict(context.metadata), extra]

    server.add_handler("whoami", whoami)
    op, caller, metadata, extra = server.call(server.task, "whoami", extra=1)
    assert (op, caller, extra) == ("whoami", server.task, 1)
    assert not any(key.startswith("grpc-") for key in metadata)
    with pytest.raises(errors.InvalidArgumentError, match="context"):
        server.call(server.task, "whoami", context="mine")


def test_async_handlers_run_concurrently_on_the_server_s_loop(server: distsrv.Server) -> None:
    threads: set[str] = set()

    async def nap(seconds: float, value: Any) -> Any:
        threads.add(threading.current_thread().name)
        await asyncio.sleep(seconds)
        return value

    async def context_too(context: distsrv.CallContext) -> str | None:
        return context.caller

    async def fail() -> None:
        raise KeyError("gone")

    server.add_handler("nap", nap)
    server.add_handler("partial", functools.partial(nap, 0))
    server.add_handler("context", context_too)
    server.add_handler("fail", fail)
    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        naps = list(
            pool.map(lambda i: server.call(server.task, "nap", seconds=0.5, value=i), range(8))
        )
    assert naps == list(range(8))
    assert time.monotonic() - began < 3  # 8 x 0.5 s one after another would be 4 s
    assert len(threads) == 1
    assert server.call(server.task, "partial", value="p") == "p"
    assert server.call(server.task, "context") == server.task
    with pytest.raises(errors.RemoteError, match="gone") as raised:
        server.call(server.task, "fail")
    assert raised.value.remote_type == "KeyError"
    server.stop()
    assert not any(t.name.startswith("distsrv-handlers") for t in threading.enumerate())


def test_an_async_handler_still_running_at_stop_is_cancelled() -> None:
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(60)

    server = distsrv.Server.create_local_server(handlers={"forever": forever})
    pending = server.icall(server.task, "forever")
    assert started.wait(10)
    server.stop(grace=0.1)
    with pytest.raises(errors.OpError):
        pending.wait(10)


# -- concurrency and limits -----------------------------------------------------------------------


def test_many_threads_call_at_once(server: distsrv.Server) -> None:
    def work(i: int) -> list[Any]:
        return [server.call(server.task, "add", x=i, y=j) for j in range(25)]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(work, range(32)))
    assert results == [[i + j for j in range(25)] for i in range(32)]


def test_a_blocked_handler_does_not_hold_up_the_others(server: distsrv.Server) -> None:
    release = threading.Event()
    server.add_handler("slow", lambda: release.wait(30))
    slow = [server.icall(server.task, "slow") for _ in range(4)]
    began = time.monotonic()
    assert [server.call(server.task, "add", x=i, y=1) for i in range(50)] == list(range(1, 51))
    assert time.monotonic() - began < 5
    assert not any(handle.done() for handle in slow)
    release.set()
    assert [handle.wait(10) for handle in slow] == [True] * 4


def test_calls_past_the_connection_limit_are_refused_not_queued() -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow() -> None:
        entered.release()
        release.wait(30)

    # One caller, so the task's whole limit is its share.
    config = distsrv.ServerConfig(connection_limit=2, peer_share=1.0)
    with distsrv.Server.create_local_server(
        config, handlers={"slow": slow, "echo": echo}
    ) as server:
        held = [server.icall(server.task, "slow") for _ in range(2)]
        for _ in held:
            assert entered.acquire(timeout=10)
        with pytest.raises(errors.ResourceExhaustedError, match="connection_limit"):
            server.call(server.task, "echo", value=1, timeout=10)
        release.set()
        for handle in held:
            handle.wait(10)
        assert server.call(server.task, "echo", value=1) == 1


def test_a_caller_that_stalls_mid_request_gives_its_slot_back() -> None:
    # Slow-loris: calls that send their headers and then nothing would hold every slot.
    config = distsrv.ServerConfig(connection_limit=2, peer_timeout=0.5, peer_share=1.0)
    with distsrv.Server.create_local_server(config, handlers={"echo": echo}) as server:
        never = threading.Event()

        def nothing() -> Iterator[bytes]:
            never.wait(30)
            yield b""

        with grpc.insecure_channel(server.address) as channel:
            stalled = channel.stream_unary("/distsrv.v1.Worker/Call")
            calls = [stalled.future(nothing(), timeout=30) for _ in range(2)]
            codes = [call.exception(timeout=10).code() for call in calls]
        never.set()
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
        assert server.call(server.task, "echo", value=1, timeout=10) == 1


def test_the_asyncio_form(server: distsrv.Server) -> None:
    async def main() -> list[Any]:
        return await asyncio.gather(
            *(server.acall(server.task, "add", x=i, y=i) for i in range(10))
        )

    assert asyncio.run(main()) == [2 * i for i in range(10)]


def test_stopping_the_caller_cancels_its_calls_in_flight() -> None:
    cluster = pair_cluster(2)
    release = threading.Event()
    a = distsrv.Server(cluster, "worker", 0)
    b = distsrv.Server(cluster, "worker", 1, handlers={"wait": lambda: release.wait(30)})
    try:
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                a.call(b.task, "wait")
            except errors.OpError as error:
                outcome.append(error)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.3)
        began = time.monotonic()
        a.stop(grace=0)
        caller.join(10)
        assert time.monotonic() - began < 5
        assert [type(error) for error in outcome] == [errors.CancelledError]
    finally:
        release.set()
        a.stop(grace=0)
        b.stop(grace=0)


def established_connections_to(port: int) -> int:
    """Established TCP connections to ``port`` on this machine (IPv4), from /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "01")


def test_calls_between_tasks_share_one_connection_beside_the_heartbeat() -> None:
    cluster = pair_cluster(2)
    a = distsrv.Server(cluster, "worker", 0, handlers={"echo": echo})
    b = distsrv.Server(cluster, "worker", 1, handlers={"add": add})
    try:
        with ThreadPoolExecutor(8) as pool:
            sums = list(pool.map(lambda i: a.call(("worker", 1), "add", x=i, y=1), range(200)))
        assert sums == list(range(1, 201))
        assert b.call(a.task, "echo", value="back") == "back"
        # One carries every call; the other is a's heartbeat of b, which watches b while calls
        # wait on it (on the server's runtime, where the calls run on the callers').
        assert established_connections_to(b.port) == 2
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


# -- a stock grpcio client ------------------------------------------------------------------------


def test_a_stock_grpcio_client_calls_a_handler_by_name(
    server: distsrv.Server, stub: distsrv_pb2_grpc.WorkerStub
) -> None:
    def total(values: np.ndarray, offset: int, context: distsrv.CallContext) -> dict[str, Any]:
        return {"sum": float(values.sum()) + offset, "caller": context.caller, **context.metadata}

    server.add_handler("total", total)
    values = np.arange(4, dtype=np.float32)
    tensor = pb.TensorProto(
        dtype=pb.DT_FLOAT,
        tensor_shape=pb.TensorShapeProto(dim=[pb.TensorShapeProto.Dim(size=4)]),
        tensor_content=values.tobytes(),
    )
    request = pb.CallRequest(
        op="total",
        kwargs=pb.DictValue(
            entries=[
                pb.DictEntry(key="values", value=pb.Value(tensor_value=tensor)),
                pb.DictEntry(key="offset", value=pb.Value(int_value=10)),
            ]
        ),
    )
    response = stub.Call(request, timeout=10, metadata=[("x-trace", "abc")])
    entries = {e.key: e.value for e in response.result.dict_value.entries}
    assert entries["sum"].float_value == 16.0
    assert entries["caller"].WhichOneof("kind") == "null_value"
    assert entries["x-trace"].string_value == "abc"


def test_a_stock_client_s_large_array_arrives_whole_wherever_it_lies(
    server: distsrv.Server, stub: distsrv_pb2_grpc.WorkerStub
) -> None:
    # A stock client pads nothing: its array lands at whatever offset its op and key put it,
    # aligned or not, and is copied where it is not.
    values = np.arange(1 << 16, dtype=np.float32)
    tensor = pb.TensorProto(
        dtype=pb.DT_FLOAT,
        tensor_shape=pb.TensorShapeProto(dim=[pb.TensorShapeProto.Dim(size=values.size)]),
        tensor_content=values.tobytes(),
    )
    for key in ("v", "vv", "vvv", "vvvv"):
        server.add_handler(key, lambda **kwargs: float(next(iter(kwargs.values())).sum()))
        request = pb.CallRequest(
            op=key,
            kwargs=pb.DictValue(
                entries=[pb.DictEntry(key=key, value=pb.Value(tensor_value=tensor))]
            ),
        )
        assert stub.Call(request, timeout=10).result.float_value == float(values.sum())


def test_a_stock_client_sees_statuses_and_the_remote_exception(
    server: distsrv.Server, stub: distsrv_pb2_grpc.WorkerStub
) -> None:
    def call(op: str, **kwargs: pb.Value) -> grpc.RpcError:
        entries = [pb.DictEntry(key=k, value=v) for k, v in kwargs.items()]
        with pytest.raises(grpc.RpcError) as raised:
            stub.Call(pb.CallRequest(op=op, kwargs=pb.DictValue(entries=entries)), timeout=10)
        return raised.value

    failed = call("add", x=pb.Value(int_value=1), y=pb.Value(string_value="a"))
    assert failed.code() == grpc.StatusCode.UNKNOWN
    assert "unsupported operand" in failed.details()
    trailers = dict(failed.trailing_metadata())
    assert trailers["distsrv-error-type"] == "TypeError"
    assert trailers["distsrv-error-task"] == "/job:localhost/task:0"

    assert call("nope").code() == grpc.StatusCode.UNIMPLEMENTED
    # Bad payloads: a Value with no kind, a tensor whose bytes do not match its shape, a repeated
    # key, a negative dimension.
    bad_tensor = pb.TensorProto(
        dtype=pb.DT_FLOAT, tensor_shape=pb.TensorShapeProto(dim=[pb.TensorShapeProto.Dim(size=3)])
    )
    negative = pb.TensorProto(
        dtype=pb.DT_FLOAT, tensor_shape=pb.TensorShapeProto(dim=[pb.TensorShapeProto.Dim(size=-1)])
    )
    repeated = pb.DictValue(
        entries=[pb.DictEntry(key="k", value=pb.Value(int_value=i)) for i in range(2)]
    )
    for value in [
        pb.Value(),
        pb.Value(tensor_value=bad_tensor),
        pb.Value(tensor_value=negative),
        pb.Value(dict_value=repeated),
        pb.Value(tensor_value=pb.TensorProto(dtype=pb.DT_STRING)),
    ]:
        failed = call("echo", value=value)
        assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT, (value, failed)
    # The server went on serving through all of it.
    ok = stub.Call(
        pb.CallRequest(
            op="echo",
            kwargs=pb.DictValue(
                entries=[pb.DictEntry(key="value", value=pb.Value(null_value=pb.NULL_VALUE))]
            ),
        ),
        timeout=10,
    )
    assert ok.result.WhichOneof("kind") == "null_value"


def test_bytes_that_are_not_a_call_request_are_refused(server: distsrv.Server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/distsrv.v1.Worker/Call")
        with pytest.raises(grpc.RpcError) as raised:
            raw(b"\xff\xff\xff", timeout=10)
    # distsrv decodes a call itself (to hold its values to their limits first), and calls a
    # body it cannot decode what it is, as for SendTensor (test_wire.py).
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "undecodable" in (raised.value.details() or "")
    assert server.call(server.task, "add", x=1, y=2) == 3


def _nested_lists(depth: int) -> pb.Value:
    value = pb.Value(null_value=pb.NULL_VALUE)
    for _ in range(depth):
        value = pb.Value(list_value=pb.ListValue(items=[value]))
    return value


def test_a_call_of_too_many_or_too_deep_values_is_refused_before_decoding(
    server: distsrv.Server,
) -> None:
    # Two bytes per empty Value on the wire, seventy once decoded: a million and one of them
    # (2 MB) would be refused by count, not by size; 33 nested lists by depth.
    bomb = pb.Value(list_value=pb.ListValue(items=[pb.Value()] * ((1 << 20) + 1)))
    cases = [
        (bomb, grpc.StatusCode.RESOURCE_EXHAUSTED, "more than 1048576 values"),
        (_nested_lists(33), grpc.StatusCode.INVALID_ARGUMENT, "more than 32 deep"),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = distsrv_pb2_grpc.WorkerStub(channel)
        for value, code, words in cases:
            request = pb.CallRequest(
                op="echo", kwargs=pb.DictValue(entries=[pb.DictEntry(key="value", value=value)])
            )
            with pytest.raises(grpc.RpcError) as raised:
                stub.Call(request, timeout=30)
            assert raised.value.code() == code
            assert words in (raised.value.details() or "")
        # As deep as Python's encoder goes is served.
        deepest = pb.CallRequest(
            op="echo",
            kwargs=pb.DictValue(entries=[pb.DictEntry(key="value", value=_nested_lists(32))]),
        )
        assert stub.Call(deepest, timeout=10).result.WhichOneof("kind") == "list_value"
    assert server.call(server.task, "add", x=1, y=2) == 3
