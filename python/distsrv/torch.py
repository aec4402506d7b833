"""distsrv as a ``torch.distributed`` backend.

Importing this module registers the backend ``"distsrv"`` for CPU tensors::

    import distsrv.torch
    torch.distributed.init_process_group("distsrv", rank=rank, world_size=world_size)

Then torch's collectives (``all_reduce`` with SUM, AVG, PRODUCT, MIN and MAX, ``broadcast``,
``all_gather`` and ``all_gather_into_tensor``, ``reduce_scatter`` and ``reduce_scatter_tensor``,
``reduce``, ``gather``, ``scatter``, ``all_to_all`` (uneven splits as point-to-point messages),
``barrier``, ``send``/``recv``/``isend``/``irecv``) run over distsrv, and
``DistributedDataParallel`` works on the group unchanged. Each process group is a distsrv server
of its own, one task per rank, which finds the others through the group's store (the
``init_method``: ``env://``, ``tcp://``, a file). A task listens on ``$DISTSRV_HOST`` if set,
else on the address its route to the store's host leaves from (127.0.0.1 for a store without a
host); ``$DISTSRV_TOKEN`` and ``$DISTSRV_TLS_*`` secure it as they do any server, and
``init_process_group``'s ``pg_options`` may be its :class:`distsrv.ServerConfig` (a shorter
``peer_timeout``, say: a rank lost or frozen fails the others' operations within it).

A collective torch waits on at once (a call without ``async_op``) runs in distsrv's blocking
form; the rest start when called and complete in the background (their futures on one thread
per group, in the order they were handed to it), as torch's ``Work`` objects and futures
expect. A failure surfaces as ``torch.distributed.DistBackendError`` naming distsrv's error
(``DeadlineExceededError`` past the group's timeout), chained to it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore
from torch._C._distributed_c10d import Work as TorchWork

from distsrv import _native
from distsrv.config import ServerConfig
from distsrv.errors import OpError
from distsrv.launch import free_ports
from distsrv.rendezvous import host_towards
from distsrv.security import Security
from distsrv.server import ReduceOp, Server

__all__ = ["BACKEND", "ProcessGroup"]

#: The name to give ``torch.distributed.init_process_group``.
BACKEND = "distsrv"
#: The job of every rank's task: ``/job:worker/task:<global rank>``, the names that the
#: per-task certificates of ``distsrv launch --jobs worker=N --security temporary`` carry.
JOB = "worker"

_OPS: dict[Any, ReduceOp] = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "mean",
    dist.ReduceOp.PRODUCT: "prod",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
}

Tensors = list[torch.Tensor]


class Work(TorchWork):
    """An operation in flight: torch's ``Work``. Its finish (waiting for its distsrv handles,
    then giving the tensors its future holds) runs once, in the first thread that needs it: the
    caller of ``wait()``, with no thread between it and distsrv, or, once someone holds the
    future or polls, the group's completer thread."""

    def __init__(self, finish: Callable[[], Tensors], completer: _Completer) -> None:
        super().__init__()
        self._finish: Callable[[], Tensors] | None = finish
        self._completer = completer
        self._claim = threading.Lock()
        self._future: torch.futures.Future[Tensors] = torch.futures.Future()
        #: The group rank a receive from any source got its tensor from, once it has.
        self.source: int | None = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        self.complete()
        self._future.wait()  # raises the operation's error
        return True

    def get_future(self) -> torch.futures.Future[Tensors]:
        self._in_background()
        return self._future

    def is_completed(self) -> bool:
        self._in_background()
        return self._future.done()

    def is_success(self) -> bool:
        return self.is_completed() and self.exception() is None

    def _source_rank(self) -> int:
        if self.source is None:
            raise RuntimeError("only a finished receive from any source has a source rank")
        return self.source

    source_rank = _source_rank

    def exception(self) -> BaseException | None:
        if not self._future.done():
            return None
        try:
            self._future.value()
        except Exception as error:
            return error
        return None

    def complete(self) -> None:
        """Runs the finish here, unless another thread has taken it (then returns at once)."""
        with self._claim:
            finish, self._finish = self._finish, None
        if finish is None:
            return
        try:
            tensors = finish()
        except OpError as error:
            failure = _torch_error(error)
            failure.__cause__ = error
            # torch's stub types set_exception's argument as the future's value.
            self._future.set_exception(failure)  # type: ignore[arg-type]
        except Exception as error:
            self._future.set_exception(error)  # type: ignore[arg-type]
        else:
            self._future.set_result(tensors)

    def _in_background(self) -> None:
        if self._finish is not None:
            self._completer.submit(self)


