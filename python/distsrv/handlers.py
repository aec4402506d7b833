"""Remote operations (dask's handlers): what a handler sees of its call, and where ``async def``
handlers run.

A handler is called with the call's keyword arguments. One that declares a parameter named
``context`` also gets a :class:`CallContext` through it: who called and with which metadata. A
caller cannot pass an argument named ``context`` to such a handler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

__all__ = ["CallContext"]

#: The parameter through which a handler asks for its :class:`CallContext`.
CONTEXT_PARAMETER = "context"

# How long closing the event loop waits for the async handlers it cancels to end.
_CLOSE_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class CallContext:
    """The call a handler is serving."""

    #: The operation's name.
    op: str
    #: The calling task, e.g. ``"/job:worker/task:1"``; None for a client outside the cluster
    #: (a stock gRPC client, say) that did not name one.
    caller: str | None
    #: The request's metadata (gRPC's own entries left out): text values are str, the values of
    #: keys ending in ``-bin`` bytes.
    metadata: Mapping[str, str | bytes]


def wants_context(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` declares a keyword-passable parameter named ``context``."""
    try:
        parameter = inspect.signature(handler).parameters.get(CONTEXT_PARAMETER)
    except (TypeError, ValueError):  # no signature to read, e.g. some builtins
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def is_async(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` is an ``async def`` function (also behind ``functools.partial``)."""
    return inspect.iscoroutinefunction(handler)


class EventLoop:
    """An asyncio event loop on a daemon thread of its own, where a server's ``async def``
    handlers run; made when the first one is added, closed when the server stops."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def starter(
        self, handler: Callable[..., Coroutine[Any, Any, Any]]
    ) -> Callable[..., concurrent.futures.Future[Any]]:
        """A function that starts ``handler(**kwargs)`` on the loop and returns its future: what
        the server calls, from whichever thread serves the call."""

        def start(**kwargs: Any) -> concurrent.futures.Future[Any]:
            return asyncio.run_coroutine_threadsafe(handler(**kwargs), self._loop)

        return start

    def close(self) -> None:
        """Cancels the handlers still running, then stops the loop and its thread."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            cancelled = asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop)
            # A handler that ignores cancellation is abandoned with its loop.
            with contextlib.suppress(concurrent.futures.TimeoutError):
                cancelled.result(_CLOSE_SECONDS)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CLOSE_SECONDS)
        if not self._thread.is_alive():
            self._loop.close()


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()
