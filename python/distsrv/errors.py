"""TensorFlow's error classes, one per gRPC status code.

Every failure that crosses a process boundary in distsrv carries a gRPC status code, and the Rust
core raises the class of that code, so ``except distsrv.errors.UnavailableError`` catches a dead
peer exactly where ``except tf.errors.UnavailableError`` would in TensorFlow code being ported.
The names, codes and the code <-> class table are TensorFlow's (``tf.errors``); the constructor
is simpler because distsrv has no graph ops: an error names the *task* where it happened, not a
``NodeDef``.

Where a Python built-in exception means the same, the class is that too, so generic handlers
catch it: ``InvalidArgumentError`` is a ``ValueError``, ``DeadlineExceededError`` a
``TimeoutError``, ``NotFoundError`` a ``LookupError``, ``UnavailableError`` a
``ConnectionError`` (an ``OSError``), ``PermissionDeniedError`` and ``UnauthenticatedError`` a
``PermissionError``, ``UnimplementedError`` a ``NotImplementedError``, and
``FailedPreconditionError`` and ``InternalError`` a ``RuntimeError``.
"""

from __future__ import annotations

__all__ = [
    "ABORTED",
    "ALREADY_EXISTS",
    "CANCELLED",
    "DATA_LOSS",
    "DEADLINE_EXCEEDED",
    "FAILED_PRECONDITION",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "OK",
    "OUT_OF_RANGE",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
    "UNKNOWN",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OpError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "RemoteError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_code_from_exception_type",
    "exception_type_from_error_code",
]

# The canonical gRPC status codes (google.rpc.Code), which TensorFlow's error codes equal.
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
UNAUTHENTICATED = 16


