"""Collectives over groups of tasks: all_reduce, reduce_scatter, all_gather, broadcast, barrier,
reduce, gather, scatter and all_to_all, blocking, in the background and awaited.

Every test runs one server per task in this process and one thread per task, the way separate
processes would call the collectives; a dead member is a child process.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from conftest import pair_cluster, read_line

import distsrv
from distsrv import errors

CONFIG = distsrv.ServerConfig(connect_timeout=2.0)
#: An all_reduce goes all-to-all while a task sends at most 2 MiB that way (its array times the
#: other members), and round the ring beyond: arrays of this size go round the ring in any group.
RING_BYTES = 2 << 20 | 1 << 19
#: The ring moves a segment in pieces of at most this many bytes.
PIECE_BYTES = 4 << 20

try:
    import ml_dtypes

    BFLOAT16: Any = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
    BFLOAT16 = None

INTS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOATS = [np.float16, np.float32, np.float64]
COMPLEX = [np.complex64, np.complex128]
ALL_OPS = ("sum", "mean", "max", "min", "prod")


def _bf16_param() -> Any:
    return pytest.param(
        BFLOAT16,
        id="bfloat16",
        marks=pytest.mark.skipif(BFLOAT16 is None, reason="ml_dtypes is not installed"),
    )


DTYPES = [
    pytest.param(np.dtype(t), id=np.dtype(t).name) for t in [np.bool_, *INTS, *FLOATS, *COMPLEX]
] + [_bf16_param()]


def allowed_ops(dtype: np.dtype[Any]) -> tuple[str, ...]:
    """The reductions numpy does without changing the dtype."""
    if dtype == np.bool_:
        return ("max", "min")
    if np.issubdtype(dtype, np.integer):
        return ("sum", "max", "min", "prod")
    if np.issubdtype(dtype, np.complexfloating):
        return ("sum", "mean", "prod")
    return ALL_OPS


# -- running one function per task ------------------------------------------------------------


@contextlib.contextmanager
def servers_of(
    spec: distsrv.ClusterSpec | int, config: distsrv.ServerConfig = CONFIG
) -> Iterator[list[distsrv.Server]]:
    """A running server for every task of ``spec`` (or of a cluster of that many workers), in
    (job, index) order, all stopped on the way out."""
    if isinstance(spec, int):
        spec = pair_cluster(spec)
    tasks = sorted((job, index) for job in spec.jobs for index in spec.task_indices(job))
    servers: list[distsrv.Server] = []
    try:
        for job, index in tasks:
            servers.append(distsrv.Server(spec, job, index, config=config))
        yield servers
    finally:
        for server in servers:
            server.stop(grace=0)


def outcomes(
    servers: Sequence[distsrv.Server],
    work: Callable[[int, distsrv.Server], Any],
    limit: float = 60.0,
) -> list[Any]:
    """``work(rank, server)`` on every server at once, one thread each: what each returned, or the
    exception it raised. Fails the test if any is still running after ``limit`` seconds."""
    results: list[Any] = [None] * len(servers)

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank, servers[rank])
        except BaseException as error:  # handed to the test
            results[rank] = error

    threads = [
        threading.Thread(target=run, args=(rank,), daemon=True, name=f"task-{rank}")
        for rank in range(len(servers))
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + limit
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        pytest.fail(f"{stuck} still running after {limit} s")
    return results


def on_every_task(
    servers: Sequence[distsrv.Server], work: Callable[[int, distsrv.Server], Any]
) -> list[Any]:
    """As :func:`outcomes`, re-raising the first exception."""
    results = outcomes(servers, work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def assert_all_raise(results: Sequence[Any], error: type[BaseException], match: str = "") -> None:
    for rank, result in enumerate(results):
        assert isinstance(result, error), f"rank {rank} gave {result!r}, not {error.__name__}"
        if match:
            assert match in str(result), f"rank {rank}: {result}"


def assert_bitwise_identical(results: Sequence[np.ndarray]) -> None:
    first = results[0]
    for rank, result in enumerate(results[1:], 1):
        assert result.dtype == first.dtype
        assert result.shape == first.shape
        assert result.tobytes() == first.tobytes(), f"rank {rank} differs from rank 0"


# -- inputs and numpy's answers ---------------------------------------------------------------


def sample(dtype: np.dtype[Any], op: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values of ``dtype`` that exercise ``op``: the whole range of integers (so sums and products
    wrap), floats around 1 for products so they neither overflow nor vanish, and otherwise halves,
    whose sums are exact in any order."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if op == "prod":
        real = rng.uniform(0.6, 1.4, shape) * rng.choice([-1.0, 1.0], shape)
        imag = rng.uniform(-0.5, 0.5, shape)
    else:
        # Halves up to 15: a sum of four is exact even in bfloat16, whatever the order.
        real, imag = rng.integers(-30, 31, shape) / 2, rng.integers(-30, 31, shape) / 2
    if np.issubdtype(dtype, np.complexfloating):
        return (real + 1j * imag).astype(dtype)
    return real.astype(dtype)


UFUNCS = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}


def expected(op: str, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """numpy's element-wise ``op`` of ``arrays``, in their dtype (integers wrap)."""
    shape = arrays[0].shape
    with np.errstate(all="ignore"):
        flat = functools.reduce(UFUNCS[op], [np.asarray(a).reshape(-1) for a in arrays])
        if op == "mean":
            flat = (flat.astype(wide(flat.dtype)) / len(arrays)).astype(flat.dtype)
    return flat.reshape(shape)


def wide(dtype: np.dtype[Any]) -> type:
    return np.complex128 if np.issubdtype(dtype, np.complexfloating) else np.float64


def tolerance(dtype: np.dtype[Any]) -> float:
    dtype = np.dtype(dtype)
    if dtype == np.float16 or (BFLOAT16 is not None and dtype == BFLOAT16):
        return 2e-2 if dtype == np.float16 else 5e-2
    if dtype in (np.float32, np.complex64):
        return 1e-5
    return 1e-12


