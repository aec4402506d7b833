"""Parameter-server variables: created on a host task, read and updated from any task."""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Iterator
from typing import Any

import distsrv_pb2
import distsrv_pb2_grpc
import grpc
import numpy as np
import pytest
from conftest import pair_cluster

import distsrv
from distsrv import errors

A, B = ("worker", 0), ("worker", 1)

try:
    import ml_dtypes

    BFLOAT16: Any = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
    BFLOAT16 = None

FLOAT_DTYPES = [
    pytest.param(np.dtype(np.float16), id="float16"),
    pytest.param(np.dtype(np.float32), id="float32"),
    pytest.param(np.dtype(np.float64), id="float64"),
    pytest.param(
        BFLOAT16,
        id="bfloat16",
        marks=pytest.mark.skipif(BFLOAT16 is None, reason="ml_dtypes is not installed"),
    ),
]


@pytest.fixture
def pair() -> Iterator[tuple[distsrv.Server, distsrv.Server]]:
    """Two tasks of one cluster; variables live on task A unless a test says otherwise."""
    spec = pair_cluster(2)
    config = distsrv.ServerConfig(connect_timeout=2.0)
    a = distsrv.Server(spec, "worker", 0, config=config)
    b = distsrv.Server(spec, "worker", 1, config=config)
    yield a, b
    a.stop(grace=0)
    b.stop(grace=0)


@pytest.fixture(params=["self", "other"])
def user(
    request: pytest.FixtureRequest, pair: tuple[distsrv.Server, distsrv.Server]
) -> distsrv.Server:
    """The task using the variables hosted on A: A itself, or B through the VariableOp RPC."""
    return pair[0] if request.param == "self" else pair[1]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_float_dtype_round_trips(user: distsrv.Server, dtype: np.dtype[Any]) -> None:
    initial = (np.arange(12).reshape(3, 4) * 0.75 - 3).astype(dtype)
    var = user.create_variable(f"w/{dtype}", initial, on=A)
    got = var.read()
    assert got.dtype == dtype
    assert got.shape == (3, 4)
    assert got.tobytes() == initial.tobytes()


@pytest.mark.parametrize(
    "initial",
    [
        np.float64(2.5) * np.ones(()),
        np.zeros((0, 3), np.float32),
        np.arange(6, dtype=np.int64),
        np.array([1 + 2j, 3 - 4j], np.complex64),
        np.array([True, False]),
        np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],
        np.arange(4, dtype=">f8"),
    ],
    ids=["0d", "empty", "int64", "complex64", "bool", "strided", "big-endian"],
)
def test_other_dtypes_and_layouts_round_trip(user: distsrv.Server, initial: np.ndarray) -> None:
    var = user.create_variable("v", initial, on=A)
    got = var.read()
    assert got.shape == initial.shape
    assert got.dtype == initial.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, initial)


