"""``ClusterSpec``: the jobs and tasks of a training cluster, as ``tf.train.ClusterSpec`` has them.

Code written for TensorFlow builds its cluster with ``tf.train.ClusterSpec``; distsrv's accepts
the same input, answers the same questions and raises the same exception types for the same bad
input, so that code moves over by changing an import. What TensorFlow lacks is added where a
cluster is born: addresses are checked when the spec is built (not when a server first dials a
peer, minutes into a job), and the two environments clusters usually come from - ``TF_CONFIG``
(TensorFlow, Kubeflow's TFJob) and a Slurm allocation - can be read directly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, Protocol, TypeAlias

from . import _native
from .messages import ClusterDef, JobDef
from .rendezvous import rendezvous
from .slurm import slurm_addresses, slurm_int

__all__ = ["ClusterLike", "ClusterSpec"]

# Protobuf messages whose bytes are a ClusterDef: TensorFlow's own and the one in distsrv's protos.
_PROTOBUF_CLUSTER_DEF_NAMES = frozenset({"tensorflow.ClusterDef", "distsrv.v1.ClusterDef"})

# TensorFlow's grammar for the job in a device name ("/job:worker/replica:0/task:0/device:CPU:0").
# A job outside it could be listed in a ClusterSpec but never named by a task or a device.
_JOB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

# Task indices travel as protobuf int32.
_MAX_TASK_INDEX = 2**31 - 1
_MAX_PORT = 65535


class _ProtobufMessage(Protocol):
    """A generated protobuf message, e.g. ``tensorflow.ClusterDef`` from TensorFlow or grpcio."""

    @property
    def DESCRIPTOR(self) -> Any: ...

    def SerializeToString(self) -> bytes: ...


_Tasks: TypeAlias = list[str] | tuple[str, ...] | Mapping[int, str] | Mapping[str, str]
ClusterLike: TypeAlias = "Mapping[str, _Tasks] | ClusterSpec | ClusterDef | _ProtobufMessage"


def _job_name(job_name: object) -> str:
    if isinstance(job_name, bytes):
        job_name = job_name.decode()
    if not isinstance(job_name, str):
        raise TypeError(f"Job name {job_name!r} must be bytes or unicode")
    return job_name


def _task_index(job_name: str, index: object) -> int:
    # Dict keys that went through JSON (TF_CONFIG) are strings; TensorFlow's int() takes "3" too.
    if isinstance(index, str):
        try:
            return int(index)
        except ValueError:
            raise ValueError(
                f"The task index {index!r} of job {job_name!r} is not an integer"
            ) from None
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    raise TypeError(f"The task index {index!r} of job {job_name!r} must be an integer")


def _tf_config_task_index(index: object) -> int:
    """The ``"index"`` of ``TF_CONFIG``'s ``"task"``: an int >= 0, or its decimal string."""
    value = None
    if isinstance(index, str) and index.strip().isdecimal():
        value = int(index)
    elif isinstance(index, int) and not isinstance(index, bool):
        value = index
    if value is None or value < 0:
        raise ValueError(f"TF_CONFIG task index must be a non-negative integer, not {index!r}")
    return value


def _task_address(address: object) -> str:
    if isinstance(address, bytes):
        address = address.decode()
    if not isinstance(address, str):
        raise TypeError(f"Task address {address!r} must be bytes or unicode")
    return address


def _validate(cluster_spec: Mapping[str, Mapping[int, str]]) -> None:
    """Refuses what no server could use: bad job names, negative indices, bad addresses."""
    for job_name, tasks in cluster_spec.items():
        if not _JOB_NAME.fullmatch(job_name):
            raise ValueError(
                f"Job name {job_name!r} is not valid: a job name starts with a letter and has "
                "only letters, digits and '_'"
            )
        for index, address in tasks.items():
            if not 0 <= index <= _MAX_TASK_INDEX:
                raise ValueError(
                    f"Task index {index} of job {job_name!r} is out of range [0, {_MAX_TASK_INDEX}]"
                )
            try:
                _native.parse_address(address)
            except ValueError as err:
                raise ValueError(
                    f"Invalid address {address!r} for task {index} of job {job_name!r}: {err}"
                ) from err


