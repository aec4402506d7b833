"""The ``distsrv`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from distsrv import __version__
from distsrv.examples.demo import add_training_arguments, worker_arguments
from distsrv.examples.demo import worker as demo_worker_main
from distsrv.launch import launch as launch_tasks
from distsrv.launch import parse_jobs
from distsrv.security import TOKEN_ENV, Security

if TYPE_CHECKING:
    from distsrv.cluster import ClusterSpec
    from distsrv.server import Server

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="distsrv",
        description="An in-process server for distributed training: run the demo, launch a "
        "local cluster, serve one task, or ask running tasks how they are.",
    )
    parser.add_argument("--version", action="version", version=f"distsrv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small model data-parallel on a local cluster (the main job)",
        description="Trains an MLP on handwritten digits with N worker processes on 127.0.0.1, "
        "all-reducing the gradients each step (or pushing them to a parameter server with --ps), "
        "and compares the result with the same training in a single process; with --framework "
        "torch, a CNN under PyTorch's DistributedDataParallel over distsrv and over gloo.",
    )
    demo.add_argument("-n", "--workers", type=int, default=3, help="worker processes (default 3)")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    add_training_arguments(demo)

    serve = commands.add_parser(
        "serve",
        help="run one task until SIGTERM or Ctrl-C, then stop gracefully",
        description="Serves one task until SIGTERM or Ctrl-C, then stops it gracefully and exits "
        "0; bad configuration exits 2.",
    )
    serve.add_argument(
        "--cluster",
        help="a JSON file of job -> addresses, with --job and --task (default: the TF_CONFIG "
        "variable)",
    )
    serve.add_argument("--job", help="this task's job (default: from TF_CONFIG)")
    serve.add_argument("--task", type=int, help="this task's index (default: from TF_CONFIG)")
    serve.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="serve the operations of MODULE.ATTR, a dict of name -> callable or a function "
        "returning one (repeatable)",
    )
    _add_token_argument(serve)

    status = commands.add_parser(
        "status", help="show the health and devices of running tasks (distsrv or TensorFlow)"
    )
    status.add_argument("addresses", nargs="+", metavar="ADDRESS", help="host:port of a task")
    status.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for each task (default 5)"
    )
    _add_token_argument(status)

    launch = commands.add_parser(
        "launch",
        help="run a command once per task of a local cluster, as torchrun does",
        description="Runs COMMAND once per task, each with its cluster in TF_CONFIG "
        "(distsrv.ClusterSpec.from_tf_config() reads it), its output prefixed with its task. "
        "The first task to fail is named and the others stopped; SIGINT and SIGTERM are passed "
        "on to every task. Exits 0 when every task exits 0.",
    )
    launch.add_argument(
        "--jobs", required=True, metavar="JOB=N,...", help="the cluster's jobs: worker=4,ps=1"
    )
    launch.add_argument("--host", default="127.0.0.1", help="the tasks' host (default 127.0.0.1)")
    launch.add_argument("--timeout", type=float, help="seconds before giving up (default none)")
    launch.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="restart a failed task up to K times on the same address (default 0)",
    )
    launch.add_argument(
        "--security",
        choices=["temporary"],
        help="give the tasks a fresh CA, certificates and token (DISTSRV_TOKEN, DISTSRV_TLS_*)",
    )
    launch.add_argument("--log-dir", help="also write each task's output to DIR/JOB-INDEX.log")
    launch.add_argument(
        "--threads-per-task",
        type=int,
        metavar="N",
        help="BLAS and OpenMP threads of each task (default: its share of the cores, unless "
        "OMP_NUM_THREADS and the like are set)",
    )
    launch.add_argument(
        "task_command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="what each task runs"
    )

    # Listed nowhere (no help): what `distsrv demo` runs in each task.
    demo_worker = commands.add_parser("demo-worker")
    add_training_arguments(demo_worker)
    demo_worker.add_argument(
        "--slurm-port", type=int, default=8888, help="under Slurm, the first task's port on a node"
    )

    args = parser.parse_args(argv)
    if args.command == "launch":
        return _launch(launch, args)
    if args.command == "demo":
        if args.workers < 1:
            parser.error("--workers must be at least 1")
        if args.epochs < 1 or args.batch_size < 1 or args.hidden < 1:
            parser.error("--epochs, --batch-size and --hidden must be at least 1")
        if args.crash_worker is not None and not 0 <= args.crash_worker < args.workers:
            parser.error(f"--crash-worker must name a worker, 0 to {args.workers - 1}")
        if args.framework == "torch" and (args.ps or args.crash_worker is not None):
            parser.error("--ps and --crash-worker are for the numpy model")
        jobs = {"ps": 1, "worker": args.workers} if args.ps else {"worker": args.workers}
        command = [sys.executable, "-m", "distsrv", "demo-worker", *worker_arguments(args)]
        return launch_tasks(command, jobs, timeout=args.timeout, security="temporary")
    if args.command == "demo-worker":
        if args.framework == "torch":
            # torch takes a second to import: only its workers pay for it.
            from distsrv.examples import torch_demo

            return torch_demo.worker(args)
        return demo_worker_main(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "status":
        return _status(args.addresses, args.timeout, _security(args))
    raise AssertionError(args.command)


def _launch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    command = args.task_command
    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        parser.error("launch needs a command after --")
    try:
        jobs = parse_jobs(args.jobs)
    except ValueError as error:
        parser.error(f"--jobs: {error}")
    if args.max_restarts < 0:
        parser.error("--max-restarts must be at least 0")
    if args.threads_per_task is not None and args.threads_per_task < 1:
        parser.error("--threads-per-task must be at least 1")
    return launch_tasks(
        command,
        jobs,
        host=args.host,
        timeout=args.timeout,
        max_restarts=args.max_restarts,
        security=args.security,
        log_dir=args.log_dir,
        threads=args.threads_per_task,
    )


def _add_token_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file",
        help="a file holding the cluster's token (default: $DISTSRV_TOKEN and $DISTSRV_TLS_*)",
    )


def _security(args: argparse.Namespace) -> Security | None:
    if args.token_file:
        return Security(token_file=args.token_file)
    return Security.from_env()


class _BadConfig(Exception):
    """What is wrong with ``distsrv serve``'s configuration: one line on stderr, exit status 2."""


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``join()`` ends as it does on Ctrl-C; not an
    ``Exception``, for the same reason ``KeyboardInterrupt`` is not."""


def _raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Terminated


def _serve(args: argparse.Namespace) -> int:
    try:
        server = _configured_server(args)
    except _BadConfig as problem:
        print(f"distsrv serve: {problem}", file=sys.stderr)
        return 2
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
        print(f"distsrv: serving {server.task} at {server.target}", flush=True)
        server.join()
    except KeyboardInterrupt:
        stopped_by = "SIGINT"
    except _Terminated:
        stopped_by = "SIGTERM"
    else:
        # Nothing here stops the server, so join() returning means serving failed.
        print(f"distsrv serve: {server.task} stopped serving ({server.status})", file=sys.stderr)
        server.stop()
        return 1
    # stop() cannot be interrupted: a second signal would only turn a clean exit into a traceback.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"distsrv: stopping {server.task} ({stopped_by})", flush=True)
    server.stop()
    return 0


def _configured_server(args: argparse.Namespace) -> Server:
    """The started server that ``args`` describe; raises _BadConfig naming what is wrong."""
    from distsrv.errors import OpError
    from distsrv.server import Server

    handlers = _load_handlers(args.handlers)
    spec, job, index = _cluster_and_task(args)
    try:
        return Server(
            spec, job_name=job, task_index=index, handlers=handlers, security=_security(args)
        )
    except (OpError, ValueError, TypeError) as error:
        # A job or task outside the cluster, an ambiguous task, a port in use, bad security.
        raise _BadConfig(str(error)) from None


def _cluster_and_task(args: argparse.Namespace) -> tuple[ClusterSpec, str | None, int | None]:
    """The cluster and this task's job and index, from --cluster or from TF_CONFIG."""
    from distsrv.cluster import ClusterSpec

    if args.cluster is None:
        if "TF_CONFIG" not in os.environ:
            raise _BadConfig("no cluster: pass --cluster FILE --job JOB --task N, or set TF_CONFIG")
        try:
            spec, job, index = ClusterSpec.from_tf_config()
        except ValueError as error:
            raise _BadConfig(str(error)) from None
        # The flags override TF_CONFIG's task.
        job = job if args.job is None else args.job
        index = index if args.task is None else args.task
        return spec, job, index
    missing = [
        flag for flag, value in (("--job", args.job), ("--task", args.task)) if value is None
    ]
    if missing:
        raise _BadConfig(f"--cluster needs {' and '.join(missing)}")
    try:
        with open(args.cluster) as file:
            cluster = json.load(file)
    except OSError as error:
        raise _BadConfig(f"cannot read --cluster {args.cluster}: {error.strerror}") from None
    except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for a binary file
        raise _BadConfig(f"--cluster {args.cluster} is not JSON: {error}") from None
    try:
        return ClusterSpec(cluster), args.job, args.task
    except (TypeError, ValueError) as error:
        raise _BadConfig(
            f"--cluster {args.cluster} is not a valid job -> addresses mapping: {error}"
        ) from None