def assert_reduces_like_numpy(got: np.ndarray, want: np.ndarray, exact: bool = False) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    if exact or want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
        np.testing.assert_array_equal(got, want)
        return
    rtol = tolerance(want.dtype)
    to = wide(want.dtype)
    np.testing.assert_allclose(got.astype(to), want.astype(to), rtol=rtol, atol=rtol)


def all_reduce_everywhere(
    servers: Sequence[distsrv.Server], inputs: Sequence[np.ndarray], op: str, **kwargs: Any
) -> list[np.ndarray]:
    return on_every_task(
        servers, lambda rank, server: server.all_reduce(inputs[rank], op, timeout=60, **kwargs)
    )


def check_all_reduce(
    servers: Sequence[distsrv.Server], dtype: np.dtype[Any], op: str, shape: tuple[int, ...]
) -> None:
    inputs = [sample(dtype, op, shape, seed) for seed in range(len(servers))]
    results = all_reduce_everywhere(servers, inputs, op)
    assert_bitwise_identical(results)
    # sample() makes sums, maxima and minima exact; means and products round.
    exact = op in ("sum", "max", "min")
    assert_reduces_like_numpy(results[0], expected(op, inputs), exact=exact)


def large_count(itemsize: int, n: int) -> int:
    """An element count that goes round the ring and that no group of 2, 3 or 4 tasks divides
    evenly."""
    count = RING_BYTES // itemsize
    return count - count % 12 + 5 + 12 * n


# -- all_reduce -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_reduce_small_every_op_and_dtype(n: int, dtype: np.dtype[Any]) -> None:
    with servers_of(n) as servers:
        for op in allowed_ops(dtype):
            check_all_reduce(servers, dtype, op, (3, 7))


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_reduce_ring_every_op_and_dtype(n: int, dtype: np.dtype[Any]) -> None:
    count = large_count(np.dtype(dtype).itemsize, n)
    assert count * np.dtype(dtype).itemsize > RING_BYTES
    assert count % n != 0
    with servers_of(n) as servers:
        for op in allowed_ops(dtype):
            check_all_reduce(servers, dtype, op, (count,))


@pytest.mark.parametrize("n", [2, 3])
def test_all_reduce_ring_with_several_pieces_per_segment(n: int) -> None:
    # Every segment is over 4 MiB, so it travels in several pieces; one segment is longer.
    count = n * (PIECE_BYTES + PIECE_BYTES // 2) // 4 + 1
    with servers_of(n) as servers:
        check_all_reduce(servers, np.dtype(np.int32), "sum", (count,))
        check_all_reduce(servers, np.dtype(np.float32), "mean", (count,))


def test_all_reduce_ring_keeps_a_multidimensional_shape() -> None:
    with servers_of(3) as servers:
        check_all_reduce(servers, np.dtype(np.float64), "sum", (257, 3, 131))
        check_all_reduce(servers, np.dtype(np.int16), "max", (2, 0, 5))


@pytest.mark.parametrize("n", [2, 3])
def test_an_in_place_ring_all_reduce_writes_into_the_array_itself(n: int) -> None:
    """The native layer writes a ring's result into the array it was given (no new array),
    every op and dtype alike, and the values are the out-of-place result's."""
    count = large_count(4, n)
    inputs = [sample(np.dtype(np.float32), "sum", (count,), seed) for seed in range(n)]
    want = expected("sum", inputs)
    arrays = [array.copy() for array in inputs]
    addresses = [array.ctypes.data for array in arrays]
    with servers_of(n) as servers:
        results = on_every_task(
            servers, lambda rank, server: server.all_reduce(arrays[rank], inplace=True)
        )
        assert all(result is array for result, array in zip(results, arrays, strict=True))
        assert [array.ctypes.data for array in arrays] == addresses
        assert_bitwise_identical(arrays)
        assert_reduces_like_numpy(arrays[0], want, exact=True)
        # In the background, the handle dropped at once: the result still lands in the array.
        handles = on_every_task(
            servers, lambda rank, server: server.iall_reduce(arrays[rank], "max", inplace=True)
        )
        for handle in handles:
            assert handle.wait(timeout=60) is not None
        np.testing.assert_array_equal(arrays[0], want)
        dropped = [np.ones(count, np.float32) for _ in range(n)]
        on_every_task(servers, lambda rank, server: server.iall_reduce(dropped[rank], inplace=True))
        deadline = time.monotonic() + 30
        while not np.all(dropped[0] == n) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(np.all(array == n) for array in dropped)


def test_integer_sums_and_products_wrap_like_numpy() -> None:
    with servers_of(2) as servers:
        for dtype in (np.int8, np.uint8, np.int64, np.uint64):
            info = np.iinfo(dtype)
            top = np.array([info.max, info.min, info.max], dtype)
            results = all_reduce_everywhere(servers, [top, top], "sum")
            with np.errstate(all="ignore"):
                np.testing.assert_array_equal(results[1], top + top)
            assert results[0].dtype == dtype
        big = np.array([1 << 40, -(1 << 62)], np.int64)
        results = all_reduce_everywhere(servers, [big, np.array([1 << 30, 3], np.int64)], "prod")
        np.testing.assert_array_equal(results[0], big * np.array([1 << 30, 3], np.int64))


def test_float_max_and_min_propagate_nan() -> None:
    with servers_of(3) as servers:
        inputs = [
            np.array([np.nan, 1.0, 2.0], np.float32),
            np.array([0.0, np.nan, 5.0], np.float32),
            np.array([3.0, 0.0, -1.0], np.float32),
        ]
        for op in ("max", "min", "sum"):
            results = all_reduce_everywhere(servers, inputs, op)
            assert_bitwise_identical(results)
            np.testing.assert_array_equal(results[0], expected(op, inputs))


@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 3)], ids=["0d", "empty", "empty-3d"])
def test_all_reduce_of_0d_and_empty_arrays(shape: tuple[int, ...]) -> None:
    with servers_of(3) as servers:
        for op in ("sum", "mean", "max"):
            inputs = [np.full(shape, rank + 1.5, np.float64) for rank in range(3)]
            results = all_reduce_everywhere(servers, inputs, op)
            assert_bitwise_identical(results)
            assert results[0].shape == shape
            np.testing.assert_array_equal(results[0], expected(op, inputs))


