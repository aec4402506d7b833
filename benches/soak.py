"""A soak: the main job's exchange pattern, for minutes, with flat memory and descriptors.

A local cluster of worker processes (each its own task, started like `distsrv demo` by the
launcher, under per-task certificates) repeats a training step for ``--seconds``: all-reduce of
a gradient the size of the demo's MLP, and every tenth step a 1 MiB activation sent to the next
worker and received from the previous one, a handler called on the next worker and a variable
on worker 0 updated. Each worker takes its resident memory and open descriptors once warmed up
(after a fifth of the time) and again at the end, prints both, and fails if descriptors grew by
more than ``FD_SLACK`` or memory by more than ``RSS_SLACK_MIB``.

    python benches/soak.py --seconds 180     # what `make soak` runs
    python benches/soak.py --seconds 15      # CI's short version (tests/test_bench_smoke.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import distsrv
from distsrv.launch import launch

#: The demo's 64-64-10 MLP has this many parameters: its gradient, all-reduced each step.
GRADIENT_FLOATS = 64 * 64 + 64 + 64 * 10 + 10
ACTIVATION_BYTES = 1 << 20
FD_SLACK = 4
RSS_SLACK_MIB = 32


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def worker(seconds: float) -> int:
    spec, job, index = distsrv.ClusterSpec.from_tf_config()
    count = spec.num_tasks(job)
    security = distsrv.Security.from_env()
    with distsrv.Server(spec, job, index, security=security) as server:
        server.add_handler("step", lambda step: step + 1)
        if index == 0:
            server.create_variable("steps", np.zeros(1, np.int64), on=server.task)
        server.barrier(timeout=60)
        counter = server.variable("steps", on=(job, 0))
        after, before = (job, (index + 1) % count), (job, (index - 1) % count)
        gradient = np.ones(GRADIENT_FLOATS + 1, np.float32)
        activation = np.full(ACTIVATION_BYTES // 4, index, np.float32)
        began = time.monotonic()
        warm = None
        step = 0
        while True:
            # The last element carries "stop" from worker 0, so every worker ends at one step.
            gradient[-1] = float(index == 0 and time.monotonic() - began > seconds)
            summed = server.all_reduce(gradient, timeout=60)
            if summed[-1]:
                break
            assert summed[0] == count, summed[0]
            if step % 10 == 0:
                server.send(f"activation-{step}", activation, to=after, timeout=60)
                received = server.recv(f"activation-{step}", source=before, timeout=60)
                assert received[0] == before[1], received[0]
                assert server.call(after, "step", step=step, timeout=60) == step + 1
                counter.assign_add(np.ones(1, np.int64), timeout=60)
            if warm is None and time.monotonic() - began > seconds / 5:
                warm = (resident_mib(), open_descriptors(), step)
            step += 1
        server.barrier(timeout=60)
        # Every worker's every update landed, none twice.
        assert int(counter.read(timeout=60)[0]) == count * len(range(0, step, 10))
        end = (resident_mib(), open_descriptors())
        # No worker stops its server while another still reads from it.
        server.barrier(timeout=60)
    assert warm is not None, "the soak ended before it warmed up"
    grew_mib, grew_fds = end[0] - warm[0], end[1] - warm[1]
    print(
        f"{step} steps ({step - warm[2]} after warm-up): resident {warm[0]:.1f} -> {end[0]:.1f} "
        f"MiB, descriptors {warm[1]} -> {end[1]}",
        flush=True,
    )
    if grew_fds > FD_SLACK or grew_mib > RSS_SLACK_MIB:
        print(f"grew past the slack ({FD_SLACK} descriptors, {RSS_SLACK_MIB} MiB)", flush=True)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.exit(worker(args.seconds))
    command = [sys.executable, __file__, "--worker", "--seconds", str(args.seconds)]
    status = launch(
        command, {"worker": args.workers}, timeout=args.seconds + 120, security="temporary"
    )
    sys.exit(status)


if __name__ == "__main__":
    main()