def _load_handlers(specs: list[str]) -> dict[str, Callable[..., Any]]:
    """The operations named by --handlers MODULE:ATTR, merged; the same name twice is refused,
    since which one would serve it depends on the order of the flags."""
    handlers: dict[str, Callable[..., Any]] = {}
    for spec in specs:
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise _BadConfig(f"--handlers {spec!r} is not MODULE:ATTR")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise _BadConfig(f"--handlers {spec}: {error}") from None
        if not hasattr(module, attribute):
            raise _BadConfig(f"--handlers {spec}: {module_name} has no {attribute!r}")
        table = getattr(module, attribute)
        if callable(table):
            table = table()
        if not isinstance(table, Mapping) or not all(
            isinstance(name, str) and callable(handler) for name, handler in table.items()
        ):
            raise _BadConfig(
                f"--handlers {spec}: not a dict of operation name -> callable, nor a function "
                "returning one"
            )
        if repeated := handlers.keys() & table.keys():
            raise _BadConfig(f"--handlers {spec}: {sorted(repeated)} given twice")
        handlers.update(table)
    return handlers


def _status(addresses: list[str], timeout: float, security: Security | None) -> int:
    """Prints one row per device of each task; non-zero if any task did not answer."""
    from concurrent.futures import ThreadPoolExecutor

    from distsrv import _native
    from distsrv.devices import DeviceAttributes
    from distsrv.errors import OpError, UnauthenticatedError

    def query(address: str) -> tuple[str, Any]:
        try:
            return address, _native.query_status(address, timeout, security)
        except OpError as error:
            return address, error

    # Every task is asked at once: one that does not answer costs the timeout only once.
    with ThreadPoolExecutor(max_workers=min(len(addresses), 32)) as pool:
        answers = list(pool.map(query, addresses))
    rows = [("ADDRESS", "TASK", "HEALTH", "SERVER", "DEVICE", "MEMORY", "DESCRIPTION")]
    failures = []
    for address, answer in answers:
        if isinstance(answer, UnauthenticatedError):
            rows.append((address, "-", "UNAUTHENTICATED", "-", "-", "-", ""))
            failures.append(
                f"distsrv: {address} requires the cluster's token: pass --token-file or set "
                f"{TOKEN_ENV}" + (" (the one given was refused)" if security else "")
            )
            continue
        if isinstance(answer, OpError):
            rows.append((address, "-", "UNREACHABLE", "-", "-", "-", ""))
            failures.append(f"distsrv: {address}: {answer}")
            continue
        health, task, _, version, records = answer
        server = f"distsrv {version}" if version is not None else "tensorflow"
        # A server without the gRPC health service (TensorFlow's) is up if it answered.
        first = (address, task or "-", health or "SERVING", server)
        devices = [DeviceAttributes(*record) for record in records]
        for index, device in enumerate(devices):
            where = first if index == 0 else ("", "", "", "")
            short = device.name.rpartition("/device:")[2]
            rows.append((*where, short, _size(device.memory_limit), device.physical_device_desc))
        if not devices:
            rows.append((*first, "-", "-", ""))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


def _size(size: int) -> str:
    if size <= 0:
        return "-"
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