@pytest.mark.parametrize("large", [False, True], ids=["small", "ring"])
def test_all_reduce_of_non_contiguous_and_big_endian_input(large: bool) -> None:
    rows = RING_BYTES // 24 + 1 if large else 11
    with servers_of(2) as servers:
        base = [np.arange(rows * 6, dtype=np.int32).reshape(rows, 6) * (r + 1) for r in range(2)]
        strided = [b[:, ::2] for b in base]
        assert not strided[0].flags.c_contiguous
        results = all_reduce_everywhere(servers, strided, "sum")
        np.testing.assert_array_equal(results[0], strided[0] + strided[1])
        fortran = [np.asfortranarray(b) for b in base]
        results = all_reduce_everywhere(servers, fortran, "max")
        np.testing.assert_array_equal(results[1], np.maximum(base[0], base[1]))
        swapped = [b.astype(">i4") for b in base]
        results = all_reduce_everywhere(servers, swapped, "sum")
        assert results[0].dtype == np.int32
        np.testing.assert_array_equal(results[0], base[0] + base[1])


def test_the_callers_array_is_left_alone() -> None:
    with servers_of(2) as servers:
        inputs = [np.arange(6.0), np.arange(6.0) * 10]
        copies = [a.copy() for a in inputs]
        results = all_reduce_everywhere(servers, inputs, "sum")
        for given, copy in zip(inputs, copies, strict=True):
            np.testing.assert_array_equal(given, copy)
        results[0][:] = -1  # a result is the caller's own, writable array
        np.testing.assert_array_equal(results[1], copies[0] + copies[1])


def test_a_single_task_reduces_to_its_own_array(local_server: distsrv.Server) -> None:
    array = np.arange(10, dtype=np.float32).reshape(2, 5)
    for op in ALL_OPS:
        np.testing.assert_array_equal(local_server.all_reduce(array, op), array)
    big = np.arange(300_001, dtype=np.int64)
    np.testing.assert_array_equal(local_server.all_reduce(big, "sum"), big)
    np.testing.assert_array_equal(local_server.reduce_scatter(big[:300_000], "max"), big[:300_000])
    np.testing.assert_array_equal(local_server.all_gather(array), array[None])
    np.testing.assert_array_equal(local_server.broadcast(array, local_server.task), array)
    local_server.barrier(timeout=5)


@pytest.mark.parametrize(
    ("dtype", "op"),
    [
        (np.int32, "mean"),
        (np.uint8, "mean"),
        (np.bool_, "sum"),
        (np.bool_, "prod"),
        (np.bool_, "mean"),
        (np.complex64, "max"),
        (np.complex128, "min"),
    ],
)
def test_refused_reductions_are_invalid_arguments(
    local_server: distsrv.Server, dtype: Any, op: str
) -> None:
    array = np.ones(4, dtype)
    # The dtype as numpy names it, not as the wire does.
    name = np.dtype(dtype).name
    with pytest.raises(errors.InvalidArgumentError, match=f"{op} is not defined for {name} "):
        local_server.all_reduce(array, op, timeout=5)
    with pytest.raises(errors.InvalidArgumentError, match=f"{op} is not defined"):
        local_server.reduce_scatter(array, op, timeout=5)


def test_an_unknown_reduction_is_refused_before_anything_is_sent() -> None:
    # Over two tasks of which the other never takes part: a refusal that waited for it, or sent
    # it anything, would time out instead.
    with servers_of(2) as (a, _):
        for call in (a.all_reduce, a.reduce_scatter):
            started = time.monotonic()
            with pytest.raises(errors.InvalidArgumentError, match="unknown reduction"):
                call(np.ones(4), "avg", timeout=10)  # type: ignore[arg-type]
            with pytest.raises(errors.InvalidArgumentError, match="not defined"):
                call(np.ones(4, np.int64), "mean", timeout=10)
            assert time.monotonic() - started < 2


def test_unsupported_dtypes_are_type_errors(local_server: distsrv.Server) -> None:
    with pytest.raises(TypeError, match="cannot send arrays of dtype"):
        local_server.all_reduce(np.array(["a", "b"]))


@pytest.mark.parametrize("large", [False, True], ids=["small", "ring"])
@pytest.mark.parametrize("mismatch", ["shape", "dtype"])
def test_members_that_disagree_all_fail_and_the_group_goes_on(large: bool, mismatch: str) -> None:
    count = RING_BYTES // 4 + 3 if large else 10
    with servers_of(3) as servers:

        def given(rank: int) -> np.ndarray:
            if mismatch == "shape":
                return np.ones(count + (rank == 1), np.float32)
            return np.ones(count, np.float32 if rank != 2 else np.int32)

        results = outcomes(servers, lambda rank, s: s.all_reduce(given(rank), timeout=20))
        assert_all_raise(results, errors.InvalidArgumentError, "called different collectives")
        # Everyone is still in step: the next collective of the group works.
        inputs = [np.full(count, rank, np.int64) for rank in range(3)]
        results = all_reduce_everywhere(servers, inputs, "sum")
        np.testing.assert_array_equal(results[2], np.full(count, 3))


