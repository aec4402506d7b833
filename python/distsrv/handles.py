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

__all__ = ["CallHandle", "CollectiveHandle", "RecvHandle", "SendHandle"]


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

    def wait(self, timeout: float | None = None) -> npt.NDArray[Any]:
        """Blocks until the tensor is here and returns it; re-raises the receive's error."""
        result: npt.NDArray[Any] = self._pending.wait(timeout)
        return result

    async def wait_async(self) -> npt.NDArray[Any]:
        await self._finished()
        result: npt.NDArray[Any] = self._pending.wait(None)
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

    def __init__(self, pending: _native.Pending, out: npt.NDArray[Any] | None = None) -> None:
        super().__init__(pending)
        self._out = out

    def wait(self, timeout: float | None = None) -> npt.NDArray[Any] | None:
        """Blocks until this member's part is done and returns its result (``out``, filled in,
        if one was given; None where this member gets no result); re-raises the collective's
        error."""
        return fill(self._pending.wait(timeout), self._out)

    async def wait_async(self) -> npt.NDArray[Any] | None:
        await self._finished()
        return fill(self._pending.wait(None), self._out)


def fill(result: npt.NDArray[Any] | None, out: npt.NDArray[Any] | None) -> npt.NDArray[Any] | None:
    """``result``, or ``out`` with ``result`` copied in when ``out`` is given."""
    if out is None or result is None:
        return result
    if out.shape != result.shape:
        raise InvalidArgumentError(f"out has shape {out.shape}; the result has {result.shape}")
    np.copyto(out, result, casting="same_kind")
    return out