class _Completer:
    """One thread that completes, in the order they were handed to it, the operations whose
    future someone holds (DDP chains its gradient buckets' futures)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def work(self, finish: Callable[[], Tensors]) -> Work:
        return Work(finish, self)

    def submit(self, work: Work) -> None:
        self._queue.put(work)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            work.complete()


class ProcessGroup(dist.ProcessGroup):
    """A torch process group whose ranks are the tasks of one distsrv cluster."""

    def __init__(
        self,
        store: Store,
        rank: int,
        world_size: int,
        timeout: timedelta,
        global_ranks: Sequence[int] | None = None,
        config: ServerConfig | None = None,
    ) -> None:
        super().__init__(rank, world_size)
        self._timeout = timeout.total_seconds()
        # A subgroup's ranks are its own; its tasks are named by their ranks in the world.
        self._global_ranks = list(global_ranks or range(world_size))
        host = _own_host(store)
        port = free_ports(1, host)[0]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        store.set(f"distsrv/{rank}", address)
        tasks = {
            self._global_ranks[other]: store.get(f"distsrv/{other}").decode()
            for other in range(world_size)
        }
        self._server = Server(
            {JOB: tasks},
            job_name=JOB,
            task_index=self._global_ranks[rank],
            config=config,
            security=Security.from_env(),
        )
        self._server.wait_for_cluster(self._timeout)
        self._uneven_calls = 0
        self._collectives = _Completer(f"distsrv-torch-{rank}-collectives")
        self._messages = _Completer(f"distsrv-torch-{rank}-messages")

    @property
    def server(self) -> Server:
        """The distsrv server of this rank."""
        return self._server

    def getBackendName(self) -> str:
        return BACKEND

    def shutdown(self) -> None:
        self._collectives.stop()
        self._messages.stop()
        self._server.close()

    # -- collectives ------------------------------------------------------------------------

    def allreduce(self, tensors: Tensors, opts: Any) -> Work:
        op = _op(opts.reduceOp)
        waits = [self._start(opts, "all_reduce", t, op, inplace=True) for t in tensors]
        return self._collective(waits, tensors)

    def allreduce_coalesced(self, tensors: Tensors, opts: Any) -> Work:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: Tensors, opts: Any) -> Work:
        root, is_root = self._root(opts)
        waits = [
            self._start(opts, "broadcast", t if is_root else None, root, out=t) for t in tensors
        ]
        return self._collective(waits, tensors)

    def allgather(self, outputs: list[Tensors], inputs: Tensors, opts: Any) -> Work:
        waits = [self._start(opts, "all_gather", t) for t in inputs]

        def finish() -> Tensors:
            for wait, targets in zip(waits, outputs, strict=True):
                _copy_rows(wait(), targets)
            return [t for targets in outputs for t in targets]

        return self._collectives.work(finish)

    def allgather_coalesced(self, outputs: list[Tensors], inputs: Tensors, opts: Any) -> Work:
        return self.allgather(outputs, inputs, opts)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Work:
        return self.all_gather_single_coalesced([output], [input], opts)

    def all_gather_single_coalesced(self, outputs: Tensors, inputs: Tensors, opts: Any) -> Work:
        waits = [
            self._start(opts, "all_gather", t, out=o.view(self.size(), *t.shape))
            for o, t in zip(outputs, inputs, strict=True)
        ]
        return self._collective(waits, outputs)

    def reduce_scatter(self, outputs: Tensors, inputs: list[Tensors], opts: Any) -> Work:
        op = _op(opts.reduceOp)
        waits = [
            self._start(opts, "reduce_scatter", torch.stack(shares), op, out=o.view(1, *o.shape))
            for o, shares in zip(outputs, inputs, strict=True)
        ]
        return self._collective(waits, outputs)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Work:
        return self.reduce_scatter_single_coalesced([output], [input], opts)

    def reduce_scatter_single_coalesced(self, outputs: Tensors, inputs: Tensors, opts: Any) -> Work:
        op = _op(opts.reduceOp)
        waits = [
            self._start(
                opts,
                "reduce_scatter",
                i.view(self.size(), *o.shape),
                op,
                out=o.view(1, *o.shape),
            )
            for o, i in zip(outputs, inputs, strict=True)
        ]
        return self._collective(waits, outputs)

    def reduce(self, tensors: Tensors, opts: Any) -> Work:
        root, is_root = self._root(opts)
        op = _op(opts.reduceOp)
        waits = [
            self._start(opts, "reduce", t, root, op, out=t if is_root else None) for t in tensors
        ]
        return self._collective(waits, tensors)

    def gather(self, outputs: list[Tensors], inputs: Tensors, opts: Any) -> Work:
        root, _ = self._root(opts)
        waits = [self._start(opts, "gather", t, root) for t in inputs]

        def finish() -> Tensors:
            for wait, targets in zip(waits, outputs or [[]] * len(waits), strict=True):
                gathered = wait()
                if gathered is not None:
                    _copy_rows(gathered, targets)
            return [t for targets in outputs for t in targets]

        return self._collectives.work(finish)

    def scatter(self, outputs: Tensors, inputs: list[Tensors], opts: Any) -> Work:
        root, is_root = self._root(opts)
        waits = [
            self._start(
                opts, "scatter", torch.stack(inputs[index]) if is_root else None, root, out=o
            )
            for index, o in enumerate(outputs)
        ]
        return self._collective(waits, outputs)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any,
    ) -> Work:
        if len(set(output_split_sizes)) > 1 or len(set(input_split_sizes)) > 1:
            return self._uneven_all_to_all(
                output, input, output_split_sizes, input_split_sizes, opts
            )
        rows = output.view(self.size(), -1)
        wait = self._start(opts, "all_to_all", input.reshape(self.size(), -1), out=rows)
        return self._collective([wait], [output])

    def _uneven_all_to_all(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any,
    ) -> Work:
        """Chunk ``j`` of the input to rank ``j`` and chunk ``i`` of the output from rank ``i``,
        as messages named by the call's place among this group's uneven all_to_alls (which
        every rank makes in the same order, as it makes all its collectives)."""
        self._uneven_calls += 1
        name = f"torch.all_to_all/{self._uneven_calls}"
        even = [output.shape[0] // self.size()] * self.size()
        received = torch.split(output, list(output_split_sizes) or even)
        sent = torch.split(input, list(input_split_sizes) or even)
        me = self.rank()
        timeout = self._seconds(opts)
        receives = [
            self._server.irecv(name, self._task(rank), timeout, out=chunk)
            for rank, chunk in enumerate(received)
            if rank != me
        ]
        sends = [
            self._server.isend(name, chunk, self._task(rank))
            for rank, chunk in enumerate(sent)
            if rank != me
        ]
        received[me].copy_(sent[me])
        waits = [handle.wait for handle in receives] + [handle.wait for handle in sends]
        return self._collective(waits, [output])

    def alltoall(self, outputs: Tensors, inputs: Tensors, opts: Any) -> Work:
        wait = self._start(opts, "all_to_all", torch.stack(inputs))

        def finish() -> Tensors:
            _copy_rows(wait(), outputs)
            return outputs

        return self._collectives.work(finish)

    # torch before 2.15 calls these by their earlier names.
    _allgather_base = all_gather_single
    allgather_into_tensor_coalesced = all_gather_single_coalesced
    _reduce_scatter_base = reduce_scatter_single
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced
    alltoall_base = all_to_all_single

    def barrier(self, opts: Any) -> Work:
        return self._collective([self._start(opts, "barrier")], [])

    # -- point to point ---------------------------------------------------------------------

    def send(self, tensors: Tensors, dstRank: int, tag: int) -> Work:
        handles = [self._server.isend(_message(tag), t, self._task(dstRank)) for t in tensors]

        def finish() -> Tensors:
            for handle in handles:
                handle.wait()
            return tensors

        return self._messages.work(finish)

    def recv(self, tensors: Tensors, srcRank: int, tag: int) -> Work:
        handles = [
            self._server.irecv(_message(tag), self._task(srcRank), self._timeout, out=t)
            for t in tensors
        ]

        def finish() -> Tensors:
            for handle in handles:
                handle.wait()
            return tensors

        return self._messages.work(finish)

    def recv_anysource(self, tensors: Tensors, tag: int) -> Work:
        def finish() -> Tensors:
            others = [self._task(r) for r in range(self.size()) if r != self.rank()]
            for t in tensors:
                source, _ = self._server.recv_any(_message(tag), others, self._timeout, out=t)
                _, global_rank = _native.parse_task(source)
                work.source = self._global_ranks.index(global_rank)
            return tensors

        work = self._messages.work(finish)
        return work

    # -- helpers ----------------------------------------------------------------------------

    def _start(self, opts: Any, name: str, *args: Any, **kwargs: Any) -> Callable[[], Any]:
        """Starts collective ``name`` of the server; what waits for its result. torch marks a
        call it waits on at once (no ``async_op``): that one runs here, in distsrv's blocking
        form, which is quicker than a background one and a wait; others run in the
        background. A failure is kept for the wait, where the Work makes it torch's."""
        timeout = self._seconds(opts)
        if opts.asyncOp:
            handle = getattr(self._server, "i" + name)(*args, timeout=timeout, **kwargs)
            return handle.wait  # type: ignore[no-any-return]
        try:
            result = getattr(self._server, name)(*args, timeout=timeout, **kwargs)
        except OpError as error:
            failure = error

            def fail() -> Any:
                raise failure

            return fail
        return lambda: result

    def _collective(self, waits: Sequence[Callable[[], Any]], results: Tensors) -> Work:
        def finish() -> Tensors:
            for wait in waits:
                wait()
            return results

        return self._collectives.work(finish)

    def _root(self, opts: Any) -> tuple[tuple[str, int], bool]:
        """The root task of a rooted collective, and whether it is this one."""
        return self._task(opts.rootRank), self.rank() == opts.rootRank

    def _task(self, rank: int) -> tuple[str, int]:
        return (JOB, self._global_ranks[rank])

    def _seconds(self, opts: Any) -> float:
        """The operation's timeout: its own where torch set one, else the group's."""
        own = opts.timeout.total_seconds()
        return own if own > 0 else self._timeout