@pytest.mark.parametrize("n", [2, 3])
def test_a_small_and_a_large_member_disagree_on_every_member(n: int) -> None:
    sizes = [16] * (n - 1) + [2 * RING_BYTES // 4]
    with servers_of(n) as servers:
        results = outcomes(
            servers,
            lambda rank, s: s.all_reduce(np.ones(sizes[rank], np.float32), timeout=2),
        )
        assert_all_raise(results, errors.InvalidArgumentError)


def test_a_mismatched_reduce_scatter_fails_everywhere() -> None:
    with servers_of(2) as servers:
        results = outcomes(
            servers, lambda rank, s: s.reduce_scatter(np.zeros((4, 2 + rank)), timeout=20)
        )
        assert_all_raise(results, errors.InvalidArgumentError, "called different collectives")
        results = on_every_task(
            servers, lambda rank, s: s.reduce_scatter(np.full(4, rank + 1), "prod", timeout=20)
        )
        np.testing.assert_array_equal(results[1], [2, 2])


@pytest.mark.parametrize("call", ["all_reduce", "reduce_scatter"])
def test_a_locally_refused_reduction_leaves_the_group_in_step(call: str) -> None:
    with servers_of(2) as servers:
        with pytest.raises(errors.InvalidArgumentError, match="mean is not defined"):
            getattr(servers[0], call)(np.ones(2, np.int64), "mean", timeout=2)
        results = outcomes(
            servers, lambda rank, s: getattr(s, call)(np.full(2, rank + 1.0), "mean", timeout=2)
        )
        for result in results:
            assert not isinstance(result, BaseException), result
            np.testing.assert_array_equal(result, np.full(len(result), 1.5))


def test_a_mismatched_all_gather_fails_everywhere() -> None:
    with servers_of(2) as servers:
        results = outcomes(
            servers, lambda rank, s: s.all_gather(np.zeros((2, 2 + rank)), timeout=20)
        )
        assert_all_raise(results, errors.InvalidArgumentError, "called different collectives")
        gathered = on_every_task(servers, lambda rank, s: s.all_gather(np.int8(rank), timeout=20))
        np.testing.assert_array_equal(gathered[0], [0, 1])


def test_members_that_call_different_ops_all_fail_at_once_naming_each() -> None:
    with servers_of(2) as servers:
        ops = ["sum", "max"]
        started = time.monotonic()
        results = outcomes(servers, lambda rank, s: s.all_reduce(np.ones(3), ops[rank], timeout=20))
        assert time.monotonic() - started < 10
        assert_all_raise(results, errors.InvalidArgumentError, 'called all_reduce(op="max")')
        for result in results:
            assert '/job:worker/task:0 called all_reduce(op="sum") with float64 (3,)' in str(result)
            assert "/distsrv/collective" not in str(result)


def test_a_barrier_against_an_all_reduce_fails_both_at_once_and_the_group_goes_on() -> None:
    with servers_of(2) as servers:

        def mismatched(rank: int, server: distsrv.Server) -> Any:
            if rank == 0:
                return server.barrier()
            return server.all_reduce(np.ones(2, np.int32))

        started = time.monotonic()
        results = outcomes(servers, mismatched)
        assert time.monotonic() - started < 10
        assert_all_raise(results, errors.InvalidArgumentError, "called barrier() with no tensor")
        for result in results:
            assert 'called all_reduce(op="sum") with int32 (2,)' in str(result)
        results = on_every_task(servers, lambda rank, s: s.all_reduce(np.int8(rank + 1)))
        assert [int(result) for result in results] == [3, 3]


def test_members_that_name_different_roots_all_fail() -> None:
    with servers_of(2) as servers:
        value = np.arange(3.0)
        results = outcomes(
            servers, lambda rank, s: s.broadcast(value, ("worker", rank), timeout=20)
        )
        assert_all_raise(results, errors.InvalidArgumentError, "root=/job:worker/task:1")


def test_members_that_order_the_group_differently_all_fail() -> None:
    with servers_of(2) as servers:
        tasks = ["/job:worker/task:0", "/job:worker/task:1"]
        orders = [tasks, tasks[::-1]]
        results = outcomes(
            servers, lambda rank, s: s.all_gather(np.int8(rank), group=orders[rank], timeout=20)
        )
        assert_all_raise(results, errors.InvalidArgumentError, "different orders")


# -- reduce_scatter ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("large", [False, True], ids=["small", "ring"])
def test_reduce_scatter_gives_each_rank_its_rows(n: int, large: bool) -> None:
    row = 30_011 if large else 7  # odd: a segment is not a whole number of anything else
    rows = 2 * n
    with servers_of(n) as servers:
        for dtype, op in [
            (np.float32, "sum"),
            (np.float64, "mean"),
            (np.int64, "prod"),
            (np.uint16, "max"),
            (np.int8, "min"),
            (np.complex64, "sum"),
        ]:
            inputs = [sample(np.dtype(dtype), op, (rows, row), seed) for seed in range(n)]
            scatter = functools.partial(_reduce_scatter, inputs, op)
            results = on_every_task(servers, scatter)
            want = expected(op, inputs)
            for rank, result in enumerate(results):
                assert result.shape == (2, row)
                assert_reduces_like_numpy(result, want[rank * 2 : (rank + 1) * 2])


def _reduce_scatter(
    inputs: Sequence[np.ndarray], op: str, rank: int, server: distsrv.Server
) -> np.ndarray:
    return server.reduce_scatter(inputs[rank], op, timeout=60)  # type: ignore[arg-type]


def test_reduce_scatter_with_several_pieces_per_segment() -> None:
    rows, row = 2, (PIECE_BYTES * 2 + 12) // 4 + 1
    with servers_of(2) as servers:
        inputs = [sample(np.dtype(np.int32), "sum", (rows * 2, row // 2), seed) for seed in (0, 1)]
        results = on_every_task(
            servers, lambda rank, s: s.reduce_scatter(inputs[rank], "sum", timeout=60)
        )
        want = expected("sum", inputs)
        np.testing.assert_array_equal(np.concatenate(results), want)


def test_reduce_scatter_of_an_empty_first_dimension() -> None:
    with servers_of(2) as servers:
        results = on_every_task(
            servers, lambda rank, s: s.reduce_scatter(np.zeros((0, 3)), timeout=20)
        )
        assert [r.shape for r in results] == [(0, 3), (0, 3)]


@pytest.mark.parametrize("shape", [(7, 2), (1,), ()], ids=["7-rows", "1-row", "0d"])
def test_reduce_scatter_needs_rows_divisible_by_the_group(shape: tuple[int, ...]) -> None:
    with servers_of(3) as servers:
        results = outcomes(servers, lambda rank, s: s.reduce_scatter(np.ones(shape), timeout=20))
        assert_all_raise(results, errors.InvalidArgumentError, "multiple of 3")
        results = on_every_task(
            servers, lambda rank, s: s.reduce_scatter(np.full((3, 2), rank), timeout=20)
        )
        for result in results:
            np.testing.assert_array_equal(result, [[3, 3]])


# -- all_gather, broadcast, barrier -----------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize(
    "shape", [(), (3,), (2, 0), (300_001,)], ids=["0d", "1d", "empty", "large"]
)
def test_all_gather_stacks_in_rank_order(n: int, shape: tuple[int, ...]) -> None:
    with servers_of(n) as servers:
        inputs = [np.full(shape, rank * 10 + 1, np.int32) for rank in range(n)]
        results = on_every_task(servers, lambda rank, s: s.all_gather(inputs[rank], timeout=30))
        assert_bitwise_identical(results)
        assert results[0].shape == (n, *shape)
        np.testing.assert_array_equal(results[0], np.stack(inputs))


def test_all_gather_of_bfloat16() -> None:
    if BFLOAT16 is None:
        pytest.skip("ml_dtypes is not installed")
    with servers_of(2) as servers:
        inputs = [np.array([1.5, -2.25], BFLOAT16) * (r + 1) for r in range(2)]
        results = on_every_task(servers, lambda rank, s: s.all_gather(inputs[rank], timeout=20))
        assert results[1].dtype == BFLOAT16
        np.testing.assert_array_equal(results[1], np.stack(inputs))


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_broadcast_from_a_non_zero_root(large: bool) -> None:
    value = np.arange(500_001 if large else 5, dtype=np.float64) * 3
    root = "/job:worker/task:2"
    with servers_of(3) as servers:

        def broadcast(rank: int, server: distsrv.Server) -> np.ndarray:
            given = value if rank == 2 else (None if rank == 0 else np.zeros_like(value))
            return server.broadcast(given, root, timeout=30)

        results = on_every_task(servers, broadcast)
        assert_bitwise_identical(results)
        np.testing.assert_array_equal(results[0], value)
        # The root may be named as a tuple too, and the root's own result is its own copy.
        results = on_every_task(
            servers,
            lambda rank, s: s.broadcast(np.int16(7) if rank == 1 else None, ("worker", 1)),
        )
        assert [int(r) for r in results] == [7, 7, 7]


@pytest.mark.parametrize(
    "wrong",
    [np.zeros(4), np.zeros(5, np.float32), np.zeros((5, 1))],
    ids=["shape", "dtype", "rank"],
)
def test_broadcast_checks_what_a_non_root_gives(wrong: np.ndarray) -> None:
    value = np.arange(5, dtype=np.float64)
    with servers_of(3) as servers:

        def broadcast(rank: int, server: distsrv.Server) -> np.ndarray:
            given = {0: value, 1: wrong, 2: None}[rank]
            return server.broadcast(given, ("worker", 0), timeout=20)

        results = outcomes(servers, broadcast)
        # Members agree or fail together, and every one is told what the others gave.
        assert_all_raise(
            results, errors.InvalidArgumentError, "/job:worker/task:1 called broadcast"
        )
        for result in results:
            assert (
                "/job:worker/task:2 called broadcast(root=/job:worker/task:0) with no tensor"
                in str(result)
            )
        results = on_every_task(servers, lambda rank, s: s.broadcast(value, ("worker", 0)))
        np.testing.assert_array_equal(results[2], value)


def test_a_broadcast_root_must_give_the_tensor() -> None:
    with servers_of(2) as servers:
        results = outcomes(servers, lambda rank, s: s.broadcast(None, ("worker", 0), timeout=1))
        # The root refuses at once and so never joins: the other is told who is missing.
        assert isinstance(results[0], errors.InvalidArgumentError), results[0]
        assert "broadcast needs a tensor from its root" in str(results[0])
        assert isinstance(results[1], errors.DeadlineExceededError), results[1]
        assert "/job:worker/task:0 never joined it" in str(results[1])


def test_a_broadcast_root_outside_the_group_is_refused(local_server: distsrv.Server) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="not a member"):
        local_server.broadcast(np.zeros(2), ("localhost", 1), group=[local_server.task])


def test_barrier_waits_for_every_member() -> None:
    with servers_of(3) as servers:

        def barrier(rank: int, server: distsrv.Server) -> tuple[float, float]:
            if rank == 2:
                time.sleep(0.5)
            called = time.monotonic()
            server.barrier(timeout=20)
            return called, time.monotonic()

        times = on_every_task(servers, barrier)
        last_call = max(called for called, _ in times)
        assert all(returned >= last_call for _, returned in times), times
        assert times[0][1] - times[0][0] >= 0.4


# -- groups -----------------------------------------------------------------------------------


def two_job_cluster() -> distsrv.ClusterSpec:
    """A "worker" job of two tasks listed before a "chief" job of one: ranks follow sorted job
    names, so the chief is rank 0 of the whole cluster."""
    free = pair_cluster(3)
    addresses = [free.task_address("worker", i) for i in range(3)]
    return distsrv.ClusterSpec({"worker": addresses[:2], "chief": addresses[2:]})


def test_the_callers_job_is_the_default_group_and_star_the_whole_cluster() -> None:
    with servers_of(two_job_cluster()) as servers:
        chief = servers[0]
        assert chief.task.startswith("/job:chief")

        def work(rank: int, server: distsrv.Server) -> tuple[Any, Any]:
            everyone = server.all_gather(np.array([rank]), group="*", timeout=20)
            if server is chief:
                return everyone, None
            # By default, a collective's group is the caller's job.
            workers = server.all_reduce(np.array([rank * 100]), timeout=20)
            return everyone, workers

        results = on_every_task(servers, work)
        for everyone, _ in results:
            np.testing.assert_array_equal(everyone, [[0], [1], [2]])
        assert [workers[0] for _, workers in results[1:]] == [300, 300]


def test_an_explicit_task_list_leaves_the_other_tasks_alone() -> None:
    with servers_of(4) as servers:
        group = [("worker", 3), "/job:worker/replica:0/task:1"]

        def work(rank: int, server: distsrv.Server) -> Any:
            if rank in (1, 3):
                return server.all_gather(np.array(rank), group=group, timeout=20)
            # The others run their own pair meanwhile, and see nothing of the first.
            return server.all_gather(np.array(-rank), group=["/job:worker/task:2", ("worker", 0)])

        results = on_every_task(servers, work)
        np.testing.assert_array_equal(results[1], [3, 1])  # in the order listed
        np.testing.assert_array_equal(results[3], [3, 1])
        np.testing.assert_array_equal(results[0], [-2, 0])
        np.testing.assert_array_equal(results[2], [-2, 0])
        # The whole cluster's collectives are unaffected by the subgroups'.
        results = on_every_task(servers, lambda rank, s: s.all_reduce(np.array([rank]), "max"))
        assert [int(r[0]) for r in results] == [3, 3, 3, 3]


def test_a_task_outside_the_group_is_refused() -> None:
    with servers_of(3) as servers:
        started = time.monotonic()
        with pytest.raises(errors.InvalidArgumentError, match="not a member of the group"):
            servers[0].all_reduce(np.ones(2), group=[("worker", 1), ("worker", 2)], timeout=10)
        with pytest.raises(errors.InvalidArgumentError, match="not a member of the group"):
            servers[0].barrier(group=["/job:worker/task:2"], timeout=10)
        assert time.monotonic() - started < 2


def test_unknown_jobs_and_tasks_in_a_group_are_refused(local_server: distsrv.Server) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="no job 'ps'"):
        local_server.all_reduce(np.ones(2), group="ps", timeout=5)
    with pytest.raises(errors.InvalidArgumentError, match="not in the cluster spec"):
        local_server.all_gather(np.ones(2), group=[local_server.task, ("localhost", 5)], timeout=5)
    with pytest.raises(errors.InvalidArgumentError, match="not in the cluster spec"):
        local_server.barrier(group=[local_server.task, ("ps", 0)], timeout=5)
    with pytest.raises(TypeError, match="a task is"):
        local_server.barrier(group=[["localhost", 0]])  # type: ignore[list-item]


def test_two_groups_interleaving_from_threads_do_not_mix() -> None:
    rounds = 20
    pair_a, pair_b = [("worker", 0), ("worker", 1)], [("worker", 1), ("worker", 2)]
    with servers_of(3) as servers:
        # Task 1 belongs to both groups and runs each group's loop on its own thread.
        jobs = [(0, pair_a, 1), (1, pair_a, 1), (1, pair_b, 1000), (2, pair_b, 1000)]

        def loop(index: int, _: distsrv.Server) -> list[int]:
            rank, group, scale = jobs[index]
            got = []
            for step in range(rounds):
                value = np.array([scale * (step + 1) + rank], np.int64)
                got.append(int(servers[rank].all_reduce(value, group=group, timeout=20)[0]))
            return got

        results = on_every_task([servers[rank] for rank, _, _ in jobs], loop)
        want_a = [2 * (step + 1) + 1 for step in range(rounds)]
        want_b = [2000 * (step + 1) + 3 for step in range(rounds)]
        assert results == [want_a, want_a, want_b, want_b]


def test_many_successive_collectives_stay_in_step() -> None:
    with servers_of(3) as servers:

        def loop(rank: int, server: distsrv.Server) -> list[float]:
            got = []
            for step in range(50):
                value = np.array([step * 10.0 + rank])
                got.append(float(server.all_reduce(value, "max", timeout=20)[0]))
                if step % 10 == 0:
                    server.barrier(timeout=20)
            return got

        results = on_every_task(servers, loop)
        assert results == [[step * 10.0 + 2 for step in range(50)]] * 3


# -- reduce, gather, scatter, all_to_all -------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("large", [False, True], ids=["small", "ring"])
def test_reduce_gives_the_reduction_on_the_root_only(n: int, large: bool) -> None:
    count = RING_BYTES // 8 + 5 if large else 7
    inputs = [sample(np.dtype(np.float64), "sum", (count,), seed) for seed in range(n)]
    root = n - 1
    with servers_of(n) as servers:
        results = on_every_task(
            servers,
            lambda rank, s: s.reduce(inputs[rank], ("worker", root), "max", timeout=30),
        )
    assert all(result is None for result in results[:root])
    np.testing.assert_array_equal(results[root], np.maximum.reduce(inputs))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("shape", [(), (2, 3), (600_001,)], ids=["0d", "2d", "large"])
def test_gather_stacks_on_the_root_only(n: int, shape: tuple[int, ...]) -> None:
    inputs = [np.full(shape, rank + 1, np.int32) for rank in range(n)]
    with servers_of(n) as servers:
        results = on_every_task(
            servers, lambda rank, s: s.gather(inputs[rank], "/job:worker/task:0", timeout=30)
        )
    assert all(result is None for result in results[1:])
    np.testing.assert_array_equal(results[0], np.stack(inputs))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("row", [(), (4,), (700_001,)], ids=["0d", "1d", "large"])
def test_scatter_gives_each_rank_its_row_of_the_roots_array(n: int, row: tuple[int, ...]) -> None:
    value = np.arange(n * int(np.prod(row)), dtype=np.float32).reshape(n, *row)
    root = 1
    with servers_of(n) as servers:
        results = on_every_task(
            servers,
            lambda rank, s: s.scatter(
                value if rank == root else None, ("worker", root), timeout=30
            ),
        )
    for rank, result in enumerate(results):
        np.testing.assert_array_equal(result, value[rank])


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("row", [(), (5,), (400_001,)], ids=["0d", "1d", "large"])
def test_all_to_all_transposes_rows_among_ranks(n: int, row: tuple[int, ...]) -> None:
    size = int(np.prod(row))
    inputs = [
        np.arange(n * size, dtype=np.int64).reshape(n, *row) + 1000 * rank for rank in range(n)
    ]
    with servers_of(n) as servers:
        results = on_every_task(servers, lambda rank, s: s.all_to_all(inputs[rank], timeout=30))
    for rank, result in enumerate(results):
        np.testing.assert_array_equal(result, np.stack(inputs, axis=1)[rank])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.scatter(np.zeros(3), "/job:worker/task:0"), "must be 2"),
        (lambda s: s.all_to_all(np.zeros((3, 2))), "must be 2"),
        (lambda s: s.scatter(np.zeros((2, 1)), "/job:worker/task:1"), "only its root gives"),
        (lambda s: s.scatter(None, "/job:worker/task:0"), "needs a tensor from its root"),
        (lambda s: s.reduce(np.ones(2, np.int8), "/job:worker/task:0", "mean"), "mean"),
        (lambda s: s.gather(np.ones(2), "/job:worker/task:7"), "task:7"),
    ],
    ids=["scatter-rows", "all_to_all-rows", "scatter-non-root", "scatter-root", "mean", "root"],
)
def test_calls_that_cannot_work_are_refused_before_anything_is_sent(
    call: Callable[[distsrv.Server], Any], message: str
) -> None:
    with servers_of(2) as servers:
        with pytest.raises(errors.InvalidArgumentError, match=message):
            call(servers[0])
        # Nothing was sent, so the group is still in step.
        results = on_every_task(servers, lambda rank, s: s.all_gather(np.int8(rank), timeout=20))
        np.testing.assert_array_equal(results[0], [0, 1])


