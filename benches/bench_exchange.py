"""distsrv's tensor exchange beside its peers, in one run, two processes on 127.0.0.1.

Every peer does the same thing per iteration: the sender moves a float32 tensor of the given
size into the receiver's memory and learns that it arrived; the time is taken at the sender
from the start of the transfer to that acknowledgement. Raw TCP, grpcio and gloo acknowledge
with a 1-byte reply once the receiver holds the tensor; distsrv's send() itself returns only
once the receiving process holds the whole tensor (in the buffer its recv() hands to numpy
without copying), so it needs no extra reply. The receiver takes every tensor with recv(); a
final, untimed exchange checks that it kept up. Peers: distsrv, raw TCP
sockets (sendall / recv_into), a stock Python grpcio server and client streaming 1 MiB chunks,
and torch.distributed's gloo send/recv when torch is installed. distsrv runs twice: as tasks of
one host use it (through shared memory), and with `shared_memory=False` (loopback gRPC); memcpy
within one process is printed for reference.

    python benches/bench_exchange.py            # all sizes, all peers
    python benches/bench_exchange.py --quick    # 4 KiB and 1 MiB, few repetitions
    python benches/bench_exchange.py --rounds 3 # peers taken in turn three times, samples pooled

Refuses a debug build of distsrv unless --allow-debug is given.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import distsrv
from distsrv import _native
from distsrv.launch import free_ports

HOST = "127.0.0.1"
KiB, MiB = 1 << 10, 1 << 20
SIZES = [4 * KiB, 1 * MiB, 64 * MiB, 256 * MiB]
QUICK_SIZES = [4 * KiB, 1 * MiB]
CHUNK = 1 * MiB


def repetitions(size: int, quick: bool, once: bool = False) -> tuple[int, int]:
    """(warm-up, measured) repetitions for a tensor of ``size`` bytes."""
    if once:
        return (0, 1)
    if size <= 64 * KiB:
        return (50, 300) if quick else (200, 2000)
    if size <= 4 * MiB:
        return (5, 30) if quick else (20, 200)
    if size <= 64 * MiB:
        return (3, 15)
    return (3, 8)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that across
    exec from the parent, hiding a child's own peak; VmHWM starts afresh with each program."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- the peers: a sender (here) and a receiver (in a child process) each --------------------------


class Distsrv:
    """distsrv as two tasks of one host use it: tensors through shared memory."""

    name = "distsrv shm"
    shared_memory = True

    def __init__(self, ports: list[int], rank: int) -> None:
        spec = distsrv.ClusterSpec({"bench": [f"{HOST}:{p}" for p in ports]})
        config = distsrv.ServerConfig(shared_memory=self.shared_memory)
        self.server = distsrv.Server(spec, "bench", rank, config=config, security=self.security())
        self.other = ("bench", 1 - rank)

    def security(self) -> distsrv.Security | None:
        return None

    def send(self, array: np.ndarray) -> None:
        self.server.send("t", array, to=self.other)

    def receive(self, size: int) -> np.ndarray:
        return self.server.recv("t", source=self.other)

    def close(self) -> None:
        # Neither side stops before the other has taken everything.
        self.server.send("done", np.zeros(1, np.uint8), to=self.other)
        self.server.recv("done", source=self.other)
        self.server.stop()


class DistsrvGrpc(Distsrv):
    """distsrv with the same-host fast path off: every tensor over loopback gRPC."""

    name = "distsrv gRPC"
    shared_memory = False


class DistsrvTls(DistsrvGrpc):
    """distsrv over loopback gRPC with TLS (rustls) and the cluster token, both ends made by
    `Security.temporary()` in the sender and handed to the receiver through its environment."""

    name = "distsrv TLS"

    def security(self) -> distsrv.Security | None:
        return distsrv.Security.from_env()


class Memcpy:
    """The ceiling, for reference: one copy of the tensor into a warm buffer of this process."""

    name = "memcpy"

    def __init__(self, ports: list[int], rank: int) -> None:
        self.target: np.ndarray | None = None

    def send(self, array: np.ndarray) -> None:
        if self.target is None or self.target.shape != array.shape:
            self.target = np.empty_like(array)
            np.copyto(self.target, array)
        np.copyto(self.target, array)

    def receive(self, size: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RawTcp:
    name = "raw TCP"

    def __init__(self, ports: list[int], rank: int) -> None:
        if rank == 1:
            listener = socket.create_server((HOST, ports[0]))
            self.sock, _ = listener.accept()
            listener.close()
        else:
            self.sock = _connect(ports[0])
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, array: np.ndarray) -> None:
        self.sock.sendall(memoryview(array).cast("B"))
        self.sock.recv(1)

    def receive(self, size: int) -> np.ndarray:
        array = np.empty(size // 4, np.float32)
        view, got = memoryview(array).cast("B"), 0
        while got < size:
            got += self.sock.recv_into(view[got:])
        self.sock.sendall(b"k")
        return array

    def close(self) -> None:
        self.sock.close()


class Grpcio:
    """A stock Python grpcio server and client: client-streaming 1 MiB chunks, an ack reply."""

    name = "Python grpcio"
    method = "/bench.Bench/Push"

    def __init__(self, ports: list[int], rank: int) -> None:
        import queue
        from concurrent import futures

        import grpc

        options = [("grpc.max_receive_message_length", 8 * MiB)]
        if rank == 1:
            self.arrived: queue.Queue[np.ndarray] = queue.Queue()
            self.acks: queue.Queue[None] = queue.Queue()
            handler = grpc.method_handlers_generic_handler(
                "bench.Bench",
                {"Push": grpc.stream_unary_rpc_method_handler(self._push)},
            )
            self.server = grpc.server(futures.ThreadPoolExecutor(4), options=options)
            self.server.add_generic_rpc_handlers((handler,))
            self.server.add_insecure_port(f"{HOST}:{ports[0]}")
            self.server.start()
        else:
            self.channel = grpc.insecure_channel(f"{HOST}:{ports[0]}", options=options)
            grpc.channel_ready_future(self.channel).result(timeout=30)
            self.push = self.channel.stream_unary(self.method)

    def _push(self, chunks: Any, context: Any) -> bytes:
        parts = [np.frombuffer(chunk, np.uint8) for chunk in chunks]
        self.arrived.put(np.concatenate(parts).view(np.float32) if parts else np.empty(0))
        return b"k"

    def send(self, array: np.ndarray) -> None:
        data = memoryview(array).cast("B")
        self.push(bytes(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK))

    def receive(self, size: int) -> np.ndarray:
        return self.arrived.get(timeout=120)

    def close(self) -> None:
        if hasattr(self, "server"):
            self.server.stop(0)
        else:
            self.channel.close()


class Gloo:
    name = "torch gloo"

    def __init__(self, ports: list[int], rank: int) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        dist.init_process_group(
            "gloo", init_method=f"tcp://{HOST}:{ports[0]}", rank=rank, world_size=2
        )
        self.ack = torch.zeros(1, dtype=torch.uint8)

    def send(self, array: np.ndarray) -> None:
        self.dist.send(self.torch.from_numpy(array), dst=1)
        self.dist.recv(self.ack, src=1)

    def receive(self, size: int) -> np.ndarray:
        tensor = self.torch.empty(size // 4, dtype=self.torch.float32)
        self.dist.recv(tensor, src=0)
        self.dist.send(self.ack, dst=0)
        return tensor.numpy()

    def close(self) -> None:
        self.dist.destroy_process_group()


PEERS: dict[str, Callable[[list[int], int], Any]] = {
    "distsrv": Distsrv,
    "distsrv-grpc": DistsrvGrpc,
    "distsrv-tls": DistsrvTls,
    "memcpy": Memcpy,
    "tcp": RawTcp,
    "grpcio": Grpcio,
    "gloo": Gloo,
}


def _connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 30
    while True:
        try:
            return socket.create_connection((HOST, port))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# -- the two processes ----------------------------------------------------------------------------


def receiver(peer: str, ports: list[int], sizes: list[int], quick: bool, once: bool) -> None:
    """The child: receives every tensor the sender sends, checks one value, reports memory."""
    # Taken before the transport exists: a sender may push a tensor before the first receive.
    before = peak_rss_bytes()
    transport = PEERS[peer](ports, 1)
    report: dict[str, int] = {}
    for size in sizes:
        warm, measured = repetitions(size, quick, once)
        for _ in range(warm + measured):
            array = transport.receive(size)
        if array.size and array[-1] != size // 4 - 1:
            raise SystemExit(f"{peer}: corrupt tensor of {size} bytes")
        del array
        report[str(size)] = peak_rss_bytes() - before
        before = peak_rss_bytes()
    transport.close()
    print(json.dumps(report), flush=True)


# Security made for a TLS run, kept alive (its files with it) for the rest of the benchmark.
_TEMPORARY: list[distsrv.Security] = []


def sender(peer: str, sizes: list[int], quick: bool) -> dict[int, list[float]] | str:
    """Runs ``peer`` against a receiver child; per size, the seconds of each measured transfer."""
    ports = free_ports(2)
    if peer == "memcpy":
        return _timed(Memcpy(ports, 0), sizes, quick)
    if peer == "distsrv-tls":
        _TEMPORARY.append(distsrv.Security.temporary())
        os.environ.update(_TEMPORARY[-1].env())
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--receiver",
            peer,
            "--ports",
            *map(str, ports),
            "--sizes",
            *map(str, sizes),
            *(["--quick"] if quick else []),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        transport = PEERS[peer](ports, 0)
    except ImportError as missing:
        child.kill()
        child.wait()
        return f"skipped ({missing.name} is not installed)"
    times = _timed(transport, sizes, quick)
    out, _ = child.communicate(timeout=120)
    if child.returncode != 0:
        raise SystemExit(f"{peer}: the receiver failed with status {child.returncode}")
    memory = json.loads(out.strip().splitlines()[-1])
    times["receiver_peak_extra"] = memory  # type: ignore[index]
    return times


def _timed(transport: Any, sizes: list[int], quick: bool) -> dict[int, list[float]]:
    """Per size, the seconds of each measured send, after the warm-up ones; closes `transport`."""
    times: dict[int, list[float]] = {}
    for size in sizes:
        array = np.arange(size // 4, dtype=np.float32)
        warm, measured = repetitions(size, quick)
        for _ in range(warm):
            transport.send(array)
        samples = []
        for _ in range(measured):
            began = time.perf_counter()
            transport.send(array)
            samples.append(time.perf_counter() - began)
        times[size] = samples
    transport.close()
    return times


def memory_of_distsrv(size: int) -> tuple[int, int]:
    """Peak extra memory (bytes) in each process during one ``size`` transfer, both in fresh
    processes so earlier sizes do not hide it: (sender beyond its own array, receiver)."""
    ports = free_ports(2)
    command = [sys.executable, __file__, "--ports", *map(str, ports), "--sizes", str(size)]
    receiving = subprocess.Popen(
        [*command, "--receiver", "distsrv", "--once"], stdout=subprocess.PIPE, text=True
    )
    sending = subprocess.run(
        [*command, "--memory-sender"], capture_output=True, text=True, timeout=120, check=True
    )
    out, _ = receiving.communicate(timeout=120)
    return int(sending.stdout.strip()), json.loads(out.strip().splitlines()[-1])[str(size)]


def memory_sender(ports: list[int], size: int) -> None:
    transport = Distsrv(ports, 0)
    array = np.arange(size // 4, dtype=np.float32)
    before = peak_rss_bytes()
    transport.send(array)
    extra = peak_rss_bytes() - before
    transport.close()
    print(extra, flush=True)


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each peer's samples of every round together, per size (a skipped peer stays skipped)."""
    merged: dict[str, Any] = {}
    for results in rounds:
        for peer, result in results.items():
            if isinstance(result, str) or isinstance(merged.get(peer), str):
                merged[peer] = result
                continue
            into = merged.setdefault(peer, {})
            for size, samples in result.items():
                if isinstance(samples, list):
                    into.setdefault(size, []).extend(samples)
                else:
                    into[size] = samples
    return merged


