"""The handles of operations in flight, returned by :meth:`distsrv.Server.isend`,
:meth:`~distsrv.Server.irecv`, :meth:`~distsrv.Server.icall` and the collectives' ``i`` forms
(:meth:`~distsrv.Server.iall_reduce` and the rest)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt

from distsrv import _native
from distsrv.errors import InvalidArgumentError
from distsrv.interop import TensorLike, like, writable_view

__all__ = ["CallHandle", "CollectiveHandle", "Destination", "RecvHandle", "SendHandle"]


class _Handle:
    def __init__(self, pending: _native.Pending) -> None:
        self._pending = pending

    def done(self) -> bool:
        """Whether the operation has finished (successfully or not)."""
        return self._pending.done()

    async def _finished(self) -> None:
        """Waits, without a thread, until the operation finishes: its pipe becomes readable."""
        if self._pending.done():
            return
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        fd = self._pending.fileno()

        def wake() -> None:
            if not finished.done():
                finished.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await finished
        finally:
            loop.remove_reader(fd)


class SendHandle(_Handle):
    """A send in flight."""

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until the receiver holds the tensor; re-raises the send's error."""
        self._pending.wait(timeout)

    async def wait_async(self) -> None:
        await self._finished()
        self._pending.wait(None)


class RecvHandle(_Handle):
    """A receive in flight."""

    def __init__(self, pending: _native.Pending, destination: Destination) -> None:
        super().__init__(pending)
        self._destination = destination

    def wait(self, timeout: float | None = None) -> npt.NDArray[Any]:
        """Blocks until the tensor is here and returns it (``out``, filled in, if one was given;
        in ``like``'s kind if that was given); re-raises the receive's error."""
        result: npt.NDArray[Any] = self._destination.fill(self._pending.wait(timeout))
        return result

    async def wait_async(self) -> npt.NDArray[Any]:
        await self._finished()
        result: npt.NDArray[Any] = self._destination.fill(self._pending.wait(None))
        return result


class CallHandle(_Handle):
    """A remote operation's call in flight."""

    def wait(self, timeout: float | None = None) -> Any:
        """Blocks until the call has finished and returns its result; re-raises its error."""
        return self._pending.wait(timeout)

    async def wait_async(self) -> Any:
        await self._finished()
        return self._pending.wait(None)


class CollectiveHandle(_Handle):
    """A collective in flight. Dropping it does not cancel the collective: the other members
    count on this one's part, so it runs to its end."""

    def __init__(self, pending: _native.Pending, destination: Destination) -> None:
        super().__init__(pending)
        self._destination = destination

    def wait(self, timeout: float | None = None) -> npt.NDArray[Any] | None:
        """Blocks until this member's part is done and returns its result (``out``, filled in,
        if one was given; else in the kind of the array given: a torch tensor for a torch
        tensor; None where this member gets no result); re-raises the collective's error."""
        result: npt.NDArray[Any] | None = self._destination.fill(self._pending.wait(timeout))
        return result

    async def wait_async(self) -> npt.NDArray[Any] | None:
        await self._finished()
        result: npt.NDArray[Any] | None = self._destination.fill(self._pending.wait(None))
        return result


class Destination:
    """Where an operation's result goes: into ``out`` (through a writable numpy view of it,
    made and checked before the operation starts, so that a wrong ``out`` fails at once rather
    than after a tensor is taken), else into a new array in ``prototype``'s kind."""

    __slots__ = ("_out", "_prototype", "_view", "in_place")

    def __init__(
        self,
        out: TensorLike | None,
        prototype: Any = None,
        view: npt.NDArray[Any] | None = None,
        *,
        in_place: bool = False,
    ) -> None:
        self._out = out
        self._prototype = prototype
        self._view = view if view is not None or out is None else writable_view(out)
        #: Whether the native layer was asked to write the result into ``view`` itself (the
        #: operation's input), giving None when it did.
        self.in_place = in_place

    def fill(self, result: npt.NDArray[Any] | None) -> Any:
        """``out`` with ``result`` copied in when ``out`` was given, else ``result`` in the
        prototype's kind; None for no result (``out`` where the result was written in place)."""
        if result is None:
            return self._out if self.in_place else None
        if self._view is None:
            return like(result, self._prototype)
        if self._view.shape != result.shape:
            raise InvalidArgumentError(
                f"out has shape {self._view.shape}; the result has {result.shape}"
            )
        np.copyto(self._view, result, casting="same_kind")
        return self._out
