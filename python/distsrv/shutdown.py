"""Interpreter exit: the servers of this process still running then are stopped first.

They are stopped while the interpreter is still whole: stopping wakes every thread blocked in a
distsrv call, and those threads must be back in Python before finalization begins (CPython ends
late threads with an unwind that must not cross Rust code). A forked child leaves its parent's
servers alone.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from typing import Protocol

from distsrv import _native

__all__ = ["register"]


class _Stoppable(Protocol):
    """What exit needs of a server: :class:`distsrv.Server` is one."""

    @property
    def status(self) -> str: ...

    def stop(self, grace: float | None = None) -> None: ...


#: Every server not yet collected, with the process that made it.
_live_servers: weakref.WeakKeyDictionary[_Stoppable, int] = weakref.WeakKeyDictionary()
_exit_lock = threading.Lock()
_EXIT_WAIT_SECONDS = 5.0


def register(server: _Stoppable) -> None:
    """Stops ``server`` at interpreter exit if it is still running then, in the process that
    made it; holds it only weakly."""
    _live_servers[server] = os.getpid()


@atexit.register
def _stop_live_servers() -> None:
    with _exit_lock:
        for server, pid in list(_live_servers.items()):
            if pid == os.getpid() and server.status in ("created", "running"):
                server.stop(grace=0)
        deadline = time.monotonic() + _EXIT_WAIT_SECONDS
        while _native.blocked_threads() and time.monotonic() < deadline:
            time.sleep(0.005)
