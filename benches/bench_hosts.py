"""The cross-host data plane: a 64 MiB tensor sent from one namespace host to another, beside raw
TCP sockets between the same two hosts, in one run (rounds alternate, so both see the same
machine). Each transfer counts until the receiver has all of it and the sender knows: distsrv's
send returns on the receiver's acknowledgement, and the raw TCP sender waits for a one-byte ack.

Needs root (network namespaces, via ``tests/hosts.py``) and an optimised build
(``make develop-release``)::

    python benches/bench_hosts.py [--size-mib 64] [--repeats 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import textwrap

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from hosts import TestHosts, unavailable_reason

PORT = 7200

# Both ends, by role: "send" times each transfer and prints the seconds, one line per transfer.
DISTSRV = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import distsrv
    addresses, role = sys.argv[1].split(","), sys.argv[2]
    size, repeats = int(sys.argv[3]), int(sys.argv[4])
    spec = distsrv.ClusterSpec({"worker": addresses})
    index = 0 if role == "send" else 1
    config = distsrv.ServerConfig(shared_memory=False)
    with distsrv.Server(spec, "worker", index, config=config) as server:
        server.wait_for_cluster(timeout=60)
        if role == "send":
            array = np.ones(size, np.uint8)
            for _ in range(repeats):
                started = time.perf_counter()
                server.send("t", array, to=("worker", 1))
                print(time.perf_counter() - started, flush=True)
            server.recv("done", source=("worker", 1), timeout=60)
        else:
            for _ in range(repeats):
                server.recv("t", source=("worker", 0), timeout=60)
            server.send("done", np.zeros(1), to=("worker", 0))
    """
)

TCP = textwrap.dedent(
    """
    import socket, sys, time
    address, role, size, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    host, port = address.rsplit(":", 1)
    if role == "recv":
        listener = socket.create_server((host, int(port)))
        connection, _ = listener.accept()
        buffer = bytearray(size)
        for _ in range(repeats):
            view, got = memoryview(buffer), 0
            while got < size:
                got += connection.recv_into(view[got:])
            connection.sendall(b"k")
    else:
        for _ in range(600):
            try:
                connection = socket.create_connection((host, int(port)))
                break
            except OSError:
                time.sleep(0.05)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = bytes(size)
        for _ in range(repeats):
            started = time.perf_counter()
            connection.sendall(payload)
            connection.recv(1)
            print(time.perf_counter() - started, flush=True)
    """
)


def run_pair(hosts: TestHosts, program: str, target: str, size: int, repeats: int) -> list[float]:
    """Seconds per transfer, as the sender on host 0 timed them."""
    receiver = hosts[1].popen(
        [sys.executable, "-c", program, target, "recv", str(size), str(repeats)],
        stdout=subprocess.DEVNULL,
    )
    sender = hosts[0].popen(
        [sys.executable, "-c", program, target, "send", str(size), str(repeats)],
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = sender.communicate(timeout=300)
    receiver.wait(timeout=60)
    if sender.returncode or receiver.returncode:
        raise SystemExit(
            f"a {program[:20]!r} end failed ({sender.returncode}, {receiver.returncode})"
        )
    return [float(line) for line in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if (reason := unavailable_reason()) is not None:
        raise SystemExit(f"test hosts are unavailable: {reason}")
    size = args.size_mib << 20
    times: dict[str, list[float]] = {"distsrv": [], "raw TCP": []}
    with TestHosts(2) as hosts:
        addresses = f"{hosts[0].address}:{PORT},{hosts[1].address}:{PORT}"
        for _ in range(args.rounds):
            times["distsrv"] += run_pair(hosts, DISTSRV, addresses, size, args.repeats)
            times["raw TCP"] += run_pair(
                hosts, TCP, f"{hosts[1].address}:{PORT}", size, args.repeats
            )
    medians = {peer: statistics.median(seconds) for peer, seconds in times.items()}
    for peer, median in medians.items():
        rate = size / median / 1e9
        print(f"{args.size_mib} MiB  {peer:8s}  {median * 1e3:8.1f} ms  {rate:6.2f} GB/s")
    print(f"distsrv / raw TCP throughput: {medians['raw TCP'] / medians['distsrv']:.2f}x")


if __name__ == "__main__":
    main()
