"""``JobDef``, ``ClusterDef`` and ``ServerDef`` without a protobuf runtime.

These are the three TensorFlow messages a distsrv user meets (``ClusterSpec.as_cluster_def()``,
``Server.server_def``). Their bytes are TensorFlow's: the Rust core encodes and decodes them
with TensorFlow's field numbers, so ``ServerDef.SerializeToString()`` parses as
``tensorflow.ServerDef`` and ``ClusterDef.FromString(tf_cluster_def.SerializeToString())`` works
- all without importing ``google.protobuf``, which would pin a protobuf version on every user.

The objects are immutable and hashable, so a ``ClusterSpec`` can hand out its ``ClusterDef``
without copying it and nobody can change a server's definition behind its back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeAlias

from . import _native
from .errors import InvalidArgumentError

__all__ = ["ClusterDef", "JobDef", "ServerDef"]

# What protobuf's FromString parses.
_BytesLike: TypeAlias = bytes | bytearray | memoryview

# The fields are protobuf int32, but a task index is never negative and a port is 16 bits: out
# of those ranges a message could be built here yet not encoded by the Rust core, so refuse it.
_MAX_TASK_INDEX = 2**31 - 1
_MAX_PORT = 65535

# The key of ClusterDef's field 1 (``repeated JobDef job``): field number 1, wire type 2.
_CLUSTER_DEF_JOB_KEY = 0x0A


def _check_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    return value


def _check_int(value: object, what: str, maximum: int) -> int:
    # bool is an int to Python but never a sensible index or port; protobuf refuses it too.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise InvalidArgumentError(f"{what} {value} is out of range [0, {maximum}]")
    return value


def _as_bytes(data: object) -> bytes:
    # bytes(5) would be five zero bytes: accept only what protobuf's FromString accepts.
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, not {type(data).__name__}")
    return bytes(data)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_end(data: bytes, pos: int) -> int:
    """The position just after the varint that starts at ``data[pos]``."""
    while data[pos] & 0x80:
        pos += 1
    return pos + 1


@dataclass(frozen=True, repr=False)
class JobDef:
    """One job of a cluster: its name and the address of each of its tasks.

    ``tasks`` maps task index to ``"host:port"``; indices may be sparse, as in TensorFlow. It is
    stored as a read-only mapping in index order.
    """

    name: str = ""
    tasks: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str(self.name, "JobDef.name")
        if not isinstance(self.tasks, Mapping):
            raise TypeError(f"JobDef.tasks must be a mapping, not {type(self.tasks).__name__}")
        tasks = {
            _check_int(index, f"task index of job {self.name!r}", _MAX_TASK_INDEX): _check_str(
                address, f"address of task {index!r} of job {self.name!r}"
            )
            for index, address in self.tasks.items()
        }
        object.__setattr__(self, "tasks", MappingProxyType(dict(sorted(tasks.items()))))

    def __hash__(self) -> int:
        return hash((self.name, frozenset(self.tasks.items())))

    def __repr__(self) -> str:
        return f"JobDef(name={self.name!r}, tasks={dict(self.tasks)!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # A mappingproxy cannot be pickled; rebuild from a plain dict.
        return (JobDef, (self.name, dict(self.tasks)))

    def SerializeToString(self, *, deterministic: bool = False) -> bytes:
        """The protobuf bytes of this ``tensorflow.JobDef``, always deterministic (in order),
        whatever protobuf's ``deterministic`` keyword says."""
        # A ClusterDef holding one job is the key of field 1, a length, then exactly the JobDef's
        # bytes: strip that frame rather than keep a second encoder in Python.
        framed = ClusterDef(job=(self,)).SerializeToString()
        return framed[_varint_end(framed, 1) :]

    @classmethod
    def FromString(cls, data: _BytesLike) -> JobDef:
        """Parses the bytes of a ``tensorflow.JobDef``; ``ValueError`` if they do not parse."""
        payload = _as_bytes(data)
        framed = bytes([_CLUSTER_DEF_JOB_KEY]) + _encode_varint(len(payload)) + payload
        (job,) = ClusterDef.FromString(framed).job
        return job


