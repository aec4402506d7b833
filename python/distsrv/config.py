"""Server tunables, validated on construction."""

from __future__ import annotations

import dataclasses
import os

from distsrv.errors import InvalidArgumentError

__all__ = ["ServerConfig"]

_MiB = 1 << 20


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

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "shutdown_grace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise InvalidArgumentError(
                    f"ServerConfig.{name} must be a number >= 0, not {value!r}"
                )
        for name in (
            "max_message_bytes",
            "chunk_bytes",
            "max_pending_bytes",
            "connection_limit",
            "worker_threads",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"ServerConfig.{name} must be an int > 0, not {value!r}")
        if self.chunk_bytes > self.max_message_bytes:
            raise InvalidArgumentError(
                f"ServerConfig.chunk_bytes ({self.chunk_bytes}) cannot exceed "
                f"max_message_bytes ({self.max_message_bytes})"
            )
