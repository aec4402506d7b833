"""distsrv's remote operations beside their peers, in one run, two processes on 127.0.0.1.

Every peer does the same thing: a client calls a no-op operation (no arguments, None back) on a
server in another process and waits for the answer. Measured: the round trip of one call at a
time (median and 99th percentile), and calls per second from 1 and from 8 client threads.
Peers: distsrv (`Server.call` to a Python handler; by default through the same-host link, and
"distsrv gRPC" with it off, as calls between hosts go), a stock Python grpcio server and client (a
unary method on raw bytes, so no protobuf work at all), and dask.distributed's `Server` and
`rpc` when `distributed` is installed (`pip install '.[bench-dask]'`).

    python benches/bench_handlers.py            # all peers, full repetitions
    python benches/bench_handlers.py --quick    # few repetitions

Refuses a debug build of distsrv unless --allow-debug is given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import distsrv
from distsrv import _native
from distsrv.launch import free_ports

HOST = "127.0.0.1"
THREADS = 8
#: The argument of the array case: a float32 array this large, under every peer's message limit.
ARRAY_BYTES = 32 << 20


def noop() -> None:
    return None


def take(x: Any) -> None:
    """The array case's operation: takes an array and answers nothing."""
    return None


# -- the peers: a server (in a child process) and a client (here) each ---------------------------


class Distsrv:
    """distsrv as it runs by default: calls between tasks of one host take the same-host link."""

    name = "distsrv"
    shared_memory = True

    @classmethod
    def make(cls, ports: list[int], index: int, **handlers: Any) -> distsrv.Server:
        spec = distsrv.ClusterSpec({"bench": [f"{HOST}:{p}" for p in ports]})
        config = distsrv.ServerConfig(shared_memory=cls.shared_memory)
        return distsrv.Server(spec, "bench", index, config=config, handlers=handlers)

    @classmethod
    def serve(cls, ports: list[int]) -> Callable[[], None]:
        return cls.make(ports, 1, noop=noop, take=take).stop

    def __init__(self, ports: list[int]) -> None:
        self.server = self.make(ports, 0)
        self.server.wait_for_cluster(timeout=30)

    def caller(self) -> Callable[[], Any]:
        call, server = self.server.call, ("bench", 1)
        return lambda: call(server, "noop")

    def array_caller(self, array: Any) -> Callable[[], Any]:
        call, server = self.server.call, ("bench", 1)
        return lambda: call(server, "take", x=array)

    def close(self) -> None:
        self.server.stop()


class DistsrvGrpc(Distsrv):
    """distsrv with the same-host link off: every call over loopback gRPC, as between hosts."""

    name = "distsrv gRPC"
    shared_memory = False


class Grpcio:
    name = "Python grpcio"
    method = "/bench.Bench/Noop"

    @classmethod
    def serve(cls, ports: list[int]) -> Callable[[], None]:
        from concurrent import futures

        import grpc

        answer = grpc.unary_unary_rpc_method_handler(lambda request, _: b"")
        handler = grpc.method_handlers_generic_handler(
            "bench.Bench", {"Noop": answer, "Take": answer}
        )
        unlimited = [("grpc.max_receive_message_length", -1)]
        server = grpc.server(futures.ThreadPoolExecutor(THREADS), options=unlimited)
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"{HOST}:{ports[1]}")
        server.start()
        return lambda: server.stop(0)

    def __init__(self, ports: list[int]) -> None:
        import grpc

        self.channel = grpc.insecure_channel(f"{HOST}:{ports[1]}")
        grpc.channel_ready_future(self.channel).result(timeout=30)

    def caller(self) -> Callable[[], Any]:
        call = self.channel.unary_unary(self.method)
        return lambda: call(b"")

    def array_caller(self, array: Any) -> Callable[[], Any]:
        """The array's bytes as the request, as an application would serialize it."""
        call = self.channel.unary_unary("/bench.Bench/Take")
        return lambda: call(array.tobytes())

    def close(self) -> None:
        self.channel.close()


class Dask:
    """dask.distributed's Server with a handler, called through its ``rpc``. A client thread runs
    an event loop of its own, as a thread of a dask program would."""

    name = "dask"

    @classmethod
    def serve(cls, ports: list[int]) -> Callable[[], None]:
        from distributed.core import Server

        loop = asyncio.new_event_loop()
        server = Server({"noop": noop, "take": take})
        loop.run_until_complete(server.listen(f"tcp://{HOST}:{ports[1]}"))
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        def stop() -> None:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)

        return stop

    def __init__(self, ports: list[int]) -> None:
        from distributed.core import rpc

        self.rpc, self.address = rpc, f"tcp://{HOST}:{ports[1]}"
        self.remotes: list[tuple[asyncio.AbstractEventLoop, Any]] = []

    def caller(self) -> Callable[[], Any]:
        loop = asyncio.new_event_loop()
        remote = self.rpc(self.address)
        self.remotes.append((loop, remote))
        return lambda: loop.run_until_complete(remote.noop())

    def array_caller(self, array: Any) -> Callable[[], Any]:
        from distributed.protocol import to_serialize

        loop = asyncio.new_event_loop()
        remote = self.rpc(self.address)
        self.remotes.append((loop, remote))
        return lambda: loop.run_until_complete(remote.take(x=to_serialize(array)))

    def close(self) -> None:
        for loop, remote in self.remotes:
            loop.run_until_complete(remote.close_rpc())
            loop.close()