class OpError(Exception):
    """A distsrv operation failed; catch a subclass to handle one kind of failure.

    ``error_code`` is the gRPC status code, so an error raised on a peer keeps its meaning when
    it is rebuilt here. ``task`` names the task where the failure happened (for example
    ``"/job:ps/task:0"``) when it was not this process, because "which peer?" is the first
    question when a distributed job fails.
    """

    def __init__(self, message: str, error_code: int = UNKNOWN, *, task: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code
        self.task = task

    def __str__(self) -> str:
        if self.task is None:
            return self.message
        return f"task {self.task}: {self.message}"

    def __repr__(self) -> str:
        # The code is implied by a subclass's name; only the generic class needs to show it.
        code = f", error_code={self.error_code}" if type(self) is OpError else ""
        task = f", task={self.task!r}" if self.task is not None else ""
        return f"{type(self).__name__}({self.message!r}{code}{task})"

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses take fewer constructor arguments than OpError and ``task`` is keyword-only,
        # so the default (cls, self.args) would lose the code and the task: rebuild explicitly.
        return (_rebuild, (type(self), self.message, self.error_code, self.task))


def _rebuild(cls: type[OpError], message: str, error_code: int, task: str | None) -> OpError:
    """Unpickles an ``OpError`` of any subclass without depending on its ``__init__``."""
    error = cls.__new__(cls)
    OpError.__init__(error, message, error_code, task=task)
    return error


class CancelledError(OpError):
    """The operation was cancelled, e.g. because its server stopped while it waited."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, CANCELLED, task=task)


class UnknownError(OpError):
    """An error whose kind is not known here, e.g. a status code outside gRPC's table."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, UNKNOWN, task=task)


class InvalidArgumentError(OpError, ValueError):
    """An argument was wrong whatever the state of the system (bad address, bad protocol)."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, INVALID_ARGUMENT, task=task)


class DeadlineExceededError(OpError, TimeoutError):
    """A deadline expired before the operation completed (e.g. a ``recv`` timeout)."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, DEADLINE_EXCEEDED, task=task)


class NotFoundError(OpError, LookupError):
    """A requested entity (a task, a variable, a handler) does not exist."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, NOT_FOUND, task=task)


class AlreadyExistsError(OpError):
    """An entity that was to be created already exists."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, ALREADY_EXISTS, task=task)


class PermissionDeniedError(OpError, PermissionError):
    """The caller is known but may not perform the operation."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, PERMISSION_DENIED, task=task)


class ResourceExhaustedError(OpError):
    """A limit was reached: message size, connections, pending tensors, memory."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, RESOURCE_EXHAUSTED, task=task)


class FailedPreconditionError(OpError, RuntimeError):
    """The system is not in a state to perform the operation (e.g. the server is not running)."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, FAILED_PRECONDITION, task=task)


class AbortedError(OpError):
    """The operation was aborted, typically by a concurrent action."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, ABORTED, task=task)


class OutOfRangeError(OpError):
    """The operation went past the valid range of its input."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, OUT_OF_RANGE, task=task)


class UnimplementedError(OpError, NotImplementedError):
    """The operation is not implemented or not supported (e.g. an unknown handler name)."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, UNIMPLEMENTED, task=task)


class InternalError(OpError, RuntimeError):
    """An invariant of distsrv itself was broken: a bug, not a usage error."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, INTERNAL, task=task)


class UnavailableError(OpError, ConnectionError):
    """A peer cannot be reached right now (not started yet, or gone); retrying may help."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, UNAVAILABLE, task=task)


class DataLossError(OpError):
    """Data was lost or corrupted beyond recovery."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, DATA_LOSS, task=task)


class UnauthenticatedError(OpError, PermissionError):
    """The request lacks valid credentials (missing or wrong auth token)."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message, UNAUTHENTICATED, task=task)


class RemoteError(UnknownError):
    """A remote operation's handler raised an exception that is not a distsrv error.

    ``remote_type`` is the exception's type name (``"ValueError"``, ``"mypackage.MyError"``),
    ``message`` its message and ``task`` the task whose handler raised it. The exception itself
    is not rebuilt: that would mean unpickling what a peer sent.
    """

    def __init__(self, message: str, *, remote_type: str, task: str | None = None) -> None:
        super().__init__(message, task=task)
        self.remote_type = remote_type

    def __str__(self) -> str:
        where = "" if self.task is None else f"task {self.task}: "
        return f"{where}{self.remote_type}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"RemoteError({self.message!r}, remote_type={self.remote_type!r}, task={self.task!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_remote, (type(self), self.message, self.remote_type, self.task))


def _rebuild_remote(
    cls: type[RemoteError], message: str, remote_type: str, task: str | None
) -> RemoteError:
    error = cls.__new__(cls)
    RemoteError.__init__(error, message, remote_type=remote_type, task=task)
    return error


def from_peer(code: int, message: str, task: str | None, remote_type: str | None) -> OpError:
    """The exception for a failure a peer reported: a handler's own exception is a
    :class:`RemoteError` unless it was a distsrv error, which keeps its class."""
    if remote_type is not None and code == UNKNOWN:
        return RemoteError(message, remote_type=remote_type, task=task)
    return exception_type_from_error_code(code)(message, task=task)


_CODE_TO_EXCEPTION_CLASS: dict[int, type[OpError]] = {
    CANCELLED: CancelledError,
    UNKNOWN: UnknownError,
    INVALID_ARGUMENT: InvalidArgumentError,
    DEADLINE_EXCEEDED: DeadlineExceededError,
    NOT_FOUND: NotFoundError,
    ALREADY_EXISTS: AlreadyExistsError,
    PERMISSION_DENIED: PermissionDeniedError,
    RESOURCE_EXHAUSTED: ResourceExhaustedError,
    FAILED_PRECONDITION: FailedPreconditionError,
    ABORTED: AbortedError,
    OUT_OF_RANGE: OutOfRangeError,
    UNIMPLEMENTED: UnimplementedError,
    INTERNAL: InternalError,
    UNAVAILABLE: UnavailableError,
    DATA_LOSS: DataLossError,
    UNAUTHENTICATED: UnauthenticatedError,
}

_EXCEPTION_CLASS_TO_CODE: dict[type, int] = {
    cls: code for code, cls in _CODE_TO_EXCEPTION_CLASS.items()
}


def exception_type_from_error_code(code: int) -> type[OpError]:
    """The class for a status code; ``UnknownError`` for ``OK`` or a code not in the table.

    The Rust core builds every exception as ``exception_type_from_error_code(code)(message)``;
    a peer newer than this process may send a code we do not know, and that must still raise.
    """
    return _CODE_TO_EXCEPTION_CLASS.get(code, UnknownError)


def error_code_from_exception_type(cls: type[BaseException]) -> int:
    """The status code a class stands for, ``UNKNOWN`` for any class outside the table.

    A user's subclass of, say, ``NotFoundError`` maps to ``NOT_FOUND``, so a handler that raises
    it is reported to the caller with the code its base class promises.
    """
    for base in cls.__mro__:
        code = _EXCEPTION_CLASS_TO_CODE.get(base)
        if code is not None:
            return code
    return UNKNOWN
