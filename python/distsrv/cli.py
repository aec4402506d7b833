"""The ``distsrv`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distsrv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a local cluster doing real work (the main job)")
    demo.add_argument("-n", "--workers", type=int, default=3, help="worker processes (default 3)")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")

    serve = commands.add_parser("serve", help="run one task until interrupted")
    serve.add_argument(
        "--cluster", help="a JSON file of job -> addresses (default: the TF_CONFIG variable)"
    )
    serve.add_argument("--job", help="this task's job (default: from TF_CONFIG)")
    serve.add_argument("--task", type=int, help="this task's index (default: from TF_CONFIG)")

    commands.add_parser("demo-worker", help=argparse.SUPPRESS)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from distsrv.launch import run_local_cluster

        if args.workers < 1:
            parser.error("--workers must be at least 1")
        command = [sys.executable, "-m", "distsrv", "demo-worker"]
        return run_local_cluster({"worker": args.workers}, command, timeout=args.timeout)
    if args.command == "demo-worker":
        from distsrv import demo as demo_module

        return demo_module.worker()
    if args.command == "serve":
        return _serve(args)
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace) -> int:
    from distsrv import ClusterSpec, Server

    if args.cluster:
        with open(args.cluster) as file:
            spec = ClusterSpec(json.load(file))
        job, index = args.job, args.task
    else:
        spec, job, index = ClusterSpec.from_tf_config()
        job = args.job or job
        index = args.task if args.task is not None else index
    server = Server(spec, job_name=job, task_index=index)
    print(f"distsrv: serving {server.task} at {server.target}", flush=True)
    try:
        server.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
