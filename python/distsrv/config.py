"""Server tunables, validated on construction."""

from __future__ import annotations

import dataclasses

from distsrv import _native

__all__ = ["ServerConfig"]

# The defaults and bounds live in the Rust core (`base/config.rs`), the one place of them.
_DEFAULTS = _native.config_defaults()


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a :class:`distsrv.Server` behaves. Times are in seconds, sizes in bytes.

    The defaults suit one task per process on one host or a small cluster.
    """

    #: How long to keep trying to reach a peer (it may still be starting) before a call fails
    #: with ``UnavailableError``; also how long a waiting ``recv`` tolerates an unreachable source.
    connect_timeout: float = _DEFAULTS["connect_timeout"]
    #: How long a peer that was up may stay silent (frozen, cut off, gone without a word) before
    #: every call waiting on it raises ``UnavailableError`` naming it. Peers are asked for a
    #: heartbeat several times within it.
    peer_timeout: float = _DEFAULTS["peer_timeout"]
    #: How long ``stop()`` lets in-flight calls finish before cutting them off.
    shutdown_grace: float = _DEFAULTS["shutdown_grace"]
    #: How long a collective called without ``timeout=`` may take before it raises
    #: ``DeadlineExceededError``: 30 minutes, torch.distributed's default, so that a member that
    #: never joins fails the others in bounded time. Pass ``timeout=`` for another limit.
    collective_timeout: float = _DEFAULTS["collective_timeout"]
    #: Largest single gRPC message accepted. Tensors travel in chunks, so this bounds a chunk,
    #: not a tensor.
    max_message_bytes: int = _DEFAULTS["max_message_bytes"]
    #: Payload bytes per message of a tensor stream.
    chunk_bytes: int = _DEFAULTS["chunk_bytes"]
    #: Bytes of received tensors that no ``recv`` has claimed yet that the server holds; a send
    #: past it fails with ``ResourceExhaustedError`` instead of growing memory without bound.
    #: 4 GiB by default (half the machine's memory where that is less); never more than the
    #: machine has. The variables a task hosts are held to a budget of the same size, their own.
    max_pending_bytes: int = _DEFAULTS["max_pending_bytes"]
    #: Calls served at once; more are refused with ``ResourceExhaustedError``.
    connection_limit: int = _DEFAULTS["connection_limit"]
    #: The most of ``max_pending_bytes`` and of ``connection_limit`` calls in flight that one
    #: peer may hold, as a fraction in (0, 1]: a peer past its share gets
    #: ``ResourceExhaustedError`` while the others are still served. A peer is the task that
    #: sent a tensor, or the task a caller's certificate (or the same-host link) proves, else
    #: the caller's IP address. ``1.0`` lets one peer take a whole budget.
    peer_share: float = _DEFAULTS["peer_share"]
    #: Connections one IP address may keep open; more are closed as they arrive, unserved.
    #: HTTP/2 carries all of a peer's calls on one or two connections, so only many tasks
    #: behind one address need more.
    max_connections_per_address: int = _DEFAULTS["max_connections_per_address"]
    #: Threads of the server's runtime.
    worker_threads: int = _DEFAULTS["worker_threads"]
    #: Tensors to tasks on the same host (proven by a handshake: same machine, same user) travel
    #: through shared memory, gRPC carrying only control. ``False`` keeps every tensor on gRPC,
    #: sent and received, e.g. to compare the two.
    shared_memory: bool = _DEFAULTS["shared_memory"]

    def __post_init__(self) -> None:
        _native.check_config(self)