def test_all_gather_and_gather_follow_the_order_of_the_group_given() -> None:
    group = ["/job:worker/task:1", "/job:worker/task:0"]
    with servers_of(2) as servers:
        gathered = on_every_task(
            servers, lambda rank, s: s.all_gather(np.int8(rank), group=group, timeout=20)
        )
        np.testing.assert_array_equal(gathered[0], [1, 0])
        scattered = on_every_task(
            servers,
            lambda rank, s: s.scatter(
                np.array([10, 20]) if rank == 1 else None, group[0], group=group, timeout=20
            ),
        )
        assert [int(value) for value in scattered] == [20, 10]


# -- in the background, awaited, in place -------------------------------------------------------


def test_iall_reduce_returns_at_once_and_its_handle_gives_the_result() -> None:
    with servers_of(2) as servers:
        first = servers[0].iall_reduce(np.full(4, 1.0))
        assert not first.done()  # the other member has not joined
        second = servers[1].iall_reduce(np.full(4, 2.0))
        for handle in (first, second):
            np.testing.assert_array_equal(handle.wait(timeout=20), np.full(4, 3.0))
            assert handle.done()


def test_every_collective_has_a_background_form() -> None:
    with servers_of(2) as servers:

        def started(rank: int, s: distsrv.Server) -> list[distsrv.CollectiveHandle]:
            root = "/job:worker/task:0"
            return [
                s.iall_reduce(np.full(2, rank + 1), "prod"),
                s.ireduce_scatter(np.full(2, rank + 1)),
                s.iall_gather(np.int8(rank)),
                s.ibroadcast(np.int8(7) if rank == 0 else None, root),
                s.ibarrier(),
                s.ireduce(np.int8(rank + 1), root),
                s.igather(np.int8(rank), root),
                s.iscatter(np.array([5, 6]) if rank == 0 else None, root),
                s.iall_to_all(np.array([rank, rank + 10])),
            ]

        handles = on_every_task(servers, started)
        results = [[handle.wait(timeout=20) for handle in mine] for mine in handles]
    want: list[list[Any]] = [
        [[2, 2], [3], [0, 1], 7, None, 3, [0, 1], 5, [0, 1]],
        [[2, 2], [3], [0, 1], 7, None, None, None, 6, [10, 11]],
    ]
    for rank in range(2):
        for got, expected_value in zip(results[rank], want[rank], strict=True):
            if expected_value is None:
                assert got is None
            else:
                np.testing.assert_array_equal(got, expected_value)


