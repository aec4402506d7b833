"""DistributedDataParallel's step time over distsrv beside gloo, in one run: the main job's torch
model (``distsrv demo --framework torch``: a small CNN on the digits), 2 and 4 worker processes
on 127.0.0.1. Every worker trains under DDP over distsrv's torch.distributed backend, then over
gloo, on the same global batches; worker 0 also trains in one process. A run's step time is
worker 0's training time over its steps (DDP's step ends with every worker's gradients in).

    python benches/bench_ddp.py                  # 2 and 4 workers, 10 epochs
    python benches/bench_ddp.py --quick          # 2 workers, 1 epoch

Refuses a debug build of distsrv unless --allow-debug is given.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from distsrv import _native

RUNS = ("DDP over distsrv", "DDP over gloo", "one process")


def step_times(workers: int, epochs: int) -> dict[str, float]:
    """Each run's milliseconds per step, as worker 0 of the demo prints them."""
    result = subprocess.run(
        [
            sys.executable,
            *("-m", "distsrv", "demo", "--framework", "torch"),
            *("--workers", str(workers), "--epochs", str(epochs)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"the demo failed:\n{result.stdout}{result.stderr}")
    found = dict(
        re.findall(r"\[worker:0\] (.+?): +test accuracy [\d.]+%, ([\d.]+) ms/step", result.stdout)
    )
    return {run: float(found[run]) for run in RUNS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 workers, 1 epoch")
    parser.add_argument("--allow-debug", action="store_true", help="time a debug build anyway")
    args = parser.parse_args()
    if _native.BUILD_PROFILE != "release" and not args.allow_debug:
        raise SystemExit("distsrv is a debug build: run `make develop-release` (or --allow-debug)")
    processes, epochs = ([2], 1) if args.quick else (args.processes, args.epochs)
    print(f"{'workers':>7}  {'run':<18} {'ms/step':>8}  {'vs gloo':>7}")
    for workers in processes:
        times = step_times(workers, epochs)
        for run in RUNS:
            ratio = times[run] / times["DDP over gloo"]
            print(f"{workers:>7}  {run:<18} {times[run]:>8.2f}  {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
