"""The main job's worker: each task starts its server, waits for the whole cluster and lists its
devices, greets every peer with a tensor, then the tasks pass an accumulating array around a ring
and check the total."""

from __future__ import annotations

import time

import numpy as np

from distsrv.cluster import ClusterSpec
from distsrv.server import Server

__all__ = ["worker"]


def worker() -> int:
    spec, job, index = ClusterSpec.from_tf_config()
    if job is None or index is None:
        raise SystemExit("TF_CONFIG must name this task (its 'task' key)")
    with Server(spec, job_name=job, task_index=index) as server:
        peers = [(job, i) for i in spec.task_indices(job)]
        size = len(peers)
        print(f"serving {server.task} at {server.target}", flush=True)

        # Every task answers (whatever order the processes started in), with its devices.
        started = time.perf_counter()
        incarnations = server.wait_for_cluster(timeout=60)
        devices = server.list_devices(timeout=30)
        print(
            f"cluster of {len(incarnations)} tasks up in {time.perf_counter() - started:.2f}s, "
            f"{len(devices)} devices: {', '.join(sorted({d.device_type for d in devices}))}",
            flush=True,
        )

        # Greetings: every task sends its index to every other one.
        started = time.perf_counter()
        for peer in peers:
            if peer != (job, index):
                server.send("hello", np.array([index, server.port]), to=peer)
        for peer in peers:
            if peer != (job, index):
                greeting = server.recv("hello", source=peer, timeout=60)
                assert greeting[0] == peer[1]
        print(f"found {size - 1} peers in {time.perf_counter() - started:.2f}s", flush=True)

        # A ring all-reduce by hand: each task adds its contribution and passes the sum on.
        contribution = np.full(1 << 18, float(index + 1), dtype=np.float32)  # 1 MiB
        left, right = peers[(index - 1) % size], peers[(index + 1) % size]
        started = time.perf_counter()
        if index == 0:
            total = contribution
            if size > 1:
                server.send("ring", total, to=right)
                total = server.recv("ring", source=left, timeout=60)
        else:
            total = server.recv("ring", source=left, timeout=60) + contribution
            server.send("ring", total, to=right)
        if size > 1:
            # Task 0 now holds the sum; it sends it round once more so every task has it.
            if index == 0:
                server.send("result", total, to=right)
            else:
                total = server.recv("result", source=left, timeout=60)
                if right != peers[0]:
                    server.send("result", total, to=right)
        expected = size * (size + 1) / 2
        ok = bool(np.all(total == expected))
        elapsed = time.perf_counter() - started
        print(
            f"ring sum of {total.nbytes >> 20} MiB = {total[0]:g} (expected {expected:g}): "
            f"{'ok' if ok else 'WRONG'} in {elapsed * 1e3:.1f} ms",
            flush=True,
        )
        # Nobody leaves before everyone has finished receiving.
        for peer in peers:
            if peer != (job, index):
                server.send("bye", np.zeros(()), to=peer)
        for peer in peers:
            if peer != (job, index):
                server.recv("bye", source=peer, timeout=60)
    return 0 if ok else 1
