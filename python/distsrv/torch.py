"""distsrv as a ``torch.distributed`` backend.

Importing this module registers the backend ``"distsrv"`` for CPU tensors::

    import distsrv.torch
    torch.distributed.init_process_group("distsrv", rank=rank, world_size=world_size)

Then torch's collectives (``all_reduce`` with SUM, AVG, PRODUCT, MIN and MAX, ``broadcast``,
``all_gather`` and ``all_gather_into_tensor``, ``reduce_scatter`` and
``reduce_scatter_tensor``, ``reduce``, ``gather``, ``scatter``, ``all_to_all`` with even
splits, ``barrier``, ``send``/``recv``/``isend``/``irecv``) run over distsrv, and
``DistributedDataParallel`` works on the group unchanged. Each process group is a distsrv
server of its own, one task per rank, which finds the others through the group's store (the
``init_method``: ``env://``, ``tcp://``, a file). A task listens on ``$DISTSRV_HOST`` if set,
else on the address its route to the store's host leaves from (127.0.0.1 for a store without
a host); ``$DISTSRV_TOKEN`` and ``$DISTSRV_TLS_*`` secure it as they do any server.

Operations start at once and complete in the background, in the order they were issued, as
torch's ``Work`` objects and futures expect; a failure surfaces as
``torch.distributed.DistBackendError`` naming distsrv's error (``DeadlineExceededError`` past
the group's timeout), chained to it.
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
    """An operation in flight, done when its future is: torch's ``Work``."""

    def __init__(self) -> None:
        super().__init__()
        self._future: torch.futures.Future[Tensors] = torch.futures.Future()

    def wait(self, timeout: timedelta | None = None) -> bool:
        self._future.wait()
        return True

    def get_future(self) -> torch.futures.Future[Tensors]:
        return self._future

    def is_completed(self) -> bool:
        return self._future.done()

    def is_success(self) -> bool:
        return self.exception() is None if self._future.done() else False

    def exception(self) -> BaseException | None:
        if not self._future.done():
            return None
        try:
            self._future.value()
        except Exception as error:
            return error
        return None