def human(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--allow-debug", action="store_true", help="time a debug build anyway")
    parser.add_argument("--receiver", help=argparse.SUPPRESS)
    parser.add_argument("--ports", nargs="+", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", type=int, help="tensor sizes in bytes")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the peers in turn this many times and pool their samples, so that a slow "
        "spell of a shared machine falls on every peer alike",
    )
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-sender", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_sender:
        memory_sender(args.ports, args.sizes[0])
        return
    if args.receiver:
        receiver(args.receiver, args.ports, args.sizes, args.quick, args.once)
        return
    if _native.BUILD_PROFILE != "release" and not args.allow_debug:
        raise SystemExit("distsrv is a debug build: run `make develop-release` (or --allow-debug)")

    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    print(
        f"distsrv {distsrv.__version__} ({_native.BUILD_PROFILE}), {os.cpu_count()} CPUs, "
        f"float32 tensors, transfer + 1-byte ack, two processes on {HOST}"
    )
    results = pooled(
        [{peer: sender(peer, sizes, args.quick) for peer in args.peers} for _ in range(args.rounds)]
    )
    ours = results.get("distsrv")
    for peer, result in results.items():
        if isinstance(result, str):
            print(f"{PEERS[peer].name}: {result}")
    header = f"{'size':>8} {'peer':>14} {'median':>10} {'p99':>10} {'GB/s':>7} {'distsrv is':>12}"
    print(header)
    print("-" * len(header))
    for size in sizes:
        for peer, result in results.items():
            if isinstance(result, str):
                continue
            samples = result[size]
            median = statistics.median(samples)
            p99 = sorted(samples)[min(len(samples) - 1, int(len(samples) * 0.99))]
            ratio = ""
            if peer != "distsrv" and isinstance(ours, dict):
                theirs_speed = size / median
                ours_speed = size / statistics.median(ours[size])
                ratio = f"{ours_speed / theirs_speed:.2f}x"
            print(
                f"{human(size):>8} {PEERS[peer].name:>14} {median * 1e6:>8.0f}µs "
                f"{p99 * 1e6:>8.0f}µs {size / median / 1e9:>7.2f} {ratio:>12}"
            )
    if 256 * MiB in sizes and "distsrv" in args.peers:
        size = 256 * MiB
        sender_extra, receiver_extra = memory_of_distsrv(size)
        print(
            f"peak extra memory, one {human(size)} transfer: sender {sender_extra / size:.2f}x, "
            f"receiver {receiver_extra / size:.2f}x the tensor"
        )


if __name__ == "__main__":
    main()
