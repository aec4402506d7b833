"""The Rust extension. Use the ``distsrv`` package; this module is private."""

from collections.abc import Callable
from typing import Any, final

__all__ = [
    "BUILD_PROFILE",
    "Pending",
    "Server",
    "TensorBytes",
    "__version__",
    "blocked_threads",
    "cluster_def_from_bytes",
    "cluster_def_to_bytes",
    "parse_address",
    "parse_task",
    "query_status",
    "server_def_from_bytes",
    "server_def_to_bytes",
]

__version__: str
BUILD_PROFILE: str

def blocked_threads() -> int: ...
def parse_address(address: str) -> tuple[str, int]: ...
def parse_task(name: str) -> tuple[str, int]: ...
def cluster_def_to_bytes(jobs: dict[str, dict[int, str]]) -> bytes: ...
def cluster_def_from_bytes(data: bytes) -> dict[str, dict[int, str]]: ...
def server_def_to_bytes(
    jobs: dict[str, dict[int, str]], job_name: str, task_index: int, protocol: str, port: int
) -> bytes: ...
def server_def_from_bytes(data: bytes) -> tuple[dict[str, dict[int, str]], str, int, str, int]: ...

# (name, device_type, memory_limit, incarnation, physical_device_desc, bus_id)
_Device = tuple[str, str, int, int, str, int]

def query_status(
    address: str, timeout: float
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
    # None for a send, (dtype code, shape, bytes) for a receive, the result for a call.
    def wait(self, timeout: float | None = None) -> Any: ...

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
        self, to: tuple[str, int], name: str, dtype: int, shape: list[int], data: Any
    ) -> None: ...
    def isend(
        self, to: tuple[str, int], name: str, dtype: int, shape: list[int], data: Any
    ) -> Pending: ...
    def recv(
        self, source: tuple[str, int], name: str, timeout: float | None = None
    ) -> tuple[int, list[int], TensorBytes]: ...
    def irecv(
        self, source: tuple[str, int], name: str, timeout: float | None = None
    ) -> Pending: ...
    def all_reduce(
        self,
        group: list[tuple[str, int]] | None,
        op: str,
        dtype: int,
        shape: list[int],
        data: Any,
        timeout: float | None = None,
    ) -> tuple[int, list[int], TensorBytes]: ...
    def reduce_scatter(
        self,
        group: list[tuple[str, int]] | None,
        op: str,
        dtype: int,
        shape: list[int],
        data: Any,
        timeout: float | None = None,
    ) -> tuple[int, list[int], TensorBytes]: ...
    def all_gather(
        self,
        group: list[tuple[str, int]] | None,
        dtype: int,
        shape: list[int],
        data: Any,
        timeout: float | None = None,
    ) -> tuple[int, list[int], TensorBytes]: ...
    def broadcast(
        self,
        group: list[tuple[str, int]] | None,
        root: tuple[str, int],
        given: tuple[int, list[int], Any] | None,
        timeout: float | None = None,
    ) -> tuple[int, list[int], TensorBytes]: ...
    def barrier(
        self, group: list[tuple[str, int]] | None, timeout: float | None = None
    ) -> None: ...
    def variable_op(
        self,
        host: tuple[str, int],
        name: str,
        op: str,
        value: tuple[int, list[int], Any] | None = None,
        learning_rate: float = 0.0,
    ) -> tuple[int, list[int], TensorBytes] | None: ...
    def local_devices(self) -> list[_Device]: ...
    def list_devices(self, timeout: float | None = None) -> list[_Device]: ...
    def wait_for_cluster(self, timeout: float | None = None) -> dict[str, int]: ...
    def add_handler(
        self, op: str, function: Callable[..., Any], scheduled: bool, wants_context: bool
    ) -> None: ...
    def remove_handler(self, op: str) -> bool: ...
    def block_handlers(self, ops: list[str]) -> None: ...
    def call(
        self,
        to: tuple[str, int],
        op: str,
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> Any: ...
    def icall(
        self,
        to: tuple[str, int],
        op: str,
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> Pending: ...