class _Completer:
    """One thread that finishes operations in the order they were issued: a finish waits for
    its distsrv handles and gives the tensors the operation's future holds."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Tensors], Work] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, finish: Callable[[], Tensors]) -> Work:
        work = Work()
        self._queue.put((finish, work))
        return work

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            finish, work = item
            try:
                tensors = finish()
            except OpError as error:
                failure = dist.DistBackendError(f"distsrv: {type(error).__name__}: {error}")
                failure.__cause__ = error
                # torch's stub types set_exception's argument as the future's value.
                work.get_future().set_exception(failure)  # type: ignore[arg-type]
            except Exception as error:
                work.get_future().set_exception(error)  # type: ignore[arg-type]
            else:
                work.get_future().set_result(tensors)


class ProcessGroup(dist.ProcessGroup):
    """A torch process group whose ranks are the tasks of one distsrv cluster."""

    def __init__(
        self,
        store: Store,
        rank: int,
        world_size: int,
        timeout: timedelta,
        global_ranks: Sequence[int] | None = None,
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
            security=Security.from_env(),
        )
        self._server.wait_for_cluster(self._timeout)
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
        timeout = self._seconds(opts)
        handles = [self._server.iall_reduce(t, op, timeout=timeout, inplace=True) for t in tensors]
        return self._collective(handles, tensors)

    def allreduce_coalesced(self, tensors: Tensors, opts: Any) -> Work:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: Tensors, opts: Any) -> Work:
        root = opts.rootRank
        timeout = self._seconds(opts)
        handles = [
            self._server.ibroadcast(
                t if self.rank() == root else None, self._task(root), timeout=timeout, out=t
            )
            for t in tensors
        ]
        return self._collective(handles, tensors)

    def allgather(self, outputs: list[Tensors], inputs: Tensors, opts: Any) -> Work:
        timeout = self._seconds(opts)
        handles = [self._server.iall_gather(t, timeout=timeout) for t in inputs]

        def finish() -> Tensors:
            for handle, targets in zip(handles, outputs, strict=True):
                _copy_rows(handle.wait(), targets)
            return [t for targets in outputs for t in targets]

        return self._collectives.submit(finish)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Work:
        rows = output.view(self.size(), *input.shape)
        handle = self._server.iall_gather(input, timeout=self._seconds(opts), out=rows)
        return self._collective([handle], [output])

    def all_gather_single_coalesced(self, outputs: Tensors, inputs: Tensors, opts: Any) -> Work:
        timeout = self._seconds(opts)
        handles = [
            self._server.iall_gather(t, timeout=timeout, out=o.view(self.size(), *t.shape))
            for o, t in zip(outputs, inputs, strict=True)
        ]
        return self._collective(handles, outputs)

    def reduce_scatter(self, outputs: Tensors, inputs: list[Tensors], opts: Any) -> Work:
        op = _op(opts.reduceOp)
        timeout = self._seconds(opts)
        handles = [
            self._server.ireduce_scatter(
                torch.stack(shares), op, timeout=timeout, out=o.view(1, *o.shape)
            )
            for o, shares in zip(outputs, inputs, strict=True)
        ]
        return self._collective(handles, outputs)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Work:
        handle = self._server.ireduce_scatter(
            input.view(self.size(), *output.shape),
            _op(opts.reduceOp),
            timeout=self._seconds(opts),
            out=output.view(1, *output.shape),
        )
        return self._collective([handle], [output])

    def reduce_scatter_single_coalesced(self, outputs: Tensors, inputs: Tensors, opts: Any) -> Work:
        op = _op(opts.reduceOp)
        timeout = self._seconds(opts)
        handles = [
            self._server.ireduce_scatter(
                i.view(self.size(), *o.shape), op, timeout=timeout, out=o.view(1, *o.shape)
            )
            for o, i in zip(outputs, inputs, strict=True)
        ]
        return self._collective(handles, outputs)

    def reduce(self, tensors: Tensors, opts: Any) -> Work:
        root = opts.rootRank
        is_root = self.rank() == root
        handles = [
            self._server.ireduce(
                t,
                self._task(root),
                _op(opts.reduceOp),
                timeout=self._seconds(opts),
                out=t if is_root else None,
            )
            for t in tensors
        ]
        return self._collective(handles, tensors)

    def gather(self, outputs: list[Tensors], inputs: Tensors, opts: Any) -> Work:
        root = opts.rootRank
        handles = [
            self._server.igather(t, self._task(root), timeout=self._seconds(opts)) for t in inputs
        ]

        def finish() -> Tensors:
            for index, handle in enumerate(handles):
                gathered = handle.wait()
                if gathered is not None:
                    _copy_rows(gathered, outputs[index])
            return [t for targets in outputs for t in targets]

        return self._collectives.submit(finish)

    def scatter(self, outputs: Tensors, inputs: list[Tensors], opts: Any) -> Work:
        root = opts.rootRank
        is_root = self.rank() == root
        handles = [
            self._server.iscatter(
                torch.stack(inputs[index]) if is_root else None,
                self._task(root),
                timeout=self._seconds(opts),
                out=o,
            )
            for index, o in enumerate(outputs)
        ]
        return self._collective(handles, outputs)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any,
    ) -> Work:
        if len(set(output_split_sizes)) > 1 or len(set(input_split_sizes)) > 1:
            raise ValueError("the distsrv backend's all_to_all takes even splits only")
        handle = self._server.iall_to_all(
            input.reshape(self.size(), -1),
            timeout=self._seconds(opts),
            out=output.view(self.size(), -1),
        )
        return self._collective([handle], [output])

    def alltoall(self, outputs: Tensors, inputs: Tensors, opts: Any) -> Work:
        handle = self._server.iall_to_all(torch.stack(inputs), timeout=self._seconds(opts))

        def finish() -> Tensors:
            _copy_rows(handle.wait(), outputs)
            return outputs

        return self._collectives.submit(finish)

    def allgather_coalesced(self, outputs: list[Tensors], inputs: Tensors, opts: Any) -> Work:
        return self.allgather(outputs, inputs, opts)

    # torch before 2.15 calls these by their earlier names.
    _allgather_base = all_gather_single
    allgather_into_tensor_coalesced = all_gather_single_coalesced
    _reduce_scatter_base = reduce_scatter_single
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced
    alltoall_base = all_to_all_single

    def barrier(self, opts: Any) -> Work:
        handle = self._server.ibarrier(timeout=self._seconds(opts))
        return self._collective([handle], [])

    # -- point to point ---------------------------------------------------------------------

    def send(self, tensors: Tensors, dstRank: int, tag: int) -> Work:
        handles = [self._server.isend(_message(tag), t, self._task(dstRank)) for t in tensors]

        def finish() -> Tensors:
            for handle in handles:
                handle.wait()
            return tensors

        return self._messages.submit(finish)

    def recv(self, tensors: Tensors, srcRank: int, tag: int) -> Work:
        handles = [
            self._server.irecv(_message(tag), self._task(srcRank), self._timeout, out=t)
            for t in tensors
        ]

        def finish() -> Tensors:
            for handle in handles:
                handle.wait()
            return tensors

        return self._messages.submit(finish)

    def recv_anysource(self, tensors: Tensors, tag: int) -> Work:
        def finish() -> Tensors:
            others = [self._task(r) for r in range(self.size()) if r != self.rank()]
            for t in tensors:
                self._server.recv_any(_message(tag), others, self._timeout, out=t)
            return tensors

        return self._messages.submit(finish)

    # -- helpers ----------------------------------------------------------------------------

    def _collective(self, handles: Sequence[Any], results: Tensors) -> Work:
        def finish() -> Tensors:
            for handle in handles:
                handle.wait()
            return results

        return self._collectives.submit(finish)

    def _task(self, rank: int) -> tuple[str, int]:
        return (JOB, self._global_ranks[rank])

    def _seconds(self, opts: Any) -> float:
        """The operation's timeout: its own where torch set one, else the group's."""
        own = opts.timeout.total_seconds()
        return own if own > 0 else self._timeout


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
    return ProcessGroup(
        options.store,
        options.group_rank,
        options.group_size,
        options.timeout,
        options.global_ranks_in_group,
    )


dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])