def test_the_variable_keeps_its_own_copy(user: distsrv.Server) -> None:
    initial = np.arange(4.0)
    var = user.create_variable("copy", initial, on=A)
    initial[:] = -1
    first = var.read()
    first[:] = 99  # a read is the caller's own, writable array
    np.testing.assert_array_equal(var.read(), [0.0, 1.0, 2.0, 3.0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_updates_follow_numpy(user: distsrv.Server, dtype: np.dtype[Any]) -> None:
    rng = np.random.default_rng(1)
    value = rng.integers(-8, 8, (2, 5)).astype(dtype)
    var = user.create_variable("u", value, on=A)

    value = (rng.integers(-8, 8, (2, 5)) / 4).astype(dtype)
    var.assign(value)
    assert var.read().tobytes() == value.tobytes()

    delta = (rng.integers(-8, 8, (2, 5)) / 2).astype(dtype)
    var.assign_add(delta)
    value = value + delta  # exact: quarters and halves
    assert var.read().tobytes() == value.tobytes()

    gradient = rng.standard_normal((2, 5)).astype(dtype)
    var.sgd_step(gradient, learning_rate=0.125)
    want = value.astype(np.float64) - 0.125 * gradient.astype(np.float64)
    rtol = 1e-12 if dtype == np.float64 else (1e-6 if dtype == np.float32 else 2e-2)
    got = var.read()
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=rtol)


def test_integer_updates_wrap_like_numpy(user: distsrv.Server) -> None:
    var = user.create_variable("counter", np.array([120, -5], np.int8), on=A)
    var.assign_add(np.array([10, 3], np.int8))
    np.testing.assert_array_equal(var.read(), np.array([-126, -2], np.int8))
    var.assign(np.array([7, 8], np.int8))
    np.testing.assert_array_equal(var.read(), [7, 8])


def test_an_sgd_step_on_float32_is_exactly_numpys(user: distsrv.Server) -> None:
    weights = np.array([1.0, 2.0, -3.5, 0.1], np.float32)
    gradient = np.array([10.0, -10.0, 0.3, 7.0], np.float32)
    var = user.create_variable("w", weights, on=A)
    var.sgd_step(gradient, 0.5)
    np.testing.assert_array_equal(var.read(), weights - np.float32(0.5) * gradient)
    var.sgd_step(gradient, 0)  # learning rate 0 leaves it alone
    np.testing.assert_array_equal(var.read(), weights - np.float32(0.5) * gradient)


def test_creating_twice_is_already_exists(pair: tuple[distsrv.Server, distsrv.Server]) -> None:
    a, b = pair
    a.create_variable("once", np.zeros(2), on=A)
    with pytest.raises(errors.AlreadyExistsError, match="once"):
        b.create_variable("once", np.ones(3), on=A)
    with pytest.raises(errors.AlreadyExistsError):
        a.create_variable("once", np.zeros(2), on=A)
    np.testing.assert_array_equal(a.variable("once", on=A).read(), [0.0, 0.0])
    # The same name on another host is another variable.
    b.create_variable("once", np.ones(3), on=B)
    np.testing.assert_array_equal(a.variable("once", on="/job:worker/task:1").read(), np.ones(3))


def test_variables_past_the_hosts_budget_are_refused_and_the_rest_served() -> None:
    # A peer creating variables without end would otherwise grow the host without bound.
    spec = pair_cluster(2)
    config = distsrv.ServerConfig(connect_timeout=2.0, max_pending_bytes=1 << 20)
    with (
        distsrv.Server(spec, "worker", 0, config=config) as host,
        distsrv.Server(spec, "worker", 1, config=config) as peer,
    ):
        # Fifteen of 64 KiB (with names and bookkeeping) fit in 1 MiB.
        for index in range(15):
            peer.create_variable(f"v{index}", np.zeros(64 << 10, np.uint8), on=A)
        with pytest.raises(errors.ResourceExhaustedError, match="max_pending_bytes"):
            peer.create_variable("v15", np.zeros(64 << 10, np.uint8), on=A)
        peer.variable("v0", on=A).assign_add(np.ones(64 << 10, np.uint8))
        assert host.variable("v0", on=A).read().sum() == 64 << 10


def test_unknown_variables_are_not_found(user: distsrv.Server) -> None:
    var = user.variable("missing", on=A)
    with pytest.raises(errors.NotFoundError, match="missing"):
        var.read()
    with pytest.raises(errors.NotFoundError):
        var.assign(np.zeros(2))
    with pytest.raises(errors.NotFoundError):
        var.assign_add(np.zeros(2))
    with pytest.raises(errors.NotFoundError):
        var.sgd_step(np.zeros(2), 0.1)


def test_a_handle_made_before_the_variable_works_once_it_exists(
    pair: tuple[distsrv.Server, distsrv.Server],
) -> None:
    a, b = pair
    early = b.variable("later", on=A)
    assert early.name == "later"
    assert early.host == "/job:worker/task:0"
    assert "later" in repr(early)
    a.create_variable("later", np.array([4.0]), on=A)
    early.assign_add(np.array([1.0]))
    np.testing.assert_array_equal(a.variable("later", on=A).read(), [5.0])


@pytest.mark.parametrize(
    ("op", "value"),
    [
        ("assign", np.zeros(3, np.float64)),
        ("assign", np.zeros((2, 2), np.float32)),
        ("assign_add", np.zeros(3, np.float32)),
        ("assign_add", np.zeros((1, 4), np.float64)),
        ("sgd_step", np.zeros(5, np.float16)),
    ],
    ids=["assign-shape", "assign-both", "add-both", "add-shape", "sgd-shape"],
)
def test_mismatched_updates_are_refused_and_change_nothing(
    user: distsrv.Server, op: str, value: np.ndarray
) -> None:
    initial = np.arange(4, dtype=np.float64)
    var = user.create_variable("m", initial, on=A)
    update = functools.partial(var.sgd_step, learning_rate=0.1) if op == "sgd_step" else None
    with pytest.raises(errors.InvalidArgumentError, match="the update is"):
        (update or getattr(var, op))(value)
    np.testing.assert_array_equal(var.read(), initial)


@pytest.mark.parametrize(
    ("variable_dtype", "update_dtype"),
    [
        (np.float32, np.float64),
        (np.float64, np.float16),
        (np.int8, np.int64),
        (np.int64, np.uint8),
        (np.complex64, np.float64),
        (np.float16, np.bool_),
    ],
)
def test_updates_of_another_dtype_are_cast_as_numpys_same_kind_rule_allows(
    user: distsrv.Server, variable_dtype: type, update_dtype: type
) -> None:
    initial = np.arange(4).astype(variable_dtype)
    update = (np.arange(4) * 3 + 100).astype(update_dtype)
    var = user.create_variable("c", initial, on=A)
    var.assign_add(update)
    want = initial + update.astype(variable_dtype)
    got = var.read()
    assert got.dtype == variable_dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("variable_dtype", "update_dtype"),
    [(np.int32, np.float32), (np.uint8, np.int8), (np.float64, np.complex128)],
)
def test_casts_the_same_kind_rule_refuses_are_refused(
    user: distsrv.Server, variable_dtype: type, update_dtype: type
) -> None:
    initial = np.arange(3).astype(variable_dtype)
    var = user.create_variable("c", initial, on=A)
    with pytest.raises(errors.InvalidArgumentError, match="same_kind"):
        var.assign(np.ones(3, update_dtype))
    np.testing.assert_array_equal(var.read(), initial)


