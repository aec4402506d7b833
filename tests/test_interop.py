"""PyTorch and JAX tensors go wherever numpy arrays go, read in place, and results come back in
the caller's kind (python/distsrv/interop.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import pair_cluster

import distsrv
from distsrv import errors, tensors

torch = pytest.importorskip(
    "torch", reason="torch is installed by `make develop` (the torch extra)"
)
jax = pytest.importorskip("jax", reason="jax is installed by `make develop` (the jax extra)")
jnp = jax.numpy

ME = "/job:localhost/task:0"
A, B = ("worker", 0), ("worker", 1)

# Every dtype torch, numpy and the wire all have, with the integer dtype of its width that
# compares its bits.
TORCH_DTYPES = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.complex64: torch.int64,
    torch.complex128: torch.int64,
    torch.int8: torch.int8,
    torch.uint8: torch.uint8,
    torch.int16: torch.int16,
    torch.int32: torch.int32,
    torch.int64: torch.int64,
    torch.uint16: torch.uint16,
    torch.uint32: torch.uint32,
    torch.uint64: torch.uint64,
    torch.bool: torch.bool,
}
JAX_DTYPES = [
    "float16",
    "bfloat16",
    "float32",
    "int8",
    "uint8",
    "int16",
    "int32",
    "uint16",
    "uint32",
    "bool",
    "complex64",
]


@pytest.fixture
def server() -> Iterator[distsrv.Server]:
    with distsrv.Server.create_local_server() as server:
        yield server


def random_torch(dtype: Any, shape: tuple[int, ...] = (3, 17)) -> Any:
    """A tensor of random bits (NaNs with payloads and subnormals included) of ``dtype``."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    raw = np.random.default_rng(7).integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def same_bits(a: Any, b: Any, bits: Any) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    return bool(torch.equal(a.contiguous().view(bits), b.contiguous().view(bits)))


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES), ids=str)
def test_every_torch_dtype_round_trips_bit_exactly(server: distsrv.Server, dtype: Any) -> None:
    sent = random_torch(dtype)
    server.send("t", sent, ME)
    back = server.recv("t", ME, like=sent)
    assert isinstance(back, torch.Tensor)
    bits = TORCH_DTYPES[dtype] if not sent.is_complex() else torch.int32
    assert same_bits(back, sent, bits)


@pytest.mark.parametrize("dtype", JAX_DTYPES)
def test_every_jax_dtype_round_trips_bit_exactly(server: distsrv.Server, dtype: str) -> None:
    raw = np.random.default_rng(3).integers(0, 256, size=64, dtype=np.uint8)
    sent = jnp.asarray(raw.view(jnp.dtype(dtype)) if dtype != "bool" else raw % 2 == 1)
    server.send("j", sent, ME)
    back = server.recv("j", ME, like=sent)
    assert isinstance(back, jax.Array)
    assert back.dtype == sent.dtype
    assert np.asarray(back).tobytes() == np.asarray(sent).tobytes()


def test_torch_and_jax_tensors_are_read_in_place() -> None:
    """What the native layer lends for a send is the tensor's own memory (it lends a C-contiguous
    array as it is: test_exchange's test_a_sent_array_is_lent_until_acknowledged)."""
    tensor = torch.arange(1000.0)
    assert tensors.to_wire(tensor)[2].ctypes.data == tensor.data_ptr()
    bfloat = torch.arange(16.0).bfloat16()
    assert tensors.to_wire(bfloat)[2].ctypes.data == bfloat.data_ptr()
    array = jnp.arange(1000.0)
    assert tensors.to_wire(array)[2].ctypes.data == array.unsafe_buffer_pointer()


def test_a_sent_torch_tensor_is_lent_not_copied() -> None:
    """The send reads the tensor where it lies when it moves the bytes: written to before the
    receiver is up, the tensor arrives as it is then (a copy at the call would not)."""
    spec = pair_cluster()
    with (
        distsrv.Server(spec, "worker", 0) as a,
        distsrv.Server(spec, "worker", 1, start=False) as b,
    ):
        tensor = torch.zeros(1 << 16)
        sending = a.isend("lent", tensor, to=B)
        tensor.fill_(5.0)
        b.start()
        sending.wait(timeout=30)
        assert torch.equal(b.recv("lent", A, like=tensor), torch.full((1 << 16,), 5.0))


def test_a_non_contiguous_tensor_is_sent_in_logical_order(server: distsrv.Server) -> None:
    tensor = torch.arange(12.0).reshape(3, 4).t()
    assert not tensor.is_contiguous()
    server.send("t", tensor, ME)
    assert torch.equal(server.recv("t", ME, like=tensor), tensor)


def test_a_tensor_that_requires_grad_sends_its_values(server: distsrv.Server) -> None:
    weight = torch.ones(3, requires_grad=True)
    server.send("w", weight, ME)
    np.testing.assert_array_equal(server.recv("w", ME), np.ones(3))


