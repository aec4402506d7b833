"""``distsrv.Server``: the server every task of a cluster runs."""

from __future__ import annotations

import ipaddress
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from distsrv import _native, shutdown
from distsrv.cluster import ClusterLike, ClusterSpec
from distsrv.config import ServerConfig
from distsrv.devices import DeviceAttributes
from distsrv.errors import InvalidArgumentError
from distsrv.handlers import EventLoop, is_async, wants_context
from distsrv.handles import CallHandle, CollectiveHandle, Destination, RecvHandle, SendHandle
from distsrv.interop import TensorLike, as_array
from distsrv.messages import ServerDef
from distsrv.peers import PeerEvent, PeerState
from distsrv.security import Security
from distsrv.variables import Variable

__all__ = [
    "GroupLike",
    "ReduceOp",
    "Server",
    "Status",
    "TaskLike",
]

#: A task: "/job:ps/task:0" (TensorFlow's spelling, "/replica:0/" allowed) or ("ps", 0).
TaskLike = str | tuple[str, int]
Status = Literal["created", "running", "closing", "closed", "failed"]
#: The tasks of a collective: every task of the cluster (None), one job's tasks (its name), or
#: the tasks listed.
GroupLike = str | Sequence[TaskLike] | None
#: The group of a collective that is every task of the cluster; no job may be named so.
EVERY_TASK = "*"
ReduceOp = Literal["sum", "mean", "max", "min", "prod"]

_log = logging.getLogger("distsrv")

_PROTOBUF_SERVER_DEFS = ("tensorflow.ServerDef", "distsrv.v1.ServerDef")