def test_a_float64_gradient_steps_a_float32_variable(user: distsrv.Server) -> None:
    var = user.create_variable("w", np.ones(3, np.float32), on=A)
    gradient = np.array([0.1, 0.2, 0.3])
    var.sgd_step(gradient, 0.5)
    np.testing.assert_array_equal(
        var.read(), np.float32(1) - np.float32(0.5) * np.float32(gradient)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_momentum_steps_follow_torchs_sgd(
    user: distsrv.Server, dtype: type, nesterov: bool
) -> None:
    rng = np.random.default_rng(7)
    value = rng.standard_normal(50)
    var = user.create_variable("w", value.astype(dtype), on=A)
    lr, momentum = 0.1, 0.8
    buf = np.zeros_like(value)
    for _ in range(5):
        gradient = rng.standard_normal(50)
        var.momentum_step(gradient.astype(dtype), lr, momentum, nesterov=nesterov)
        # torch.optim.SGD (dampening 0): buf = momentum * buf + g; p -= lr * update.
        buf = momentum * buf + gradient
        value = value - lr * (gradient + momentum * buf if nesterov else buf)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(var.read(), value, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_steps_follow_torchs_adam(user: distsrv.Server, dtype: type) -> None:
    rng = np.random.default_rng(11)
    value = rng.standard_normal(64)
    var = user.create_variable("w", value.astype(dtype), on=A)
    lr, beta1, beta2, epsilon = 0.01, 0.9, 0.99, 1e-8
    m = np.zeros_like(value)
    v = np.zeros_like(value)
    for t in range(1, 8):
        gradient = rng.standard_normal(64)
        var.adam_step(gradient.astype(dtype), lr, beta1, beta2, epsilon)
        m = beta1 * m + (1 - beta1) * gradient
        v = beta2 * v + (1 - beta2) * gradient**2
        value = value - lr * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + epsilon)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(var.read(), value, rtol=tolerance, atol=tolerance)


def test_optimizer_steps_refuse_what_they_are_not_defined_for(user: distsrv.Server) -> None:
    var = user.create_variable("w", np.zeros(2, np.float32), on=A)
    with pytest.raises(errors.InvalidArgumentError, match="Nesterov step needs a momentum"):
        var.momentum_step(np.ones(2), 0.1, 0.0, nesterov=True)
    with pytest.raises(errors.InvalidArgumentError, match="beta2"):
        var.adam_step(np.ones(2), beta2=1.0)
    with pytest.raises(errors.InvalidArgumentError, match="learning rate"):
        var.adam_step(np.ones(2), learning_rate=-1.0)
    var.momentum_step(np.ones(2), 0.1)
    with pytest.raises(errors.FailedPreconditionError, match="stepped with momentum"):
        var.adam_step(np.ones(2))
    np.testing.assert_allclose(var.read(), [-0.1, -0.1])
    half = user.create_variable("h", np.zeros(2, np.float16), on=A)
    with pytest.raises(errors.InvalidArgumentError, match="float32 or float64"):
        half.adam_step(np.ones(2, np.float16))


def test_shape_dtype_listing_and_delete(user: distsrv.Server) -> None:
    var = user.create_variable("w", np.zeros((2, 3), np.float32), on=A)
    user.create_variable("b", np.zeros(3, np.int64), on=A)
    assert var.shape == (2, 3)
    assert var.dtype == np.float32
    listed = user.variables(on=A)
    assert list(listed) == ["b", "w"]
    assert listed["b"].dtype == np.int64
    assert listed["w"].host == "/job:worker/task:0"
    var.delete()
    assert list(user.variables(on=A)) == ["b"]
    with pytest.raises(errors.NotFoundError):
        var.read()
    with pytest.raises(errors.NotFoundError):
        var.delete()
    assert user.variables(on=B) == {}
    # A deleted name may be created again, with another dtype and shape.
    again = user.create_variable("w", np.ones(5, np.uint8), on=A)
    assert again.shape == (5,)
    assert again.dtype == np.uint8


def test_variables_save_to_npz_and_restore(user: distsrv.Server, tmp_path: Any) -> None:
    user.create_variable("w", np.arange(6, dtype=np.float32).reshape(2, 3), on=A)
    user.create_variable("step", np.array(7, np.int64), on=A)
    user.create_variable("allow_pickle", np.array([True]), on=A)
    path = tmp_path / "checkpoint.npz"
    assert user.save_variables(path, on=A) == ["allow_pickle", "step", "w"]
    with np.load(path) as saved:
        np.testing.assert_array_equal(saved["w"], np.arange(6).reshape(2, 3))
    user.variable("w", on=A).assign(np.zeros((2, 3), np.float32))
    user.variable("step", on=A).delete()
    user.create_variable("other", np.ones(1), on=A)
    assert sorted(user.restore_variables(path, on=A)) == ["allow_pickle", "step", "w"]
    np.testing.assert_array_equal(user.variable("w", on=A).read(), np.arange(6).reshape(2, 3))
    assert int(user.variable("step", on=A).read()) == 7
    assert sorted(user.variables(on=A)) == ["allow_pickle", "other", "step", "w"]


@pytest.mark.parametrize(
    "initial",
    [np.arange(3, dtype=np.int32), np.arange(3, dtype=np.uint8), np.ones(3, np.complex128)],
    ids=["int32", "uint8", "complex128"],
)
def test_sgd_on_non_floating_variables_is_refused(
    user: distsrv.Server, initial: np.ndarray
) -> None:
    var = user.create_variable("i", initial, on=A)
    with pytest.raises(errors.InvalidArgumentError, match="floating"):
        var.sgd_step(np.ones_like(initial), 0.5)
    np.testing.assert_array_equal(var.read(), initial)


def test_adding_to_a_boolean_variable_is_refused(user: distsrv.Server) -> None:
    var = user.create_variable("flags", np.array([True, False]), on=A)
    with pytest.raises(errors.InvalidArgumentError):
        var.assign_add(np.array([True, True]))
    np.testing.assert_array_equal(var.read(), [True, False])
    var.assign(np.array([False, True]))
    np.testing.assert_array_equal(var.read(), [False, True])


def test_a_variable_on_an_unknown_task_is_refused(
    pair: tuple[distsrv.Server, distsrv.Server],
) -> None:
    a, _ = pair
    with pytest.raises(errors.InvalidArgumentError, match="not in the cluster spec"):
        a.create_variable("w", np.zeros(2), on=("ps", 0))
    with pytest.raises(errors.InvalidArgumentError, match="not in the cluster spec"):
        a.variable("w", on="/job:worker/task:7").read()
    with pytest.raises(TypeError, match="a task is"):
        a.variable("w", on=["worker", 0])  # type: ignore[arg-type]


def test_unsupported_dtypes_are_type_errors(local_server: distsrv.Server) -> None:
    with pytest.raises(TypeError, match="cannot send arrays of dtype"):
        local_server.create_variable("s", np.array(["x"]), on=local_server.task)


def test_concurrent_updates_from_two_servers_lose_nothing(
    pair: tuple[distsrv.Server, distsrv.Server],
) -> None:
    a, b = pair
    threads, steps = 8, 50
    a.create_variable("total", np.zeros(16, np.int64), on=A)
    a.create_variable("sum", np.zeros(3, np.float64), on=A)
    handles = [server.variable("total", on=A) for server in (a, b)]
    sums = [server.variable("sum", on=A) for server in (a, b)]

    def worker(index: int) -> None:
        for _ in range(steps):
            handles[index % 2].assign_add(np.full(16, index + 1, np.int64))
            sums[index % 2].assign_add(np.array([1.0, 0.5, 0.25]))

    with concurrent.futures.ThreadPoolExecutor(2 * threads) as pool:
        for future in [pool.submit(worker, index) for index in range(2 * threads)]:
            future.result(timeout=60)
    want = steps * sum(range(1, 2 * threads + 1))
    np.testing.assert_array_equal(handles[1].read(), np.full(16, want))
    updates = 2 * threads * steps
    np.testing.assert_array_equal(sums[0].read(), [updates, updates / 2, updates / 4])


def test_a_large_variable_travels(pair: tuple[distsrv.Server, distsrv.Server]) -> None:
    _, b = pair
    initial = np.arange(3 << 20, dtype=np.float32)  # 12 MiB, over gRPC's 4 MiB default
    var = b.create_variable("big", initial, on=A)
    var.sgd_step(np.ones_like(initial), 1.0)
    np.testing.assert_array_equal(var.read(), initial - 1)


# -- the VariableOp RPC, from a stock grpcio client -------------------------------------------


def _tensor(array: np.ndarray) -> Any:
    from distsrv import tensors

    proto = distsrv_pb2.TensorProto(
        dtype=tensors.dtype_code(array.dtype),
        tensor_content=np.ascontiguousarray(array).tobytes(),
    )
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def test_a_stock_grpc_client_creates_and_reads(
    local_server: distsrv.Server, channel: grpc.Channel
) -> None:
    stub = distsrv_pb2_grpc.WorkerStub(channel)
    Op = distsrv_pb2.VariableRequest
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    created = stub.VariableOp(
        distsrv_pb2.VariableRequest(name="w", op=Op.CREATE, value=_tensor(value)), timeout=10
    )
    assert not created.HasField("value")
    stub.VariableOp(
        distsrv_pb2.VariableRequest(
            name="w", op=Op.SGD_STEP, value=_tensor(np.ones_like(value)), learning_rate=2.0
        ),
        timeout=10,
    )
    read = stub.VariableOp(distsrv_pb2.VariableRequest(name="w", op=Op.READ), timeout=10).value
    assert read.dtype == distsrv_pb2.DT_FLOAT == 1
    assert [dim.size for dim in read.tensor_shape.dim] == [2, 3]
    got = np.frombuffer(read.tensor_content, np.float32).reshape(2, 3)
    np.testing.assert_array_equal(got, value - 2)
    # The server's own API sees the same variable.
    np.testing.assert_array_equal(local_server.variable("w", on=local_server.task).read(), got)


def test_tensor_proto_uses_tensorflows_field_numbers() -> None:
    fields = {f.name: f.number for f in distsrv_pb2.TensorProto.DESCRIPTOR.fields}
    assert fields == {"dtype": 1, "tensor_shape": 2, "tensor_content": 4}
    # Encoded by hand: field 1 varint DT_DOUBLE, field 2 an empty shape (a scalar), field 4 bytes.
    payload = np.float64(1.5).tobytes()
    wire = bytes([0x08, 2, 0x12, 0, 0x22, len(payload)]) + payload
    parsed = distsrv_pb2.TensorProto.FromString(wire)
    assert parsed.dtype == distsrv_pb2.DT_DOUBLE
    assert parsed.tensor_content == payload


def test_grpc_errors_carry_the_status_codes(
    local_server: distsrv.Server, channel: grpc.Channel
) -> None:
    stub = distsrv_pb2_grpc.WorkerStub(channel)
    Op = distsrv_pb2.VariableRequest
    with pytest.raises(grpc.RpcError) as missing:
        stub.VariableOp(distsrv_pb2.VariableRequest(name="nope", op=Op.READ), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    request = distsrv_pb2.VariableRequest(name="v", op=Op.CREATE, value=_tensor(np.zeros(2)))
    stub.VariableOp(request, timeout=10)
    with pytest.raises(grpc.RpcError) as again:
        stub.VariableOp(request, timeout=10)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for bad in [
        distsrv_pb2.VariableRequest(name="v", op=Op.ASSIGN),  # no value
        distsrv_pb2.VariableRequest(name="v", op=Op.ASSIGN, value=_tensor(np.zeros(3))),
        distsrv_pb2.VariableRequest(
            name="v",
            op=Op.ASSIGN,
            value=distsrv_pb2.TensorProto(dtype=distsrv_pb2.DT_DOUBLE, tensor_content=b"\0" * 5),
        ),
    ]:
        with pytest.raises(grpc.RpcError) as refused:
            stub.VariableOp(bad, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    np.testing.assert_array_equal(local_server.variable("v", on=local_server.task).read(), [0, 0])