class ClusterSpec:
    """Represents a cluster as a set of "tasks", organized into "jobs".

    Build it from a dict mapping each job name to a list of ``"host:port"`` addresses, or to a
    dict from task index to address for a *sparse* job (a task that need not know every peer)::

        ClusterSpec({"ps": ["ps0:2222"], "worker": {1: "worker1:2222"}})

    or from a ``ClusterDef`` (distsrv's, TensorFlow's or ``distsrv.v1``'s protobuf message), or
    from another ``ClusterSpec``. Every address must be ``host:port`` with a port in 0..65535;
    an IPv6 host goes in brackets (``"[::1]:2222"``).

    Equality compares the task tables, also against a ``{job: {index: address}}`` dict, as
    TensorFlow does; since it can equal a dict, which has no hash, it has none either.
    """

    __hash__ = None  # type: ignore[assignment]

    _cluster_spec: dict[str, dict[int, str]]
    _cluster_def: ClusterDef

    def __init__(self, cluster: ClusterLike) -> None:
        """Creates a ``ClusterSpec``.

        Raises:
          TypeError: ``cluster`` is none of the accepted kinds, a job's tasks are neither a
            list nor a dict, or a job name, task index or address has the wrong type.
          ValueError: a job name, task index or address is not valid.
        """
        if isinstance(cluster, Mapping):
            self._cluster_spec = {}
            for raw_job_name, tasks in cluster.items():
                job_name = _job_name(raw_job_name)
                if isinstance(tasks, list | tuple):
                    indexed: Mapping[Any, object] = dict(enumerate(tasks))
                elif isinstance(tasks, Mapping):
                    indexed = tasks
                else:
                    raise TypeError(
                        f"The tasks for job {job_name!r} must be a list or a dictionary "
                        "from integers to strings."
                    )
                self._cluster_spec[job_name] = {
                    _task_index(job_name, index): _task_address(address)
                    for index, address in indexed.items()
                }
            _validate(self._cluster_spec)
            # Sorted by job name and task index, so the same cluster gives the same bytes.
            self._cluster_def = ClusterDef(
                job=tuple(
                    JobDef(job_name, tasks)
                    for job_name, tasks in sorted(self._cluster_spec.items())
                )
            )
            return
        if isinstance(cluster, ClusterDef):
            cluster_def = cluster
        elif isinstance(cluster, ClusterSpec):
            cluster_def = cluster.as_cluster_def()
        elif getattr(getattr(cluster, "DESCRIPTOR", None), "full_name", None) in (
            _PROTOBUF_CLUSTER_DEF_NAMES
        ):
            cluster_def = ClusterDef.FromString(cluster.SerializeToString())
        else:
            raise TypeError(
                "`cluster` must be a dictionary mapping one or more job names to lists of "
                "network addresses, or a `ClusterDef` protocol buffer"
            )
        # Jobs keep the ClusterDef's order, as in TensorFlow.
        self._cluster_spec = {job.name: dict(job.tasks) for job in cluster_def.job}
        _validate(self._cluster_spec)
        self._cluster_def = cluster_def

    def __bool__(self) -> bool:
        return bool(self._cluster_spec)

    def __eq__(self, other: object) -> bool:
        # TensorFlow's definition: against a ClusterSpec, Python falls back to the reflected
        # comparison (dict.__eq__ returns NotImplemented), which compares the two task tables.
        return self._cluster_spec == other

    def __ne__(self, other: object) -> bool:
        return self._cluster_spec != other

    def __repr__(self) -> str:
        key_values = self.as_dict()
        items = ", ".join(f"{job!r}: {key_values[job]!r}" for job in sorted(key_values))
        return f"ClusterSpec({{{items}}})"

    def as_dict(self) -> dict[str, list[str] | dict[int, str]]:
        """Returns a dictionary from job names to their tasks.

        A job whose task indices are dense (0..n-1) maps to a list of addresses, as before
        sparse jobs existed; a sparse one maps to a dict from task index to address; a job
        without tasks maps to an empty dict.
        """
        ret: dict[str, list[str] | dict[int, str]] = {}
        for job_name, tasks in self._cluster_spec.items():
            if tasks and max(tasks) + 1 == len(tasks):
                ret[job_name] = [tasks[index] for index in range(len(tasks))]
            else:
                ret[job_name] = dict(sorted(tasks.items()))
        return ret

    def as_cluster_def(self) -> ClusterDef:
        """Returns a ``ClusterDef`` protocol buffer based on this cluster."""
        return self._cluster_def

    @property
    def jobs(self) -> list[str]:
        """The job names in this cluster, in the order they were given."""
        return list(self._cluster_spec)

    def _job(self, job_name: str) -> dict[int, str]:
        try:
            return self._cluster_spec[job_name]
        except KeyError:
            raise ValueError(f"No such job in cluster: {job_name!r}") from None

    def num_tasks(self, job_name: str) -> int:
        """Returns the number of tasks defined in ``job_name``; ``ValueError`` if no such job."""
        return len(self._job(job_name))

    def task_indices(self, job_name: str) -> list[int]:
        """Returns the sorted task indices of ``job_name``; ``ValueError`` if no such job."""
        return sorted(self._job(job_name))

    def task_address(self, job_name: str, task_index: int) -> str:
        """Returns the address of a task; ``ValueError`` if the job or the task is not defined."""
        job = self._job(job_name)
        try:
            return job[task_index]
        except KeyError:
            raise ValueError(f"No task with index {task_index!r} in job {job_name!r}") from None

    def job_tasks(self, job_name: str) -> list[str | None]:
        """Returns the addresses of ``job_name``'s tasks, indexed by task index.

        For a sparse job the list has ``None`` where no task is defined, so its length may
        exceed ``num_tasks(job_name)``.

        Raises:
          ValueError: If ``job_name`` does not name a job in this cluster.
        """
        job = self._job(job_name)
        ret: list[str | None] = [None] * (max(job) + 1 if job else 0)
        for index, address in job.items():
            ret[index] = address
        return ret

    @classmethod
    def from_tf_config(
        cls, env: str | Mapping[str, Any] | None = None
    ) -> tuple[ClusterSpec, str | None, int | None]:
        """Reads a ``TF_CONFIG`` and returns ``(cluster spec, task type, task index)``.

        ``TF_CONFIG`` is the JSON that TensorFlow's ``TFConfigClusterResolver`` reads and that
        Kubeflow's TFJob sets in every pod, e.g.
        ``{"cluster": {"chief": [...], "worker": [...]}, "task": {"type": "worker", "index": 1}}``.

        Args:
          env: the JSON text, or the already-parsed dict; by default the ``TF_CONFIG``
            environment variable.

        Returns:
          The spec built from ``"cluster"``; the task's type and index from ``"task"``, or
          ``None`` for what ``"task"`` leaves out. As in TensorFlow, an ``"evaluator"`` task may
          be outside the cluster (Kubeflow does not list it there).

        Raises:
          ValueError: ``TF_CONFIG`` is unset or not JSON, ``"cluster"`` is missing or not a
            valid cluster, or ``"task"`` names a job or index that the cluster lacks.
        """
        config = _load_tf_config(env)
        if "cluster" not in config:
            raise ValueError("TF_CONFIG has no 'cluster'")
        cluster = config["cluster"]
        if not isinstance(cluster, Mapping):
            raise ValueError(
                f"TF_CONFIG 'cluster' must map job names to tasks, not {type(cluster).__name__}"
            )
        try:
            spec = cls(cluster)
        except (TypeError, ValueError) as err:
            raise ValueError(f"TF_CONFIG 'cluster' is not valid: {err}") from err
        task_type, task_index = _tf_config_task(spec, config.get("task"))
        return spec, task_type, task_index

    @classmethod
    def from_slurm(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        port: int = 8888,
        jobs: Mapping[str, int] | None = None,
    ) -> tuple[ClusterSpec, str, int]:
        """Builds the cluster of a Slurm job step and returns ``(spec, job, task index)``.

        Reads the nodes (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``, compressed like
        ``"node[01-03,07],gpu5"``), the tasks on each (``SLURM_STEP_TASKS_PER_NODE``, else
        ``SLURM_TASKS_PER_NODE``, like ``"2(x3),1"``), the task count if set
        (``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``, which must agree) and this task's rank
        (``SLURM_PROCID``). Ranks go to nodes in node-list order, consecutive on each node, as
        Slurm's default block distribution places them; the tasks on one node listen on
        consecutive ports from ``port``.

        Args:
          env: the environment to read; by default ``os.environ``.
          port: the port of the first task on each node.
          jobs: job name -> number of tasks; the ranks are split into these jobs in the order
            given (default: one job ``"worker"`` with every task).

        Raises:
          ValueError: a variable is missing or malformed, the job sizes do not add up to the
            number of tasks, or an address would be invalid (e.g. a port above 65535).
        """
        env = os.environ if env is None else env
        if not isinstance(port, int) or isinstance(port, bool):
            raise TypeError(f"port must be an int, not {type(port).__name__}")
        if not 0 <= port <= _MAX_PORT:
            raise ValueError(f"port {port} is out of range [0, {_MAX_PORT}]")
        addresses = slurm_addresses(env, port)
        rank = slurm_int(env, "SLURM_PROCID")
        if not 0 <= rank < len(addresses):
            raise ValueError(f"SLURM_PROCID {rank} is not a rank of the {len(addresses)} tasks")
        if jobs is None:
            jobs = {"worker": len(addresses)}
        for job_name, count in jobs.items():
            if not isinstance(count, int) or isinstance(count, bool):
                raise TypeError(f"The task count of job {job_name!r} must be an int")
            if count < 0:
                raise ValueError(f"The task count of job {job_name!r} is negative")
        if sum(jobs.values()) != len(addresses):
            raise ValueError(
                f"Requested {sum(jobs.values())} tasks but Slurm assigned {len(addresses)}"
            )

        cluster: dict[str, list[str]] = {}
        own_job, own_index = "", 0
        start = 0
        for job_name, count in jobs.items():
            cluster[job_name] = addresses[start : start + count]
            if start <= rank < start + count:
                own_job, own_index = job_name, rank - start
            start += count
        return cls(cluster), own_job, own_index

    @classmethod
    def rendezvous(
        cls,
        coordinator: str,
        job: str,
        task_index: int,
        num_tasks: int | Mapping[str, int],
        *,
        coordinator_task: tuple[str, int] | None = None,
        host: str | None = None,
        token: str | None = None,
        timeout: float = 300.0,
    ) -> ClusterSpec:
        """The whole cluster, for a task that knows only its own place, the cluster's size and
        one coordinator address, as torchrun, Kubernetes JobSets and Ray give them.

        Every task calls it: the coordinator task (``coordinator_task``, by default task 0 of
        the first job) listens on ``coordinator`` ("host:port"); each task takes a free port of
        ``host`` (by default, the address this host reaches the coordinator from) and registers
        it there, and all get the same spec back once every task has registered. Build the
        :class:`Server` on it at once: the port is free, not held.

        Args:
          coordinator: where the coordinator task listens, "host:port".
          job, task_index: this task.
          num_tasks: the size of ``job`` (the only job), or job name -> number of tasks.
          token: the cluster's token (``Security.token``): registrations without it are refused
            with ``UnauthenticatedError``, and an answer without it is not believed. It never
            travels: each side proves it holds it with an HMAC over the other's fresh nonce.
          timeout: seconds for the whole rendezvous.

        Raises:
          InvalidArgumentError: this task is not one of ``num_tasks``, or two processes
            registered as the same task (every task then fails).
          DeadlineExceededError: not every task registered within ``timeout``; the coordinator
            names the missing ones.
        """
        tasks = {job: num_tasks} if isinstance(num_tasks, int) else dict(num_tasks)
        if coordinator_task is None:
            coordinator_task = (next(iter(tasks), job), 0)
        cluster = rendezvous(
            coordinator,
            job,
            task_index,
            tasks,
            coordinator_task=coordinator_task,
            host=host,
            token=token,
            timeout=timeout,
        )
        return cls(cluster)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        slurm_port: int = 8888,
        timeout: float = 300.0,
    ) -> tuple[ClusterSpec, str, int, str]:
        """This task's cluster from whatever started it: ``(spec, job, task index, source)``,
        ``source`` saying which it used. Tries, in order, ``TF_CONFIG`` (TensorFlow, Kubeflow,
        ``distsrv launch``), Slurm (``SLURM_PROCID``; see :meth:`from_slurm`, whose ``port``
        ``slurm_port`` is), and torchrun's
        variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``: a
        :meth:`rendezvous` of one job "worker" at the master, with ``DISTSRV_TOKEN`` if set).

        Raises:
          ValueError: none of them is set.
        """
        env = os.environ if env is None else env
        if "TF_CONFIG" in env:
            spec, job, index = cls.from_tf_config(env["TF_CONFIG"])
            if job is None or index is None:
                raise ValueError("TF_CONFIG names no task (its 'task' key)")
            return spec, job, index, "TF_CONFIG"
        if "SLURM_PROCID" in env:
            spec, job, index = cls.from_slurm(env, port=slurm_port)
            return spec, job, index, "Slurm"
        torchrun = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        if all(name in env for name in torchrun):
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            coordinator = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
            token = env.get("DISTSRV_TOKEN") or None  # security.TOKEN_ENV, a layer up
            spec = cls.rendezvous(coordinator, "worker", rank, world, token=token, timeout=timeout)
            return spec, "worker", rank, "torchrun"
        raise ValueError(
            "no cluster in the environment: set TF_CONFIG, run under Slurm, or set RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )


def _load_tf_config(env: str | Mapping[str, Any] | None) -> Mapping[str, Any]:
    if env is None:
        try:
            env = os.environ["TF_CONFIG"]
        except KeyError:
            raise ValueError("TF_CONFIG is not set in the environment") from None
    if isinstance(env, str):
        try:
            config: object = json.loads(env)
        except json.JSONDecodeError as err:
            raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from None
    else:
        config = env
    if not isinstance(config, Mapping):
        raise ValueError(f"TF_CONFIG must be a JSON object, not {type(config).__name__}")
    return config


def _tf_config_task(spec: ClusterSpec, task: object) -> tuple[str | None, int | None]:
    """The type and index in ``TF_CONFIG``'s ``"task"``, checked against the cluster."""
    if task is None:
        return None, None
    if not isinstance(task, Mapping):
        raise ValueError(f"TF_CONFIG 'task' must be an object, not {type(task).__name__}")
    task_type = task.get("type")
    raw_index = task.get("index")
    if task_type is not None and not isinstance(task_type, str):
        raise ValueError(f"TF_CONFIG task type must be a string, not {task_type!r}")
    task_index = None if raw_index is None else _tf_config_task_index(raw_index)
    if task_type is None:
        if task_index is not None:
            raise ValueError("TF_CONFIG 'task' has an index but no type")
        return None, None
    if task_type not in spec.jobs:
        # TensorFlow's convention (multi_worker_util): the evaluator runs beside the cluster.
        if task_type == "evaluator":
            return task_type, task_index
        raise ValueError(
            f"TF_CONFIG task type {task_type!r} not found in the cluster, "
            f"whose jobs are {spec.jobs}"
        )
    if task_index is not None and task_index not in spec.task_indices(task_type):
        raise ValueError(
            f"TF_CONFIG task index {task_index} is not a task of job {task_type!r}, "
            f"whose task indices are {spec.task_indices(task_type)}"
        )
    return task_type, task_index
