"""The Rust extension. Use the ``distsrv`` package; this module is private."""

from collections.abc import Callable
from typing import Any, final

import numpy.typing as npt

__all__ = [
    "BUILD_PROFILE",
    "PeerEvents",
    "Pending",
    "Server",
    "TensorBytes",
    "__version__",
    "blocked_threads",
    "check_config",
    "cluster_def_from_bytes",
    "cluster_def_to_bytes",
    "config_defaults",
    "decode_object",
    "encode_object",
    "parse_address",
    "parse_task",
    "query_status",
    "reset_logging",
    "server_def_from_bytes",
    "server_def_to_bytes",
    "temporary_tls",
]

__version__: str
BUILD_PROFILE: str

# A task as "/job:<job>/task:<index>" or (job, index).
_Task = str | tuple[str, int]

def blocked_threads() -> int: ...
def config_defaults() -> dict[str, Any]: ...
def check_config(config: Any) -> None: ...
def parse_address(address: str) -> tuple[str, int]: ...
def reset_logging() -> None: ...
def temporary_tls(
    hosts: list[str], tasks: list[_Task | None]
) -> list[tuple[bytes, bytes, bytes]]: ...
def parse_task(task: _Task) -> tuple[str, int]: ...
def encode_object(value: Any) -> bytes: ...
def decode_object(encoded: bytes) -> Any: ...
def cluster_def_to_bytes(jobs: dict[str, dict[int, str]]) -> bytes: ...
def cluster_def_from_bytes(data: bytes) -> dict[str, dict[int, str]]: ...
def server_def_to_bytes(
    jobs: dict[str, dict[int, str]], job_name: str, task_index: int, protocol: str, port: int
) -> bytes: ...
def server_def_from_bytes(data: bytes) -> tuple[dict[str, dict[int, str]], str, int, str, int]: ...

# (name, device_type, memory_limit, incarnation, physical_device_desc, bus_id)
_Device = tuple[str, str, int, int, str, int]

def query_status(
    address: str, timeout: float, security: Any = None
) -> tuple[str | None, str | None, int, str | None, list[_Device]]: ...

@final
class TensorBytes:
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...

@final
class Pending:
    def fileno(self) -> int: ...
    def done(self) -> bool: ...
    # None for a send, the array for a receive, the result for a call, the result (or None)
    # of a collective.
    def wait(self, timeout: float | None = None) -> Any: ...

@final
class PeerEvents:
    # (task, "up" | "restarted" | "lost", incarnation, reason), or None past the timeout.
    def next(
        self, timeout: float | None = None
    ) -> tuple[str, str, int | None, str | None] | None: ...

@final
class Server:
    def __new__(
        cls,
        jobs: dict[str, dict[int, str]],
        job_name: str,
        task_index: int,
        protocol: str,
        port: int,
        config: Any,
        security: Any = None,
    ) -> Server: ...
    def start(self) -> None: ...
    def stop(self, grace: float | None = None) -> None: ...
    def join(self, timeout: float | None = None) -> bool: ...
    @property
    def status(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def listen_address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def incarnation(self) -> int: ...
    def server_def_bytes(self) -> bytes: ...
    def transport_counts(self) -> dict[str, int]: ...
    def send(
        self, to: _Task, name: str, array: npt.ArrayLike, timeout: float | None = None
    ) -> None: ...
    def isend(self, to: _Task, name: str, array: npt.ArrayLike) -> Pending: ...
    def recv(self, source: _Task, name: str, timeout: float | None = None) -> npt.NDArray[Any]: ...
    def irecv(self, source: _Task, name: str, timeout: float | None = None) -> Pending: ...
    def recv_any(
        self, sources: list[_Task], name: str, timeout: float | None = None
    ) -> tuple[str, npt.NDArray[Any]]: ...
    # kind: "all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier", "reduce",
    # "gather", "scatter" or "all_to_all"; None where this member gets no result.
    def collective(
        self,
        kind: str,
        group: list[_Task] | None,
        array: npt.ArrayLike | None = None,
        op: str | None = None,
        root: _Task | None = None,
        timeout: float | None = None,
        inplace: bool = False,
    ) -> npt.NDArray[Any] | None: ...
    def icollective(
        self,
        kind: str,
        group: list[_Task] | None,
        array: npt.ArrayLike | None = None,
        op: str | None = None,
        root: _Task | None = None,
        timeout: float | None = None,
        inplace: bool = False,
    ) -> Pending: ...
    # A read gives the value, a describe (dtype, shape), a list [(name, dtype, shape)], the
    # rest None.
    def variable_op(
        self,
        host: _Task,
        name: str,
        op: str,
        value: npt.ArrayLike | None = None,
        *,
        learning_rate: float = 0.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        beta1: float = 0.0,
        beta2: float = 0.0,
        epsilon: float = 0.0,
        timeout: float | None = None,
    ) -> Any: ...
    def local_devices(self) -> list[_Device]: ...
    def list_devices(self, timeout: float | None = None) -> list[_Device]: ...
    def wait_for_cluster(self, timeout: float | None = None) -> dict[str, int]: ...
    def watch_peers(self) -> PeerEvents: ...
    def add_handler(
        self, op: str, function: Callable[..., Any], scheduled: bool, wants_context: bool
    ) -> None: ...
    def remove_handler(self, op: str) -> bool: ...
    def block_handlers(self, ops: list[str]) -> None: ...
    def call(
        self,
        to: _Task,
        op: str,
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> Any: ...
    def icall(
        self,
        to: _Task,
        op: str,
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> Pending: ...
