"""``distsrv launch``: runs a command once per task of a local cluster, as torchrun does.

Each task's process gets its cluster in ``TF_CONFIG`` (as Kubeflow's TFJob writes it, which
:meth:`distsrv.ClusterSpec.from_tf_config` reads) and ``DISTSRV_TASK`` / ``DISTSRV_RESTART``
beside it; its output is prefixed with the task and optionally written to a file per task. The
first task to fail is named and the others stopped; SIGINT and SIGTERM are passed on to every
task, which get ``grace`` seconds to stop before they are killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Literal

from distsrv.security import Security

__all__ = ["free_ports", "launch", "parse_jobs", "threads_per_task"]

#: The variables that size the thread pools of BLAS and OpenMP; a task that finds them unset
#: gets its share of the cores, as torchrun sets OMP_NUM_THREADS.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free on ``host`` right now (held together, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def parse_jobs(text: str) -> dict[str, int]:
    """``"worker=4,ps=1"`` as ``{"worker": 4, "ps": 1}``; ValueError for anything else."""
    jobs: dict[str, int] = {}
    for part in text.split(","):
        name, equals, count = part.strip().partition("=")
        if not equals or not name or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{part!r} is not JOB=COUNT with a count of at least 1")
        if name in jobs:
            raise ValueError(f"job {name!r} is given twice")
        jobs[name] = int(count)
    return jobs


def threads_per_task(tasks: int) -> int:
    """Each task's share of the cores this process may use, at least one."""
    return max(1, len(os.sched_getaffinity(0)) // tasks)


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class _Task:
    job: str
    index: int
    environment: dict[str, str]
    #: Holds the task's temporary certificate files for as long as the task may need them.
    security: Security | None = None
    restarts: int = 0
    process: subprocess.Popen[str] | None = None
    streams: list[threading.Thread] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"/job:{self.job}/task:{self.index}"


def launch(
    command: Sequence[str],
    jobs: Mapping[str, int],
    *,
    host: str = "127.0.0.1",
    timeout: float | None = None,
    max_restarts: int = 0,
    security: Literal["temporary"] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    grace: float = 10.0,
) -> int:
    """Runs ``command`` once per task of ``jobs`` (job name -> task count) on ``host``, on free
    ports, until every task has exited; returns the exit status for the whole run: 0 when every
    task exited 0, 1 when one failed or ``timeout`` passed (the rest are then stopped), 128 plus
    the signal's number when SIGINT or SIGTERM stopped it.

    ``max_restarts`` lets each task be restarted that many times when it fails, on the same
    address, with ``DISTSRV_RESTART`` counting its restarts. ``security="temporary"`` gives the
    cluster a fresh CA and token and each task its own certificate (in ``DISTSRV_TOKEN`` and
    ``DISTSRV_TLS_*``, which :meth:`distsrv.Security.from_env` reads). ``log_dir`` writes each
    task's output to ``<job>-<index>.log`` there too. ``threads`` sets each task's BLAS and
    OpenMP threads where the environment does not (by default its share of the cores)."""
    if max_restarts < 0:
        raise ValueError("max_restarts must be at least 0")
    tasks = _tasks(jobs, host, security, threads)
    logs = Path(log_dir) if log_dir is not None else None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    threads_note = ", ".join(f"{name}={tasks[0].environment[name]}" for name in THREAD_VARIABLES)
    print(
        f"distsrv launch: {len(tasks)} tasks on {host} ({threads_note} each)",
        file=sys.stderr,
        flush=True,
    )
    exits: queue.Queue[tuple[_Task, int]] = queue.Queue()
    try:
        with _signals_raise_stopped():
            for task in tasks:
                _start(task, command, logs, exits)
            failure = _supervise(tasks, command, logs, exits, timeout, max_restarts)
    except _Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        print(f"distsrv launch: {name}: stopping every task", file=sys.stderr, flush=True)
        _stop(tasks, stopped.signum, grace)
        return 128 + stopped.signum
    _stop(tasks, signal.SIGTERM, grace)
    if failure is not None:
        print(f"distsrv launch: {failure}; stopped the other tasks", file=sys.stderr, flush=True)
        return 1
    return 0


@contextlib.contextmanager
def _signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` meanwhile (only the main thread may catch them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, handler) for signum in stops}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _signals_raise_stopped() -> contextlib.AbstractContextManager[None]:
    def stopped(signum: int, frame: FrameType | None) -> None:
        raise _Stopped(signum)

    return _signals(stopped)


def _tasks(
    jobs: Mapping[str, int], host: str, security: str | None, threads: int | None
) -> list[_Task]:
    if not jobs:
        raise ValueError("no tasks to launch")
    if security not in (None, "temporary"):
        raise ValueError(f"security must be None or 'temporary', not {security!r}")
    pairs = [(job, index) for job, count in jobs.items() for index in range(count)]
    names = [f"/job:{job}/task:{index}" for job, index in pairs]
    securities = Security.temporary_for_tasks(names, hosts=(host,)) if security else {}
    ports = iter(free_ports(len(pairs), host))
    at = f"[{host}]" if ":" in host else host
    cluster = {job: [f"{at}:{next(ports)}" for _ in range(count)] for job, count in jobs.items()}
    per_task = str(threads if threads is not None else threads_per_task(len(pairs)))
    tasks = []
    for (job, index), name in zip(pairs, names, strict=True):
        environment = dict.fromkeys(THREAD_VARIABLES, per_task)
        environment.update(os.environ)
        if threads is not None:
            environment.update(dict.fromkeys(THREAD_VARIABLES, per_task))
        if name in securities:
            environment.update(securities[name].env())
        environment.update(
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": job, "index": index}}),
            DISTSRV_TASK=name,
            PYTHONUNBUFFERED="1",
        )
        tasks.append(_Task(job, index, environment, securities.get(name)))
    return tasks


def _start(
    task: _Task,
    command: Sequence[str],
    logs: Path | None,
    exits: queue.Queue[tuple[_Task, int]],
) -> None:
    task.environment["DISTSRV_RESTART"] = str(task.restarts)
    # A session of its own: a Ctrl-C at the terminal reaches the launcher, which passes it on
    # once, rather than every task twice.
    process = subprocess.Popen(
        list(command),
        env=task.environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    task.process = process
    log = None if logs is None else (logs / f"{task.job}-{task.index}.log").open("a")
    stream = threading.Thread(
        target=_stream, args=(f"[{task.job}:{task.index}]", process, log), daemon=True
    )
    stream.start()
    task.streams.append(stream)
    waiter = threading.Thread(target=lambda: exits.put((task, process.wait())), daemon=True)
    waiter.start()


def _stream(prefix: str, process: subprocess.Popen[str], log: IO[str] | None) -> None:
    assert process.stdout is not None
    with contextlib.ExitStack() as stack:
        stack.enter_context(process.stdout)
        if log is not None:
            stack.enter_context(log)
        for line in process.stdout:
            sys.stdout.write(f"{prefix} {line}")
            sys.stdout.flush()
            if log is not None:
                log.write(line)
                log.flush()


def _supervise(
    tasks: list[_Task],
    command: Sequence[str],
    logs: Path | None,
    exits: queue.Queue[tuple[_Task, int]],
    timeout: float | None,
    max_restarts: int,
) -> str | None:
    """Waits for every task to exit 0, restarting those that fail while they may; what failed,
    if one did."""
    deadline = None if timeout is None else time.monotonic() + timeout
    running = len(tasks)
    while running:
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            task, code = exits.get(timeout=left)
        except queue.Empty:
            return f"the cluster did not finish within {timeout:g}s"
        if code == 0:
            running -= 1
            continue
        if task.restarts < max_restarts:
            task.restarts += 1
            print(
                f"distsrv launch: {task.name} exited with status {code}; restarting it "
                f"({task.restarts} of {max_restarts})",
                file=sys.stderr,
                flush=True,
            )
            _start(task, command, logs, exits)
            continue
        return f"{task.name} exited with status {code}"
    return None


def _stop(tasks: list[_Task], signum: int, grace: float) -> None:
    """Sends ``signum`` to every task still running, waits up to ``grace`` seconds for all of
    them (a second SIGINT or SIGTERM cuts it short), kills those left, and drains their
    output."""
    live = [task.process for task in tasks if task.process and task.process.poll() is None]

    def kill(process: subprocess.Popen[str]) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    for process in live:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    def kill_all(signum: int, frame: FrameType | None) -> None:
        for process in live:
            kill(process)

    deadline = time.monotonic() + grace
    with _signals(kill_all):
        for process in live:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill(process)
                process.wait()
    for stream in _streams(tasks):
        stream.join(timeout=5)


def _streams(tasks: list[_Task]) -> Iterator[threading.Thread]:
    for task in tasks:
        yield from task.streams
