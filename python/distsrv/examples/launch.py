"""Runs a local cluster: one process per task, output prefixed and streamed, all stopped if one
fails. Used by ``distsrv demo``."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from distsrv.security import Security

__all__ = ["free_ports", "run_local_cluster"]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free on ``host`` right now (held together, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def _stream(prefix: str, process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def run_local_cluster(
    jobs: dict[str, int],
    command: Sequence[str],
    timeout: float,
    host: str = "127.0.0.1",
    secure: bool = False,
) -> int:
    """Starts ``command`` once per task of ``jobs`` (job name -> task count) with the cluster in
    ``TF_CONFIG``, as Kubeflow's TFJob does; with ``secure``, each task's own temporary
    security (a shared token and CA, a certificate bound to the task) in ``DISTSRV_TOKEN`` and
    ``DISTSRV_TLS_*``. Returns 0 when every task exits 0; when one fails or the timeout passes,
    stops the rest and returns non-zero, naming the task."""
    tasks = [(job, index) for job, count in jobs.items() for index in range(count)]
    names = [f"/job:{job}/task:{index}" for job, index in tasks]
    securities = Security.temporary_for_tasks(names, hosts=(host,)) if secure else {}
    ports = iter(free_ports(len(tasks), host))
    cluster = {job: [f"{host}:{next(ports)}" for _ in range(count)] for job, count in jobs.items()}
    processes: dict[tuple[str, int], subprocess.Popen[str]] = {}
    streams = []
    for job, index in tasks:
        tf_config = json.dumps({"cluster": cluster, "task": {"type": job, "index": index}})
        process = subprocess.Popen(
            list(command),
            env={
                **_environ(),
                **(securities[f"/job:{job}/task:{index}"].env() if secure else {}),
                "TF_CONFIG": tf_config,
                "PYTHONUNBUFFERED": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        processes[(job, index)] = process
        stream = threading.Thread(target=_stream, args=(f"[{job}:{index}]", process), daemon=True)
        stream.start()
        streams.append(stream)
    # One waiter per process reports its exit as it happens, so the first task to fail is the one
    # named, not one that exited a moment later because it lost that task.
    exits: queue.Queue[tuple[tuple[str, int], int]] = queue.Queue()
    for task, process in processes.items():
        waiter = threading.Thread(target=lambda t=task, p=process: exits.put((t, p.wait())))
        waiter.daemon = True
        waiter.start()
    deadline = time.monotonic() + timeout
    failed: str | None = None
    try:
        for _ in processes:
            try:
                (job, index), code = exits.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                failed = f"the cluster did not finish within {timeout:.0f}s"
                break
            if code != 0:
                failed = f"/job:{job}/task:{index} exited with status {code}"
                break
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in streams:
            stream.join(timeout=5)
        for process in processes.values():
            if process.stdout is not None:
                process.stdout.close()
    if failed is not None:
        print(f"distsrv: {failed}; stopped the other tasks", file=sys.stderr)
        return 1
    return 0


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)