def test_collectives_started_together_keep_the_order_they_were_called_in() -> None:
    # As a trainer reduces each layer's gradients while computing the next: every member starts
    # them all before waiting on any, sizes that go all-to-all and round the ring mixed.
    sizes = [3, RING_BYTES // 4 + 1, 1, 1000, RING_BYTES // 2, 7, 2, 5]
    with servers_of(3) as servers:

        def started(rank: int, s: distsrv.Server) -> list[distsrv.CollectiveHandle]:
            arrays = [np.full(size, rank + i, np.float32) for i, size in enumerate(sizes)]
            return [s.iall_reduce(array) for array in arrays]

        handles = on_every_task(servers, started)
        for mine in handles:
            for i, (handle, size) in enumerate(zip(mine, sizes, strict=True)):
                np.testing.assert_array_equal(handle.wait(timeout=30), np.full(size, 3 + 3 * i))


def test_a_handle_re_raises_the_collectives_error() -> None:
    with servers_of(2) as servers:
        handle = servers[0].iall_reduce(np.ones(2), timeout=0.3)
        with pytest.raises(errors.DeadlineExceededError, match="never joined"):
            handle.wait(timeout=20)


def test_awaited_collectives_leave_the_event_loop_free() -> None:
    import asyncio

    with servers_of(2) as servers:

        async def main() -> tuple[Any, ...]:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            first = asyncio.create_task(servers[0].aall_reduce(np.full(3, 1.0)))
            await asyncio.sleep(0.2)  # the loop runs while the reduction waits for its peer
            assert ticks >= 5
            second = servers[1].aall_reduce(np.full(3, 2.0))
            barriers = servers[0].abarrier(), servers[1].abarrier()
            results = await asyncio.gather(first, second, *barriers)
            ticker.cancel()
            return tuple(results)

        reduced, other, *barriers = asyncio.run(main())
    np.testing.assert_array_equal(reduced, np.full(3, 3.0))
    np.testing.assert_array_equal(other, reduced)
    assert barriers == [None, None]


def test_out_receives_the_result_in_place() -> None:
    with servers_of(2) as servers:
        grads = [np.full(4, rank + 1.0) for rank in range(2)]
        results = on_every_task(
            servers, lambda rank, s: s.all_reduce(grads[rank], "mean", out=grads[rank])
        )
        for rank in range(2):
            assert results[rank] is grads[rank]
            np.testing.assert_array_equal(grads[rank], np.full(4, 1.5))
        buffers = [np.zeros(3, np.float32) for _ in range(2)]
        value = np.arange(3, dtype=np.float32)
        handles = [
            servers[0].ibroadcast(value, servers[0].task, out=buffers[0]),
            servers[1].ibroadcast(buffers[1], servers[0].task, out=buffers[1]),
        ]
        for handle, buffer in zip(handles, buffers, strict=True):
            assert handle.wait(timeout=20) is buffer
        np.testing.assert_array_equal(buffers[1], value)
        with pytest.raises(errors.InvalidArgumentError, match="out has shape"):
            on_every_task(servers, lambda rank, s: s.all_reduce(np.ones(2), out=np.zeros(3)))


# -- timeouts and failures --------------------------------------------------------------------


@pytest.mark.parametrize("call", ["all_reduce", "ring", "reduce_scatter", "all_gather", "barrier"])
def test_a_member_that_never_calls_times_the_others_out(call: str) -> None:
    with servers_of(3) as servers:
        array = np.ones(RING_BYTES // 4 + 2 if call == "ring" else 3, np.float32)

        def work(rank: int, server: distsrv.Server) -> Any:
            if rank == 1:
                return None
            started = time.monotonic()
            try:
                if call == "barrier":
                    server.barrier(timeout=0.5)
                elif call == "all_gather":
                    server.all_gather(array, timeout=0.5)
                elif call == "reduce_scatter":
                    server.reduce_scatter(array, timeout=0.5)
                else:
                    server.all_reduce(array, timeout=0.5)
            # The first to time out gives up; the other may hear of that before its own
            # timeout comes.
            except (errors.DeadlineExceededError, errors.AbortedError) as error:
                return type(error), time.monotonic() - started
            return "returned"

        results = outcomes(servers, work)
        for rank in (0, 2):
            assert isinstance(results[rank], tuple), results[rank]
            assert 0.4 <= results[rank][1] < 5
        assert errors.DeadlineExceededError in {results[0][0], results[2][0]}, results


def test_a_collective_without_a_timeout_is_held_to_the_configs() -> None:
    assert distsrv.ServerConfig().collective_timeout == 30 * 60
    config = distsrv.ServerConfig(connect_timeout=2.0, collective_timeout=0.5)
    with servers_of(2, config) as servers:
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceededError, match=r"within 0\.500s"):
            servers[0].barrier()
        assert time.monotonic() - started < 5
        # A timeout given wins over the config's.
        with pytest.raises(errors.DeadlineExceededError, match=r"within 0\.200s"):
            servers[0].all_reduce(np.ones(3), timeout=0.2)


def test_members_that_wait_without_a_timeout_are_told_when_another_gives_up() -> None:
    # The third member never calls: the member with a timeout gives up, names the member that
    # never joined, and tells the member without a timeout through its heartbeat answers.
    with servers_of(3, distsrv.ServerConfig(connect_timeout=2.0, peer_timeout=0.5)) as servers:

        def work(rank: int, server: distsrv.Server) -> Any:
            if rank == 0:
                server.barrier(timeout=0.5)
            elif rank == 1:
                server.all_reduce(np.ones(3, np.float32))

        results = outcomes(servers, work, limit=20)
        assert isinstance(results[0], errors.DeadlineExceededError), results[0]
        assert "/job:worker/task:2 never joined it" in str(results[0])
        assert isinstance(results[1], errors.AbortedError), results[1]
        assert "/job:worker/task:0 gave it up" in str(results[1])


CHILD = textwrap.dedent(
    """
    import os, sys, time
    import distsrv
    spec = distsrv.ClusterSpec({"worker": sys.argv[1].split(",")})
    config = distsrv.ServerConfig(connect_timeout=1.0)
    server = distsrv.Server(spec, "worker", int(sys.argv[2]), config=config)
    print("ready", flush=True)
    if sys.argv[3] == "exit":
        time.sleep(float(sys.argv[4]))
        os._exit(0)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("how", ["exits", "killed"])
@pytest.mark.parametrize("large", [False, True], ids=["small", "ring"])
def test_a_member_that_dies_makes_the_others_unavailable(how: str, large: bool) -> None:
    spec = pair_cluster(3)
    addresses = ",".join(spec.task_address("worker", i) for i in range(3))
    dead = 1  # the others wait on it, and on each other
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            addresses,
            str(dead),
            "exit" if how == "exits" else "wait",
            "1.0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(child, 30) == "ready"
        config = distsrv.ServerConfig(connect_timeout=1.0)
        live = [distsrv.Server(spec, "worker", i, config=config) for i in (0, 2)]
        try:
            array = np.ones(RING_BYTES // 4 if large else 3, np.float32)

            def work(rank: int, server: distsrv.Server) -> Any:
                if rank == 0 and how == "killed":
                    threading.Timer(0.5, child.kill).start()
                started = time.monotonic()
                try:
                    server.all_reduce(array)
                except errors.UnavailableError as error:
                    return time.monotonic() - started, str(error)
                return "returned"

            results = outcomes(live, work, limit=30)
            for result in results:
                assert isinstance(result, tuple), result
                elapsed, message = result
                assert elapsed < 10, result
                assert "/job:worker/task:1" in message
        finally:
            for server in live:
                server.stop(grace=0)
    finally:
        child.kill()
        child.communicate(timeout=10)