class Server:
    """An in-process server for one task of a cluster, like ``tf.distribute.Server``.

    ``server_or_cluster_def`` is a :class:`ServerDef` (ours, or TensorFlow's protobuf), or
    anything :class:`ClusterSpec` accepts. ``job_name`` and ``task_index`` follow TensorFlow's
    rules: they may be left out when the cluster leaves no choice. The address is bound at
    construction (port 0 picks a free port), so a port in use fails here; serving begins with
    :meth:`start`, called at once unless ``start=False``.

    Tensors move with :meth:`send` / :meth:`recv` (rendezvous by name: each tensor sent is
    received exactly once, in order per source and name) and their non-blocking and asyncio forms.

    Remote operations, as dask's ``handlers``: ``handlers={"add": add}`` (or :meth:`add_handler`)
    lets any task run ``add(x=1, y=2)`` here with ``call(task, "add", x=1, y=2)``. Handlers may be
    plain functions (each call runs on a thread of its own, so a slow one does not hold up the
    others) or ``async def`` (run on an event loop the server owns). A handler that declares a
    parameter named ``context`` gets a :class:`distsrv.handlers.CallContext` through it.
    ``blocked_handlers`` names operations refused with ``PermissionDeniedError``.
    """

    def __init__(
        self,
        server_or_cluster_def: ServerDef | ClusterLike | Any,
        job_name: str | None = None,
        task_index: int | None = None,
        protocol: str | None = None,
        config: ServerConfig | None = None,
        start: bool = True,
        *,
        handlers: Mapping[str, Callable[..., Any]] | None = None,
        blocked_handlers: Iterable[str] = (),
        security: Security | None = None,
    ) -> None:
        if config is not None and not isinstance(config, ServerConfig):
            raise TypeError(f"config must be a distsrv.ServerConfig, not {type(config).__name__}")
        if security is not None and not isinstance(security, Security):
            raise TypeError(f"security must be a distsrv.Security, not {type(security).__name__}")
        self._security = security
        self._config = config or ServerConfig()
        # What the core logs ("distsrv.*" loggers) follows the logging configuration of now.
        _native.reset_logging()
        definition = _make_server_def(server_or_cluster_def, job_name, task_index, protocol)
        if definition.protocol not in ("grpc",):
            raise InvalidArgumentError(
                f"unknown protocol {definition.protocol!r}: distsrv speaks 'grpc'"
            )
        spec = ClusterSpec(definition.cluster)
        if definition.job_name not in spec.jobs:
            raise InvalidArgumentError(
                f"job {definition.job_name!r} is not in the cluster spec (jobs: {spec.jobs})"
            )
        if definition.task_index not in spec.task_indices(definition.job_name):
            raise InvalidArgumentError(
                f"task {definition.task_index} is not defined in job {definition.job_name!r} "
                f"(tasks: {spec.task_indices(definition.job_name)})"
            )
        self._handlers: dict[str, Callable[..., Any]] = {}
        self._blocked_handlers = frozenset(blocked_handlers)
        self._event_loop: EventLoop | None = None
        self._native = _native.Server(
            _jobs(spec),
            definition.job_name,
            definition.task_index,
            definition.protocol,
            definition.port,
            self._config,
            security,
        )
        self._spec = spec
        self._job_name = definition.job_name
        self._task_index = definition.task_index
        self._native.block_handlers(sorted(self._blocked_handlers))
        for name, handler in (handlers or {}).items():
            self.add_handler(name, handler)
        shutdown.register(self)
        if start:
            self.start()

    @classmethod
    def create_local_server(
        cls,
        config: ServerConfig | None = None,
        start: bool = True,
        *,
        handlers: Mapping[str, Callable[..., Any]] | None = None,
        blocked_handlers: Iterable[str] = (),
        security: Security | None = None,
    ) -> Server:
        """A single-task server on a free port of 127.0.0.1, in job "localhost" as TensorFlow's."""
        return cls(
            {"localhost": ["127.0.0.1:0"]},
            protocol="grpc",
            config=config,
            start=start,
            handlers=handlers,
            blocked_handlers=blocked_handlers,
            security=security,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Starts serving; does nothing if already running."""
        starting = self.status == "created"
        self._native.start()
        if starting and self._security is None and not _is_loopback(self.listen_address):
            _log.warning(
                "%s serves %s without authentication: anyone who reaches it can send, receive "
                "and call as any task; pass security=distsrv.Security(...)",
                self.task,
                self.listen_address,
            )

    def stop(self, grace: float | None = None) -> None:
        """Stops gracefully: in-flight calls get ``grace`` seconds (``config.shutdown_grace`` by
        default) to finish, then are cut off. The port is free when this returns."""
        self._native.stop(grace)
        if self._event_loop is not None:
            self._event_loop.close()

    def close(self) -> None:
        """dask's name for :meth:`stop`."""
        self.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Blocks until the server stops (Ctrl-C interrupts); with a timeout, returns whether it
        stopped within it."""
        return self._native.join(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def status(self) -> Status:
        """ "created", "running", "closing", "closed" or "failed"."""
        status: Status = self._native.status  # type: ignore[assignment]
        return status

    # -- identity -----------------------------------------------------------------------------

    @property
    def job_name(self) -> str:
        return self._job_name

    @property
    def task_index(self) -> int:
        return self._task_index

    @property
    def task(self) -> str:
        """This task's name, "/job:<job>/task:<index>"."""
        return f"/job:{self._job_name}/task:{self._task_index}"

    @property
    def address(self) -> str:
        """This task's "host:port", with the port actually bound."""
        return self._native.address

    @property
    def listen_address(self) -> str:
        """The socket address listened on, e.g. "127.0.0.1:43210"."""
        return self._native.listen_address

    @property
    def port(self) -> int:
        return self._native.port

    @property
    def target(self) -> str:
        """ "grpc://host:port", as ``tf.distribute.Server.target``."""
        return f"grpc://{self.address}"

    @property
    def server_def(self) -> ServerDef:
        """This server's definition, with the bound port (TensorFlow's own keeps ":0")."""
        return ServerDef.FromString(self._native.server_def_bytes())

    @property
    def cluster_spec(self) -> ClusterSpec:
        """The cluster, with this task's real address."""
        return ClusterSpec(self.server_def.cluster)

    @property
    def security(self) -> Security | None:
        """What this task trusts; None: every caller."""
        return self._security

    @property
    def config(self) -> ServerConfig:
        return self._config

    @property
    def connection_limit(self) -> int:
        """Calls served at once; more are refused with ``ResourceExhaustedError``."""
        return self._config.connection_limit

    @property
    def incarnation(self) -> int:
        """Random and new at every server, so peers can tell a restarted task apart."""
        return self._native.incarnation

    def __repr__(self) -> str:
        return f"<distsrv.Server {self.task} at {self.address} ({self.status})>"

    # -- devices ------------------------------------------------------------------------------

    def transport_counts(self) -> dict[str, int]:
        """How many tensors this task sent through shared memory (to tasks on its host) and over
        gRPC, and received through shared memory: ``shm_sent``, ``grpc_sent``, ``shm_received``;
        and how many remote operations it served through same-host links: ``shm_calls_served``."""
        return self._native.transport_counts()

    def local_devices(self) -> list[DeviceAttributes]:
        """This task's devices: its CPU, then every NVIDIA GPU it can use."""
        return [DeviceAttributes(*record) for record in self._native.local_devices()]

    def list_devices(self, timeout: float | None = None) -> list[DeviceAttributes]:
        """Every task's devices, in cluster order, like TensorFlow's ``Session.list_devices()``.

        All tasks are asked at once, each for up to ``timeout`` seconds
        (``config.connect_timeout`` by default); ``UnavailableError`` names every task that did
        not answer. A task may be a stock TensorFlow server."""
        return [DeviceAttributes(*record) for record in self._native.list_devices(timeout)]

    def wait_for_cluster(self, timeout: float | None = None) -> dict[str, int]:
        """Waits until every task of the cluster answers, asking again with backoff (tasks start
        in any order), for up to ``timeout`` seconds (no limit by default; Ctrl-C interrupts).

        Returns each task's incarnation by task name; a task that restarted has a new one.
        ``DeadlineExceededError`` names the tasks that never answered."""
        return self._native.wait_for_cluster(timeout)

    def watch_peers(self, timeout: float | None = None) -> Iterator[PeerEvent]:
        """The other tasks' comings and goings, as heartbeats find them: first the state of each
        task already heard from, then every change (``up``, ``restarted``, ``lost``) as it
        happens. Ends when no event comes for ``timeout`` seconds (never, by default) or the
        server stops. Each call watches anew; a reader too slow for a burst misses its oldest
        events."""
        events = self._native.watch_peers()
        while (event := events.next(timeout)) is not None:
            task, state, incarnation, reason = event
            yield PeerEvent(task, cast(PeerState, state), incarnation, reason)

    # -- tensor exchange ----------------------------------------------------------------------

    def send(
        self, name: str, array: npt.ArrayLike, to: TaskLike, *, timeout: float | None = None
    ) -> None:
        """Sends ``array`` to task ``to`` under ``name``; returns once that task's server holds
        all of it (from then on it cannot be lost). Sending to oneself works too.

        ``DeadlineExceededError`` past ``timeout`` seconds; with none, waits as long as ``to``
        is up: a peer lost meanwhile raises ``UnavailableError`` within ``config.peer_timeout``,
        one restarted ``AbortedError``."""
        self._native.send(to, name, as_array(array), timeout)

    def recv(
        self,
        name: str,
        source: TaskLike,
        timeout: float | None = None,
        *,
        like: TensorLike | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """The next tensor ``name`` sent by task ``source``, waiting up to ``timeout`` seconds
        (``DeadlineExceededError`` past it). A source that is not up raises ``UnavailableError``
        unless it comes up within ``config.connect_timeout``; one lost while waited on raises it
        within ``config.peer_timeout``, one restarted ``AbortedError``.

        A numpy array over the received bytes; in ``like``'s kind where given (a torch tensor
        over the same bytes for a torch tensor, a JAX array for a JAX one); or written into
        ``out`` (a numpy array or torch tensor of the tensor's shape), which is returned."""
        destination = Destination(out, like)
        result: npt.NDArray[Any] = destination.fill(self._native.recv(source, name, timeout))
        return result

    def isend(self, name: str, array: npt.ArrayLike, to: TaskLike) -> SendHandle:
        """Starts a send and returns at once; ``wait()`` on the handle for its acknowledgement.
        The array must not be modified until then."""
        return SendHandle(self._native.isend(to, name, as_array(array)))

    def irecv(
        self,
        name: str,
        source: TaskLike,
        timeout: float | None = None,
        *,
        like: TensorLike | None = None,
        out: TensorLike | None = None,
    ) -> RecvHandle:
        """Starts a receive and returns at once; ``wait()`` on the handle for the array (as
        :meth:`recv` gives it). Dropping the handle before it finishes cancels the receive."""
        destination = Destination(out, like)
        return RecvHandle(self._native.irecv(source, name, timeout), destination)

    def recv_any(
        self,
        name: str,
        sources: Iterable[TaskLike] | None = None,
        timeout: float | None = None,
        *,
        like: TensorLike | None = None,
        out: TensorLike | None = None,
    ) -> tuple[str, npt.NDArray[Any]]:
        """The next tensor ``name`` from whichever of ``sources`` (every task of the cluster by
        default) sends one first, as ``(source, array)``, ``source`` as "/job:<job>/task:<i>":
        MPI's ``ANY_SOURCE``. A source lost meanwhile is waited on no more; ``UnavailableError``
        only once every source is lost. ``DeadlineExceededError`` past ``timeout``. ``like`` and
        ``out`` as for :meth:`recv`."""
        members = self._members(EVERY_TASK) if sources is None else list(sources)
        destination = Destination(out, like)
        source, array = self._native.recv_any(members, name, timeout)
        return source, destination.fill(array)

    def send_object(
        self, name: str, value: Any, to: TaskLike, *, timeout: float | None = None
    ) -> None:
        """Sends ``value`` to task ``to`` under ``name``, as :meth:`send` sends an array.
        ``value`` is what a remote operation may take: None, bool, int, float, str, bytes,
        lists and tuples, dicts with str keys, numpy arrays, nested (``TypeError`` for anything
        else). It travels in the codec remote operations use, never pickle: a receiver runs no
        code the value names."""
        self.send(name, _encoded(value), to, timeout=timeout)

    def recv_object(self, name: str, source: TaskLike, timeout: float | None = None) -> Any:
        """The next value ``name`` task ``source`` sent with :meth:`send_object` (tuples arrive
        as lists); ``InvalidArgumentError`` if what arrived is not one."""
        return _decoded(self.recv(name, source, timeout))

    def broadcast_object(
        self,
        value: Any,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
    ) -> Any:
        """``root``'s ``value`` (as :meth:`send_object` takes) on every member of ``group``;
        the other members' ``value`` is ignored (pass None)."""
        is_root = _native.parse_task(root) == (self._job_name, self._task_index)
        given = _encoded(value) if is_root else None
        return _decoded(self.broadcast(given, root, group=group, timeout=timeout))

    async def asend(self, name: str, array: npt.ArrayLike, to: TaskLike) -> None:
        """Awaitable :meth:`send`."""
        await self.isend(name, array, to).wait_async()

    async def arecv(
        self, name: str, source: TaskLike, timeout: float | None = None
    ) -> npt.NDArray[Any]:
        """Awaitable :meth:`recv`."""
        return await self.irecv(name, source, timeout).wait_async()

    # -- collectives --------------------------------------------------------------------------
    #
    # A collective runs over a group: the tasks of the caller's own job by default (as
    # TensorFlow's collectives group by job: workers reduce among workers, without the ps), a
    # job's tasks, every task of the cluster (EVERY_TASK, "*"), or the tasks listed. A member's
    # rank is its position in the group: in the order listed, or by task index. Every member
    # must call the group's collectives in the same order; members that called different ones,
    # or one with another op, root, dtype, shape or order of the group, all raise
    # InvalidArgumentError within one round trip, saying what each called. A member lost
    # mid-collective (gone, frozen, cut off) makes the others raise UnavailableError within
    # ``config.peer_timeout``, one restarted AbortedError; one that fails it, AbortedError on the
    # others. ``timeout`` (``config.collective_timeout`` by default) bounds the whole call, and
    # its DeadlineExceededError names the members that never joined.
    #
    # Each collective has a non-blocking form (``iall_reduce``: a CollectiveHandle to wait on,
    # so communication overlaps computation) and an asyncio one (``aall_reduce``); those that
    # give a result take ``out=``, an array to write it into.

    def all_reduce(
        self,
        array: npt.ArrayLike,
        op: ReduceOp = "sum",
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
        inplace: bool = False,
    ) -> npt.NDArray[Any]:
        """The element-wise ``op`` of every member's ``array``: bitwise the same on every member.
        A mean needs a floating or complex dtype; sum and prod of integers wrap as numpy's do.
        The result comes in ``array``'s kind (a torch tensor for a torch tensor); it is written
        into ``out`` where given, and into ``array`` itself with ``inplace=True``, as torch's
        ``all_reduce`` does."""
        out = _in_place(array, out, inplace)
        return _given(self._run("all_reduce", group, timeout, out, array, op=op))

    def iall_reduce(
        self,
        array: npt.ArrayLike,
        op: ReduceOp = "sum",
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
        inplace: bool = False,
    ) -> CollectiveHandle:
        """:meth:`all_reduce`, started in the background. ``array`` must not change until the
        handle is done."""
        out = _in_place(array, out, inplace)
        return self._start("all_reduce", group, timeout, out, array, op=op)

    async def aall_reduce(
        self,
        array: npt.ArrayLike,
        op: ReduceOp = "sum",
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
        inplace: bool = False,
    ) -> npt.NDArray[Any]:
        """Awaitable :meth:`all_reduce`."""
        handle = self.iall_reduce(array, op, group=group, timeout=timeout, out=out, inplace=inplace)
        return _given(await handle.wait_async())

    def reduce_scatter(
        self,
        array: npt.ArrayLike,
        op: ReduceOp = "sum",
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """This member's share of :meth:`all_reduce`: of ``n * m`` rows, rank ``r`` gets rows
        ``r * m`` to ``(r + 1) * m``."""
        return _given(self._run("reduce_scatter", group, timeout, out, array, op=op))

    def ireduce_scatter(
        self,
        array: npt.ArrayLike,
        op: ReduceOp = "sum",
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> CollectiveHandle:
        """:meth:`reduce_scatter`, started in the background."""
        return self._start("reduce_scatter", group, timeout, out, array, op=op)

    async def areduce_scatter(
        self,
        array: npt.ArrayLike,
        op: ReduceOp = "sum",
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """Awaitable :meth:`reduce_scatter`."""
        handle = self.ireduce_scatter(array, op, group=group, timeout=timeout, out=out)
        return _given(await handle.wait_async())

    def all_gather(
        self,
        array: npt.ArrayLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """Every member's ``array``, stacked in rank order: shape ``(members, *array.shape)``."""
        return _given(self._run("all_gather", group, timeout, out, array))

    def iall_gather(
        self,
        array: npt.ArrayLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> CollectiveHandle:
        """:meth:`all_gather`, started in the background."""
        return self._start("all_gather", group, timeout, out, array)

    async def aall_gather(
        self,
        array: npt.ArrayLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """Awaitable :meth:`all_gather`."""
        handle = self.iall_gather(array, group=group, timeout=timeout, out=out)
        return _given(await handle.wait_async())

    def broadcast(
        self,
        array: npt.ArrayLike | None,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """``root``'s ``array`` on every member. Other members may pass None, or an array whose
        dtype and shape are then checked against the root's (and which may be ``out`` too, to
        receive in place)."""
        return _given(self._run("broadcast", group, timeout, out, array, root=root))

    def ibroadcast(
        self,
        array: npt.ArrayLike | None,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> CollectiveHandle:
        """:meth:`broadcast`, started in the background."""
        return self._start("broadcast", group, timeout, out, array, root=root)

    async def abroadcast(
        self,
        array: npt.ArrayLike | None,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """Awaitable :meth:`broadcast`."""
        handle = self.ibroadcast(array, root, group=group, timeout=timeout, out=out)
        return _given(await handle.wait_async())

    def barrier(self, *, group: GroupLike = None, timeout: float | None = None) -> None:
        """Returns once every member has called it."""
        self._run("barrier", group, timeout, None, None)

    def ibarrier(
        self, *, group: GroupLike = None, timeout: float | None = None
    ) -> CollectiveHandle:
        """:meth:`barrier`, started in the background: the handle is done once every member has
        called it."""
        return self._start("barrier", group, timeout, None, None)

    async def abarrier(self, *, group: GroupLike = None, timeout: float | None = None) -> None:
        """Awaitable :meth:`barrier`."""
        await self.ibarrier(group=group, timeout=timeout).wait_async()

    def reduce(
        self,
        array: npt.ArrayLike,
        root: TaskLike,
        op: ReduceOp = "sum",
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any] | None:
        """:meth:`all_reduce`'s result on ``root`` only; None on the other members."""
        return self._run("reduce", group, timeout, out, array, op=op, root=root)

    def ireduce(
        self,
        array: npt.ArrayLike,
        root: TaskLike,
        op: ReduceOp = "sum",
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> CollectiveHandle:
        """:meth:`reduce`, started in the background."""
        return self._start("reduce", group, timeout, out, array, op=op, root=root)

    async def areduce(
        self,
        array: npt.ArrayLike,
        root: TaskLike,
        op: ReduceOp = "sum",
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any] | None:
        """Awaitable :meth:`reduce`."""
        handle = self.ireduce(array, root, op, group=group, timeout=timeout, out=out)
        return await handle.wait_async()

    def gather(
        self,
        array: npt.ArrayLike,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any] | None:
        """:meth:`all_gather`'s result on ``root`` only; None on the other members."""
        return self._run("gather", group, timeout, out, array, root=root)

    def igather(
        self,
        array: npt.ArrayLike,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> CollectiveHandle:
        """:meth:`gather`, started in the background."""
        return self._start("gather", group, timeout, out, array, root=root)

    async def agather(
        self,
        array: npt.ArrayLike,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any] | None:
        """Awaitable :meth:`gather`."""
        handle = self.igather(array, root, group=group, timeout=timeout, out=out)
        return await handle.wait_async()

    def scatter(
        self,
        array: npt.ArrayLike | None,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """Row ``r`` of ``root``'s ``array`` (whose first dimension is the group's size) on the
        member of rank ``r``. The other members pass None."""
        return _given(self._run("scatter", group, timeout, out, array, root=root))

    def iscatter(
        self,
        array: npt.ArrayLike | None,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> CollectiveHandle:
        """:meth:`scatter`, started in the background."""
        return self._start("scatter", group, timeout, out, array, root=root)

    async def ascatter(
        self,
        array: npt.ArrayLike | None,
        root: TaskLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """Awaitable :meth:`scatter`."""
        handle = self.iscatter(array, root, group=group, timeout=timeout, out=out)
        return _given(await handle.wait_async())

    def all_to_all(
        self,
        array: npt.ArrayLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """Row ``j`` of every member's ``array`` (whose first dimension is the group's size) goes
        to the member of rank ``j``, which gets them stacked in rank order: ``result[i]`` is row
        ``j`` of rank ``i``'s array, as ``np.stack(arrays, axis=1)[j]``."""
        return _given(self._run("all_to_all", group, timeout, out, array))

    def iall_to_all(
        self,
        array: npt.ArrayLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> CollectiveHandle:
        """:meth:`all_to_all`, started in the background."""
        return self._start("all_to_all", group, timeout, out, array)

    async def aall_to_all(
        self,
        array: npt.ArrayLike,
        *,
        group: GroupLike = None,
        timeout: float | None = None,
        out: TensorLike | None = None,
    ) -> npt.NDArray[Any]:
        """Awaitable :meth:`all_to_all`."""
        handle = self.iall_to_all(array, group=group, timeout=timeout, out=out)
        return _given(await handle.wait_async())

    def _run(
        self,
        kind: str,
        group: GroupLike,
        timeout: float | None,
        out: TensorLike | None,
        array: npt.ArrayLike | None,
        *,
        op: str | None = None,
        root: TaskLike | None = None,
    ) -> npt.NDArray[Any] | None:
        members = self._members(group)
        given, destination = _prepared(kind, array, out)
        result = self._native.collective(
            kind, members, given, op, root, timeout, destination.in_place
        )
        filled: npt.NDArray[Any] | None = destination.fill(result)
        return filled

    def _start(
        self,
        kind: str,
        group: GroupLike,
        timeout: float | None,
        out: TensorLike | None,
        array: npt.ArrayLike | None,
        *,
        op: str | None = None,
        root: TaskLike | None = None,
    ) -> CollectiveHandle:
        members = self._members(group)
        given, destination = _prepared(kind, array, out)
        pending = self._native.icollective(
            kind, members, given, op, root, timeout, destination.in_place
        )
        return CollectiveHandle(pending, destination)

    # -- parameter-server variables -----------------------------------------------------------

    def create_variable(
        self, name: str, initial: npt.ArrayLike, on: TaskLike, *, timeout: float | None = None
    ) -> Variable:
        """Creates variable ``name`` on task ``on`` (typically a "ps" task) with value
        ``initial``; ``AlreadyExistsError`` if that task already has one by this name."""
        host = _native.parse_task(on)
        self._native.variable_op(host, name, "create", initial, timeout=timeout)
        return Variable(self._native, name, host)

    def variable(self, name: str, on: TaskLike) -> Variable:
        """A handle to variable ``name`` on task ``on``, which another task may create later."""
        return Variable(self._native, name, _native.parse_task(on))

    def variables(self, on: TaskLike, *, timeout: float | None = None) -> dict[str, Variable]:
        """Every variable task ``on`` hosts, by name (in name order)."""
        host = _native.parse_task(on)
        listed = self._native.variable_op(host, "", "list", timeout=timeout)
        return {name: Variable(self._native, name, host) for name, _, _ in listed}

    def save_variables(
        self, path: str | os.PathLike[str], on: TaskLike, *, timeout: float | None = None
    ) -> list[str]:
        """Writes every variable task ``on`` hosts to the file ``path``, an ``.npz`` archive as
        numpy's ``savez`` writes (one array per variable, by name); the names saved. Each
        variable is read atomically, but not all at one instant: save while no worker updates
        them for a consistent checkpoint. Optimizer state is not saved."""
        names = []
        # As np.savez writes an .npz, without its keywords: a variable may be named
        # "allow_pickle".
        with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
            for name, variable in self.variables(on, timeout=timeout).items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, variable.read(timeout=timeout))
                names.append(name)
        return names

    def restore_variables(
        self, path: str | os.PathLike[str], on: TaskLike, *, timeout: float | None = None
    ) -> list[str]:
        """Sets task ``on``'s variables to the values in the ``.npz`` file ``path`` (as
        :meth:`save_variables` writes), creating those it lacks; the names restored. Its other
        variables are left alone."""
        host = _native.parse_task(on)
        existing = self.variables(on, timeout=timeout)
        with np.load(path, allow_pickle=False) as archive:
            for name in archive.files:
                value = archive[name]
                if name in existing:
                    existing[name].assign(value, timeout=timeout)
                else:
                    self._native.variable_op(host, name, "create", value, timeout=timeout)
            return list(archive.files)

    def _members(self, group: GroupLike) -> list[TaskLike]:
        if group is None:
            group = self._job_name
        if group == EVERY_TASK:
            return [
                (job, index) for job in self._spec.jobs for index in self._spec.task_indices(job)
            ]
        if isinstance(group, str):
            if group not in self._spec.jobs:
                raise InvalidArgumentError(
                    f"no job {group!r} in the cluster (jobs: {self._spec.jobs})"
                )
            return [(group, index) for index in self._spec.task_indices(group)]
        return list(group)

    # -- remote operations --------------------------------------------------------------------

    @property
    def handlers(self) -> Mapping[str, Callable[..., Any]]:
        """The operations this task serves, by name (read-only: use :meth:`add_handler` and
        :meth:`remove_handler`)."""
        return MappingProxyType(self._handlers)

    @property
    def blocked_handlers(self) -> frozenset[str]:
        """Operations refused with ``PermissionDeniedError``, whether or not they have handlers."""
        return self._blocked_handlers

    def add_handler(self, name: str, handler: Callable[..., Any]) -> None:
        """Serves operation ``name`` with ``handler``, replacing any handler it had; effective for
        the next call, also while running."""
        if not isinstance(name, str):
            raise TypeError(f"an operation's name is a str, not {type(name).__name__}")
        if not callable(handler):
            raise TypeError(f"a handler must be callable, not {type(handler).__name__}")
        function, scheduled = handler, is_async(handler)
        if scheduled:
            if self._event_loop is None:
                self._event_loop = EventLoop(f"distsrv-handlers{self.task}")
            function = self._event_loop.starter(handler)
        self._native.add_handler(name, function, scheduled, wants_context(handler))
        self._handlers[name] = handler

    def remove_handler(self, name: str) -> None:
        """Stops serving operation ``name`` (calls of it fail with ``UnimplementedError``);
        ``KeyError`` if it was not served."""
        if name not in self._handlers:
            raise KeyError(name)
        self._native.remove_handler(name)
        del self._handlers[name]

    def call(
        self, task: TaskLike, op: str, /, *, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Runs operation ``op`` on ``task`` (this one too) with ``kwargs`` and returns its result.

        Arguments and result are None, bool, int (64-bit), float, str, bytes, lists (tuples are
        sent as lists), dicts with str keys and numpy arrays (numpy scalars arrive as 0-d arrays,
        but ``numpy.float64`` is a float); anything else raises ``TypeError`` before a byte is
        sent. Past ``timeout`` seconds: ``DeadlineExceededError``. An unknown op raises
        ``UnimplementedError``, a blocked one ``PermissionDeniedError``; an exception in the
        handler is re-raised here as a
        :class:`distsrv.errors.RemoteError` naming its type, message and task (a distsrv error the
        handler raised keeps its class). Connections to each task are made once and reused.
        """
        return self._native.call(task, op, kwargs, timeout)

    def icall(
        self, task: TaskLike, op: str, /, *, timeout: float | None = None, **kwargs: Any
    ) -> CallHandle:
        """Starts :meth:`call` and returns at once; ``wait()`` on the handle for the result.
        Array arguments are read in place, so they must not be modified until then. Dropping the
        handle before it finishes abandons the call."""
        return CallHandle(self._native.icall(task, op, kwargs, timeout))

    async def acall(
        self, task: TaskLike, op: str, /, *, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Awaitable :meth:`call`."""
        return await self.icall(task, op, timeout=timeout, **kwargs).wait_async()


def _encoded(value: Any) -> npt.NDArray[np.uint8]:
    """``value`` encoded as remote operations' values are, as an array to send."""
    return np.frombuffer(_native.encode_object(value), np.uint8)


def _decoded(array: npt.NDArray[Any]) -> Any:
    if array.dtype != np.uint8 or array.ndim != 1:
        raise InvalidArgumentError(
            f"a {array.dtype} array of shape {array.shape} arrived where an object was due"
        )
    return _native.decode_object(array.tobytes())


def _prepared(kind: str, array: Any, out: TensorLike | None) -> tuple[Any, Destination]:
    """A collective's array as the native layer reads it, and where its result goes. A torch
    or JAX tensor becomes a numpy view of its memory here, once, which the native layer lends
    without calling back into Python. An all_reduce whose ``out`` is its input has the native
    layer write the result into that memory itself, which saves a copy of the result."""
    if array is None:
        return array, Destination(out)
    view = as_array(array)
    if out is not array or not view.flags.writeable:
        return view, Destination(out, array)
    return view, Destination(out, array, view, in_place=kind == "all_reduce")


def _in_place(array: Any, out: TensorLike | None, inplace: bool) -> TensorLike | None:
    """Where a result goes: ``array`` itself with ``inplace``, else ``out``."""
    if not inplace:
        return out
    if out is not None:
        raise ValueError("give out= or inplace=True, not both")
    return array


def _given(result: npt.NDArray[Any] | None) -> npt.NDArray[Any]:
    """The result of a collective that gives every member one."""
    assert result is not None, "this collective gives every member a result"
    return result


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _jobs(spec: ClusterSpec) -> dict[str, dict[int, str]]:
    return {
        job: {index: spec.task_address(job, index) for index in spec.task_indices(job)}
        for job in spec.jobs
    }


def _make_server_def(
    server_or_cluster_def: Any,
    job_name: str | None,
    task_index: int | None,
    protocol: str | None,
) -> ServerDef:
    """TensorFlow's ``_make_server_def``: explicit arguments override a ServerDef's fields; for a
    cluster, job and task may be omitted when the cluster leaves one choice."""
    if isinstance(server_or_cluster_def, ServerDef) or (
        _protobuf_name(server_or_cluster_def) in _PROTOBUF_SERVER_DEFS
    ):
        if not isinstance(server_or_cluster_def, ServerDef):
            server_or_cluster_def = ServerDef.FromString(server_or_cluster_def.SerializeToString())
        base: ServerDef = server_or_cluster_def
        return ServerDef(
            cluster=base.cluster,
            job_name=base.job_name if job_name is None else job_name,
            task_index=base.task_index if task_index is None else task_index,
            protocol=(base.protocol or "grpc") if protocol is None else protocol,
            port=base.port,
        )
    try:
        spec = ClusterSpec(server_or_cluster_def)
    except TypeError:
        raise TypeError(
            "Could not convert `server_or_cluster_def` to a `distsrv.ServerDef` or "
            "`distsrv.ClusterSpec`."
        ) from None
    if job_name is None:
        if len(spec.jobs) != 1:
            raise ValueError("Must specify an explicit `job_name`.")
        job_name = spec.jobs[0]
    if task_index is None:
        indices = spec.task_indices(job_name)
        if len(indices) != 1:
            raise ValueError("Must specify an explicit `task_index`.")
        task_index = indices[0]
    return ServerDef(
        cluster=spec.as_cluster_def(),
        job_name=job_name,
        task_index=task_index,
        protocol="grpc" if protocol is None else protocol,
    )


def _protobuf_name(message: Any) -> str | None:
    descriptor = getattr(message, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None)