@dataclass(frozen=True, repr=False)
class ClusterDef:
    """The jobs of a cluster (TensorFlow's ``tensorflow.ClusterDef``).

    Job names must be unique: TensorFlow's runtime refuses a cluster with a job listed twice,
    so it is refused here, where the mistake is made.
    """

    job: tuple[JobDef, ...] = ()

    def __post_init__(self) -> None:
        jobs = tuple(self.job)
        seen: set[str] = set()
        for job in jobs:
            if not isinstance(job, JobDef):
                raise TypeError(f"ClusterDef.job must hold JobDef, not {type(job).__name__}")
            if job.name in seen:
                raise ValueError(f"job {job.name!r} appears twice in the ClusterDef")
            seen.add(job.name)
        object.__setattr__(self, "job", jobs)

    def __repr__(self) -> str:
        return f"ClusterDef(job={self.job!r})"

    def _jobs(self) -> dict[str, dict[int, str]]:
        return {job.name: dict(job.tasks) for job in self.job}

    @classmethod
    def _from_jobs(cls, jobs: Mapping[str, Mapping[int, str]]) -> ClusterDef:
        return cls(job=tuple(JobDef(name, tasks) for name, tasks in jobs.items()))

    def SerializeToString(self, *, deterministic: bool = False) -> bytes:
        """The protobuf bytes of this ``tensorflow.ClusterDef``, always deterministic (in order),
        whatever protobuf's ``deterministic`` keyword says."""
        return _native.cluster_def_to_bytes(self._jobs())

    @classmethod
    def FromString(cls, data: _BytesLike) -> ClusterDef:
        """Parses the bytes of a ``tensorflow.ClusterDef``; ``ValueError`` if they do not parse."""
        return cls._from_jobs(_native.cluster_def_from_bytes(_as_bytes(data)))


@dataclass(frozen=True, repr=False)
class ServerDef:
    """What one server is: its cluster, its own job and task, and its protocol.

    ``port``, when not 0, is the port the server actually bound, which overrides the port in its
    cluster address (TensorFlow's ``ServerDef.port``).
    """

    cluster: ClusterDef = field(default_factory=ClusterDef)
    job_name: str = ""
    task_index: int = 0
    protocol: str = ""
    port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.cluster, ClusterDef):
            raise TypeError(
                f"ServerDef.cluster must be a ClusterDef, not {type(self.cluster).__name__}"
            )
        _check_str(self.job_name, "ServerDef.job_name")
        _check_int(self.task_index, "ServerDef.task_index", _MAX_TASK_INDEX)
        _check_str(self.protocol, "ServerDef.protocol")
        _check_int(self.port, "ServerDef.port", _MAX_PORT)

    def __repr__(self) -> str:
        return (
            f"ServerDef(cluster={self.cluster!r}, job_name={self.job_name!r}, "
            f"task_index={self.task_index!r}, protocol={self.protocol!r}, port={self.port!r})"
        )

    def SerializeToString(self, *, deterministic: bool = False) -> bytes:
        """The protobuf bytes of this ``tensorflow.ServerDef``, always deterministic (in order),
        whatever protobuf's ``deterministic`` keyword says."""
        return _native.server_def_to_bytes(
            self.cluster._jobs(), self.job_name, self.task_index, self.protocol, self.port
        )

    @classmethod
    def FromString(cls, data: _BytesLike) -> ServerDef:
        """Parses the bytes of a ``tensorflow.ServerDef``; ``ValueError`` if they do not parse."""
        jobs, job_name, task_index, protocol, port = _native.server_def_from_bytes(_as_bytes(data))
        return cls(ClusterDef._from_jobs(jobs), job_name, task_index, protocol, port)
