"""distsrv's collectives beside their peers, in one run, 2 and 4 processes on 127.0.0.1.

Each peer runs the same cases in every process: all_reduce (sum) of float32 tensors of 4 KiB,
1 MiB and 64 MiB, an all_reduce of a single float32 (latency), a barrier, and a training step's
overlap: a 4 KiB all_reduce after a numpy matmul, then the same all_reduce started before the
matmul and waited on after it (distsrv's ``iall_reduce``, MPI's ``Iallreduce``, gloo's
``async_op=True``), with the matmul alone for the ideal, the larger of the two. Every process times
each repetition of a case after a warm-up; a case's figure is the slowest process's median (and
p99), since a collective is done only when its last member is. Algorithm bandwidth is the tensor's
bytes over that time, as nccl-tests define it: comparable across process counts and algorithms.

Peers:
- distsrv: ``Server.all_reduce`` / ``Server.barrier`` over gRPC on 127.0.0.1;
- MPI: mpi4py's ``Allreduce`` / ``Barrier`` over OpenMPI, started by ``mpirun``, once with its TCP
  transport on the loopback interface (the same wire as distsrv) and once with its defaults
  (shared memory between processes of one host, the HPC reference);
- torch.distributed's gloo backend, and torch.distributed on distsrv's backend
  (``distsrv.torch``: torch tensors, torch's calls), when torch is installed
  (``pip install '.[torch]'``).
A peer whose software is missing is skipped with a message.

    python benches/bench_collectives.py            # all sizes, 2 and 4 processes, all peers
    python benches/bench_collectives.py --quick    # 4 KiB and 1 MiB, 2 processes, few repetitions

Refuses a debug build of distsrv unless --allow-debug is given.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import distsrv
from distsrv import _native
from distsrv.launch import free_ports

HOST = "127.0.0.1"
KiB, MiB = 1 << 10, 1 << 20
SIZES = [4 * KiB, 1 * MiB, 64 * MiB]
QUICK_SIZES = [4 * KiB, 1 * MiB]
#: A case: ("all_reduce", bytes) or ("barrier", 0); one float32 is ("all_reduce", 4); a
#: training step's parts: ("matmul", 0) alone, ("step", bytes) with an all_reduce after it and
#: ("overlapped", bytes) with one started before it.
Case = tuple[str, int]
#: The side of the square float32 matrices a step multiplies: about as long as a 4 KiB
#: all_reduce on this kind of machine, on one BLAS thread (each process has one, as the
#: processes share the cores: OpenBLAS threads spinning after a matmul would starve the peer's
#: own threads).
MATMUL_SIDE = 256
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEP_BYTES = 4 * KiB
LABELS = {
    "barrier": "barrier",
    "matmul": "matmul alone",
    "step": "matmul, all_reduce",
    "overlapped": "matmul || all_reduce",
}


def cases(sizes: list[int]) -> list[Case]:
    steps = [("matmul", 0), ("step", STEP_BYTES), ("overlapped", STEP_BYTES)]
    return [("all_reduce", size) for size in sizes] + [("all_reduce", 4), ("barrier", 0), *steps]


def repetitions(size: int, quick: bool) -> tuple[int, int]:
    """(warm-up, measured) repetitions of a case moving ``size`` bytes."""
    if size <= 64 * KiB:
        return (20, 100) if quick else (100, 1000)
    if size <= 4 * MiB:
        return (5, 20) if quick else (10, 100)
    return (2, 10)


# -- the peers, one object per process ------------------------------------------------------------


class Distsrv:
    def __init__(self, rank: int | None, ports: list[int]) -> None:
        assert rank is not None
        self.rank, self.world = rank, len(ports)
        spec = distsrv.ClusterSpec({"bench": [f"{HOST}:{port}" for port in ports]})
        self.server = distsrv.Server(spec, "bench", rank)
        self.server.wait_for_cluster(timeout=60)

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        return self.server.all_reduce(array, op="sum")

    def start_all_reduce(self, array: np.ndarray) -> Callable[[], Any]:
        return self.server.iall_reduce(array, op="sum").wait

    def barrier(self) -> None:
        self.server.barrier()

    def close(self) -> None:
        # Nobody stops its server while another may still be finishing the last collective.
        self.server.barrier()
        self.server.stop()


class Mpi:
    """Ranks come from mpirun. The result goes to a buffer kept from call to call, as MPI
    programs do."""

    def __init__(self, rank: int | None, ports: list[int]) -> None:
        from mpi4py import MPI

        self.mpi, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.world = self.comm.Get_rank(), self.comm.Get_size()
        self.result = np.empty(0, np.float32)

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        if self.result.shape != array.shape:
            self.result = np.empty_like(array)
        self.comm.Allreduce(array, self.result, op=self.mpi.SUM)
        return self.result

    def start_all_reduce(self, array: np.ndarray) -> Callable[[], Any]:
        if self.result.shape != array.shape:
            self.result = np.empty_like(array)
        return self.comm.Iallreduce(array, self.result, op=self.mpi.SUM).Wait

    def barrier(self) -> None:
        self.comm.Barrier()

    def close(self) -> None:
        self.comm.Barrier()


class TorchDistributed:
    """torch.distributed's own calls on a backend: gloo, or distsrv's (``distsrv.torch``).
    Reduces in place, torch's form (the timed loop's sums overflow to inf: same speed)."""

    def __init__(self, backend: str, rank: int | None, ports: list[int]) -> None:
        import torch
        import torch.distributed as dist

        if backend == "distsrv":
            import distsrv.torch  # noqa: F401 (registers the backend)

        assert rank is not None
        self.rank, self.world = rank, len(ports)
        self.torch, self.dist = torch, dist
        dist.init_process_group(
            backend, init_method=f"tcp://{HOST}:{ports[0]}", rank=rank, world_size=len(ports)
        )

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        self.dist.all_reduce(self.torch.from_numpy(array))
        return array

    def start_all_reduce(self, array: np.ndarray) -> Callable[[], Any]:
        return self.dist.all_reduce(self.torch.from_numpy(array), async_op=True).wait

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        self.dist.destroy_process_group()


PEERS: dict[str, Callable[[int | None, list[int]], Any]] = {
    "distsrv": Distsrv,
    "mpi-tcp": Mpi,
    "mpi": Mpi,
    "gloo": functools.partial(TorchDistributed, "gloo"),
    "distsrv-torch": functools.partial(TorchDistributed, "distsrv"),
}
NAMES = {
    "distsrv": "distsrv",
    "mpi-tcp": "MPI (TCP lo)",
    "mpi": "MPI (shm)",
    "gloo": "torch gloo",
    "distsrv-torch": "torch on distsrv",
}
MPI_TRANSPORTS = {
    # OpenMPI's TCP byte transfer layer on loopback only, through ob1 (not UCX, which would pick
    # shared memory by itself).
    "mpi-tcp": [
        *("--mca", "pml", "ob1"),
        *("--mca", "btl", "self,tcp"),
        *("--mca", "btl_tcp_if_include", "lo"),
    ],
    "mpi": [],
}


def rank_main(
    peer: str,
    rank: int | None,
    ports: list[int],
    case_list: list[Case],
    quick: bool,
    out: pathlib.Path,
) -> None:
    """One process of a peer: runs every case, writes each repetition's seconds as JSON."""
    transport = PEERS[peer](rank, ports)
    matrix = np.ones((MATMUL_SIDE, MATMUL_SIDE), np.float32)
    results: dict[str, list[float]] = {}
    for op, size in case_list:
        warm, measured = repetitions(size, quick)
        array = np.ones(max(1, size // 4), dtype=np.float32)

        def step(array: np.ndarray = array) -> None:
            np.matmul(matrix, matrix)
            transport.all_reduce(array)

        def overlapped(array: np.ndarray = array) -> None:
            reduced = transport.start_all_reduce(array)
            np.matmul(matrix, matrix)
            reduced()

        run = {
            "barrier": transport.barrier,
            "all_reduce": functools.partial(transport.all_reduce, array),
            "matmul": functools.partial(np.matmul, matrix, matrix),
            "step": step,
            "overlapped": overlapped,
        }[op]
        for _ in range(warm):
            run()
        samples = []
        for _ in range(measured):
            began = time.perf_counter()
            run()
            samples.append(time.perf_counter() - began)
        if op == "all_reduce":
            # Every rank contributes rank + 1, so the sum is known.
            total = transport.all_reduce(np.full_like(array, transport.rank + 1))
            if (
                total.shape != array.shape
                or total[-1] != transport.world * (transport.world + 1) / 2
            ):
                raise SystemExit(f"{NAMES[peer]}: wrong all_reduce result for {size} bytes")
        results[f"{op}:{size}"] = samples
    transport.close()
    (out / f"rank{transport.rank}.json").write_text(json.dumps(results))


# -- the parent: one run per peer and process count -----------------------------------------------


def available(peer: str) -> str | None:
    """Why ``peer`` cannot run here, or None."""
    if peer in ("gloo", "distsrv-torch") and importlib.util.find_spec("torch") is None:
        return "torch is not installed: pip install '.[torch]'"
    if peer.startswith("mpi"):
        if importlib.util.find_spec("mpi4py") is None:
            return "mpi4py is not installed: pip install '.[bench-mpi]'"
        if shutil.which("mpirun") is None:
            return "mpirun is not on PATH: apt-get install openmpi-bin libopenmpi-dev"
    return None


def run_peer(
    peer: str, processes: int, case_list: list[Case], quick: bool
) -> dict[str, tuple[float, float]]:
    """Per case, the slowest process's median and p99 seconds, from a fresh set of processes."""
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder)
        ports = free_ports(processes)
        arguments = [
            __file__,
            "--rank-of",
            peer,
            "--ports",
            *map(str, ports),
            "--out",
            str(out),
            "--cases",
            json.dumps(case_list),
            *(["--quick"] if quick else []),
        ]
        if peer.startswith("mpi"):
            # Unbound, like the other peers' processes: more processes than cores share them.
            mpirun = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(processes)]
            mpirun += MPI_TRANSPORTS[peer]
            if os.geteuid() == 0:
                mpirun.append("--allow-run-as-root")
            commands = [[*mpirun, sys.executable, *arguments]]
        else:
            commands = [[sys.executable, *arguments, "--rank", str(r)] for r in range(processes)]
        environment = {**os.environ, **ONE_BLAS_THREAD}
        children = [subprocess.Popen(command, env=environment) for command in commands]
        try:
            for child in children:
                if child.wait(timeout=600) != 0:
                    raise SystemExit(f"{peer}: a process failed with status {child.returncode}")
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    summaries = {key: [summary(rank[key]) for rank in ranks] for key in ranks[0]}
    return {
        key: (max(m for m, _ in each), max(p for _, p in each)) for key, each in summaries.items()
    }


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def human(size: int) -> str:
    if size == 4:
        return "1 float"
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 processes, few reps")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--processes", nargs="+", type=int, help="process counts (default 2 4)")
    parser.add_argument("--sizes", nargs="+", type=int, help="all_reduce tensor sizes in bytes")
    parser.add_argument("--allow-debug", action="store_true", help="time a debug build anyway")
    parser.add_argument("--rank-of", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", nargs="+", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.rank_of:
        case_list = [tuple(case) for case in json.loads(args.cases)]
        rank_main(args.rank_of, args.rank, args.ports, case_list, args.quick, args.out)
        return
    if _native.BUILD_PROFILE != "release" and not args.allow_debug:
        raise SystemExit("distsrv is a debug build: run `make develop-release` (or --allow-debug)")

    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    counts = args.processes or ([2] if args.quick else [2, 4])
    case_list = cases(sizes)
    print(
        f"distsrv {distsrv.__version__} ({_native.BUILD_PROFILE}), {os.cpu_count()} CPUs, "
        f"float32 all_reduce (sum) and barrier on {HOST}; the slowest process's median and p99; "
        f"algorithm bandwidth = tensor bytes / median; steps: a {MATMUL_SIDE}² float32 matmul "
        f"and a {human(STEP_BYTES)} all_reduce"
    )
    peers = []
    for peer in args.peers:
        reason = available(peer)
        if reason is None:
            peers.append(peer)
        else:
            print(f"{NAMES[peer]}: skipped ({reason})")
    header = (
        f"{'procs':>5} {'case':>20} {'peer':>13} {'median':>10} {'p99':>10} {'GB/s':>7} "
        f"{'distsrv is':>11}"
    )
    for count in counts:
        results = {peer: run_peer(peer, count, case_list, args.quick) for peer in peers}
        print(header)
        print("-" * len(header))
        for op, size in case_list:
            key = f"{op}:{size}"
            label = LABELS.get(op, f"all_reduce {human(size)}")
            for peer, result in results.items():
                median, p99 = result[key]
                ratio = ""
                if peer != "distsrv" and "distsrv" in results:
                    # >1: distsrv is faster (more bandwidth, less latency) by that factor.
                    ratio = f"{median / results['distsrv'][key][0]:.2f}x"
                bandwidth = f"{size / median / 1e9:.3f}" if op == "all_reduce" else "-"
                print(
                    f"{count:>5} {label:>20} {NAMES[peer]:>13} {median * 1e6:>8.0f}µs "
                    f"{p99 * 1e6:>8.0f}µs {bandwidth:>7} {ratio:>11}"
                )


if __name__ == "__main__":
    main()