def test_a_tensor_off_the_cpu_is_a_type_error_naming_its_device(server: distsrv.Server) -> None:
    with pytest.raises(TypeError, match="meta"):
        server.send("t", torch.empty(3, device="meta"), ME)

    class OnGpu:
        """What a CUDA array of any library says through DLPack."""

        def __dlpack__(self, **kwargs: Any) -> Any:
            raise AssertionError("must not be exported")

        def __dlpack_device__(self) -> tuple[int, int]:
            return (2, 1)

    with pytest.raises(TypeError, match="cuda:1"):
        server.send("t", OnGpu(), ME)
    with pytest.raises(TypeError, match="cuda:1"):
        server.all_reduce(OnGpu())
    server.send("t", np.ones(2), ME)  # and the server goes on
    assert server.recv("t", ME).shape == (2,)


def test_any_dlpack_tensor_is_read(server: distsrv.Server) -> None:
    class Exporter:
        """A CPU tensor of some other library, known only by its DLPack methods."""

        def __init__(self, array: np.ndarray[Any, Any]) -> None:
            self.array = array

        def __dlpack__(self, **kwargs: Any) -> Any:
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self) -> tuple[int, int]:
            return self.array.__dlpack_device__()  # type: ignore[no-any-return]

    exporter = Exporter(np.arange(10, dtype=np.int32))
    assert tensors.to_wire(exporter)[2].ctypes.data == exporter.array.ctypes.data
    server.send("d", exporter, ME)
    np.testing.assert_array_equal(server.recv("d", ME), np.arange(10, dtype=np.int32))


def test_recv_writes_into_a_torch_tensor(server: distsrv.Server) -> None:
    out = torch.zeros(2, 3, dtype=torch.bfloat16)
    storage = out.data_ptr()
    server.send("t", torch.ones(2, 3, dtype=torch.bfloat16), ME)
    assert server.recv("t", ME, out=out) is out
    assert out.data_ptr() == storage
    assert torch.equal(out, torch.ones(2, 3, dtype=torch.bfloat16))
    server.send("t", torch.ones(2, 3), ME)
    handle = server.irecv("t", ME, out=out)
    assert handle.wait(timeout=10) is out


def test_a_wrong_out_is_refused_before_the_tensor_is_taken(server: distsrv.Server) -> None:
    server.send("t", np.arange(4.0), ME)
    with pytest.raises(TypeError, match="immutable"):
        server.recv("t", ME, out=jnp.zeros(4))
    with pytest.raises(TypeError, match="immutable"):
        server.irecv("t", ME, out=jnp.zeros(4))
    with pytest.raises(errors.InvalidArgumentError, match="shape"):
        server.recv("t", ME, out=torch.zeros(5))
    server.send("t", np.arange(4.0), ME)
    np.testing.assert_array_equal(server.recv("t", ME, timeout=10), np.arange(4.0))


def test_collectives_answer_in_the_kind_they_are_given(server: distsrv.Server) -> None:
    result = server.all_reduce(torch.ones(3))
    assert isinstance(result, torch.Tensor)
    assert torch.equal(result, torch.ones(3))
    gathered = server.all_gather(torch.arange(2.0))
    assert isinstance(gathered, torch.Tensor)
    assert gathered.shape == (1, 2)
    assert isinstance(server.all_reduce(jnp.ones(3)), jax.Array)
    assert isinstance(server.all_reduce(np.ones(3)), np.ndarray)
    assert isinstance(server.iall_reduce(torch.ones(3)).wait(timeout=10), torch.Tensor)


def test_all_reduce_in_place_on_torch_tensors() -> None:
    spec = pair_cluster()
    with distsrv.Server(spec, "worker", 0) as a, distsrv.Server(spec, "worker", 1) as b:
        ta, tb = torch.full((5,), 1.0), torch.full((5,), 2.0)
        pa, pb = ta.data_ptr(), tb.data_ptr()
        handle = a.iall_reduce(ta, "max", inplace=True)
        assert b.all_reduce(tb, "max", inplace=True) is tb
        assert handle.wait(timeout=30) is ta
        assert torch.equal(ta, torch.full((5,), 2.0))
        assert torch.equal(tb, torch.full((5,), 2.0))
        assert (ta.data_ptr(), tb.data_ptr()) == (pa, pb)


def test_in_place_and_out_together_are_refused(server: distsrv.Server) -> None:
    tensor = torch.ones(1)
    with pytest.raises(ValueError, match="not both"):
        server.all_reduce(tensor, out=tensor, inplace=True)


def test_handler_arguments_and_variables_take_torch_tensors() -> None:
    def total(values: np.ndarray[Any, Any]) -> float:
        return float(values.sum())

    server = distsrv.Server.create_local_server(handlers={"total": total})
    assert server.call(server.task, "total", values=torch.arange(5.0)) == 10.0
    assert server.call(server.task, "total", values=jnp.arange(5.0)) == 10.0
    variable = server.create_variable("w", torch.zeros(3), on=server.task)
    variable.assign_add(torch.ones(3))
    variable.sgd_step(torch.full((3,), 2.0), learning_rate=0.5)
    np.testing.assert_array_equal(variable.read(), np.zeros(3))
    server.stop(grace=0)