PEERS: dict[str, Any] = {
    "distsrv": Distsrv,
    "distsrv-grpc": DistsrvGrpc,
    "grpcio": Grpcio,
    "dask": Dask,
}


# -- measuring ------------------------------------------------------------------------------------


def latencies(call: Callable[[], Any], warm: int, measured: int) -> list[float]:
    for _ in range(warm):
        call()
    samples = []
    for _ in range(measured):
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)
    return samples


def rate(client: Any, threads: int, calls: int) -> float:
    """Calls per second, ``threads`` threads each making ``calls`` calls one after another."""
    callers = [client.caller() for _ in range(threads)]
    for call in callers:
        for _ in range(20):
            call()
    barrier = threading.Barrier(threads + 1)

    def work(call: Callable[[], Any]) -> None:
        barrier.wait()
        for _ in range(calls):
            call()

    workers = [threading.Thread(target=work, args=(call,)) for call in callers]
    for worker in workers:
        worker.start()
    barrier.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    return threads * calls / (time.perf_counter() - began)


def measure(peer: str, quick: bool) -> dict[str, float] | str:
    ports = free_ports(2)
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", peer, "--ports", *map(str, ports)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdin is not None
    try:
        ready = child.stdout.readline().strip()
        if ready != "ready":
            return f"skipped ({ready or 'its server did not start'})"
        client = PEERS[peer](ports)
        warm, measured, calls = (100, 500, 300) if quick else (1000, 10_000, 3000)
        samples = latencies(client.caller(), warm, measured)
        array = np.ones(ARRAY_BYTES // 4, np.float32)
        array_samples = latencies(client.array_caller(array), 2, 5 if quick else 20)
        result = {
            "array": statistics.median(array_samples),
            "p50": statistics.median(samples),
            "p99": sorted(samples)[int(len(samples) * 0.99)],
            "rate1": rate(client, 1, calls * 2),
            f"rate{THREADS}": rate(client, THREADS, calls),
        }
        client.close()
        return result
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def serve(peer: str, ports: list[int]) -> None:
    """The child: serves until its standard input closes."""
    try:
        stop = PEERS[peer].serve(ports)
    except ImportError as missing:
        print(f"{missing.name} is not installed", flush=True)
        return
    print("ready", flush=True)
    sys.stdin.read()
    stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--allow-debug", action="store_true", help="time a debug build anyway")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--ports", nargs="+", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve(args.serve, args.ports)
        return
    if _native.BUILD_PROFILE != "release" and not args.allow_debug:
        raise SystemExit("distsrv is a debug build: run `make develop-release` (or --allow-debug)")

    print(
        f"distsrv {distsrv.__version__} ({_native.BUILD_PROFILE}), {os.cpu_count()} CPUs, "
        f"a no-op remote call and one with a {ARRAY_BYTES >> 20} MiB array argument, client and "
        f"server in two processes on {HOST}"
    )
    results = {peer: measure(peer, args.quick) for peer in args.peers}
    for peer, result in results.items():
        if isinstance(result, str):
            print(f"{PEERS[peer].name}: {result}")
    ours = results.get("distsrv")
    header = (
        f"{'peer':>14} {'p50':>9} {'p99':>9} {'calls/s, 1 thread':>18} "
        f"{f'calls/s, {THREADS} threads':>19} {f'{ARRAY_BYTES >> 20} MiB arg':>15} "
        f"{'distsrv is (p50, 8 threads, array)':>35}"
    )
    print(header)
    print("-" * len(header))
    for peer, result in results.items():
        if isinstance(result, str):
            continue
        ratio = ""
        if peer != "distsrv" and isinstance(ours, dict):
            faster = result["p50"] / ours["p50"]
            more = ours[f"rate{THREADS}"] / result[f"rate{THREADS}"]
            array_faster = result["array"] / ours["array"]
            ratio = f"{faster:.1f}x faster, {more:.1f}x, {array_faster:.1f}x"
        array = f"{result['array'] * 1e3:.1f}ms {ARRAY_BYTES / result['array'] / 1e9:.2f}GB/s"
        print(
            f"{PEERS[peer].name:>14} {result['p50'] * 1e6:>7.0f}µs {result['p99'] * 1e6:>7.0f}µs "
            f"{result['rate1']:>18.0f} {result[f'rate{THREADS}']:>19.0f} {array:>15} {ratio:>35}"
        )


if __name__ == "__main__":
    main()
