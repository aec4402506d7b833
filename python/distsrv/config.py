"""Server tunables, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import os

from distsrv.errors import InvalidArgumentError

__all__ = ["ServerConfig"]

_MiB = 1 << 20


# The same bounds as the Rust side's: gRPC frames a message length in 32 bits, durations must be
# representable, and the call limit is a semaphore's count.
_MAX_SECONDS = 1e9
_MAX_INTS = {
    "max_message_bytes": (1 << 31) - 1,
    "chunk_bytes": (1 << 31) - 1,
    "max_pending_bytes": (1 << 63) - 1,
    "connection_limit": 1 << 20,
    "worker_threads": 1024,
}


def _default_worker_threads() -> int:
    return max(1, min(4, os.cpu_count() or 2))


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a :class:`distsrv.Server` behaves. Times are in seconds, sizes in bytes.

    The defaults suit one task per process on one host or a small cluster.
    """

    #: How long to keep trying to reach a peer (it may still be starting) before a call fails
    #: with ``UnavailableError``; also how long a waiting ``recv`` tolerates an unreachable source.
    connect_timeout: float = 10.0
    #: How long ``stop()`` lets in-flight calls finish before cutting them off.
    shutdown_grace: float = 5.0
    #: Largest single gRPC message accepted. Tensors travel in chunks, so this bounds a chunk,
    #: not a tensor.
    max_message_bytes: int = 64 * _MiB
    #: Payload bytes per message of a tensor stream.
    chunk_bytes: int = 1 * _MiB
    #: Bytes of received tensors that no ``recv`` has claimed yet that the server holds; a send
    #: past it fails with ``ResourceExhaustedError`` instead of growing memory without bound.
    max_pending_bytes: int = 4 << 30
    #: Calls served at once; more are refused with ``ResourceExhaustedError``.
    connection_limit: int = 512
    #: Threads of the server's runtime.
    worker_threads: int = dataclasses.field(default_factory=_default_worker_threads)
    #: Tensors to tasks on the same host (proven by a handshake: same machine, same user) travel
    #: through shared memory, gRPC carrying only control. ``False`` keeps every tensor on gRPC,
    #: sent and received, e.g. to compare the two.
    shared_memory: bool = True

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "shutdown_grace"):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or not 0 <= value <= _MAX_SECONDS:
                raise InvalidArgumentError(
                    f"ServerConfig.{name} must be a finite number of seconds in "
                    f"[0, {_MAX_SECONDS:g}], not {value!r}"
                )
        for name, maximum in _MAX_INTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
                raise InvalidArgumentError(
                    f"ServerConfig.{name} must be an int in [1, {maximum}], not {value!r}"
                )
        if not isinstance(self.shared_memory, bool):
            raise InvalidArgumentError(
                f"ServerConfig.shared_memory must be a bool, not {self.shared_memory!r}"
            )
        if self.chunk_bytes > self.max_message_bytes:
            raise InvalidArgumentError(
                f"ServerConfig.chunk_bytes ({self.chunk_bytes}) cannot exceed "
                f"max_message_bytes ({self.max_message_bytes})"
            )