def _torch_error(error: OpError) -> dist.DistBackendError:
    """distsrv's ``error`` as torch's backend error, which names it."""
    return dist.DistBackendError(f"distsrv: {type(error).__name__}: {error}")


def _own_host(store: Store) -> str:
    if host := os.environ.get("DISTSRV_HOST"):
        return host
    while isinstance(store, PrefixStore):
        store = store.underlying_store
    if isinstance(store, TCPStore):
        return host_towards(store.host, store.port)
    return "127.0.0.1"


def _op(reduce_op: Any) -> ReduceOp:
    for torch_op, name in _OPS.items():
        if reduce_op == torch_op:
            return name
    names = dist.ReduceOp.RedOpType.__members__.items()
    given = next((name for name, value in names if reduce_op == value), str(reduce_op))
    raise ValueError(
        f"the distsrv backend does not support ReduceOp.{given}: use SUM, AVG, PRODUCT, MIN or MAX"
    )


def _message(tag: int) -> str:
    return f"torch.distributed/{tag}"


def _copy_rows(rows: Any, targets: Tensors) -> None:
    for row, target in zip(rows, targets, strict=True):
        target.copy_(row)


def _create(options: Any, backend_options: Any) -> ProcessGroup:
    """The group torch asks for; ``init_process_group``'s ``pg_options`` may be the
    :class:`distsrv.ServerConfig` of its tasks."""
    if backend_options is not None and not isinstance(backend_options, ServerConfig):
        raise TypeError(
            "pg_options of the distsrv backend must be a distsrv.ServerConfig, not "
            f"{type(backend_options).__name__}"
        )
    try:
        return ProcessGroup(
            options.store,
            options.group_rank,
            options.group_size,
            options.timeout,
            options.global_ranks_in_group,
            backend_options,
        )
    except OpError as error:  # a peer refused (a wrong token) or never came up
        raise _torch_error(error) from error


dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])
