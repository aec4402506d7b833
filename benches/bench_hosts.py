"""The cross-host data plane: a 64 MiB tensor sent from one namespace host to another, beside raw
TCP sockets between the same two hosts, in one run (rounds alternate, so both see the same
machine). Each transfer counts until the receiver has all of it and the sender knows: distsrv's
send returns on the receiver's acknowledgement, and the raw TCP sender waits for a one-byte ack.
With ``--call``, the same for a remote call whose argument is the array, beside
dask.distributed's ``rpc`` (``pip install '.[bench-dask]'``) between the same two hosts.

Needs root (network namespaces, via ``tests/hosts.py``) and an optimised build
(``make develop-release``)::

    python benches/bench_hosts.py [--call] [--size-mib 64] [--repeats 10] [--rounds 3]
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
# The transfer is a send of the array, or a call of "take" with the array as its argument.
DISTSRV = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import distsrv
    addresses, role = sys.argv[1].split(","), sys.argv[2]
    size, repeats, transfer = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    spec = distsrv.ClusterSpec({"worker": addresses})
    index = 0 if role == "send" else 1
    config = distsrv.ServerConfig(shared_memory=False)
    handlers = {"take": lambda x: x.nbytes}
    with distsrv.Server(spec, "worker", index, config=config, handlers=handlers) as server:
        server.wait_for_cluster(timeout=60)
        if role == "send":
            array = np.ones(size, np.uint8)
            for _ in range(repeats):
                started = time.perf_counter()
                if transfer == "call":
                    assert server.call(("worker", 1), "take", x=array) == size
                else:
                    server.send("t", array, to=("worker", 1))
                print(time.perf_counter() - started, flush=True)
            server.send("done", np.zeros(1), to=("worker", 1))
        else:
            if transfer == "send":
                for _ in range(repeats):
                    server.recv("t", source=("worker", 0), timeout=60)
            server.recv("done", source=("worker", 0), timeout=300)
    """
)

DASK_CALL = textwrap.dedent(
    """
    import asyncio, sys, time
    import numpy as np
    from distributed.core import Server, rpc
    from distributed.protocol import to_serialize
    address, role, size, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    async def serve():
        done = asyncio.Event()
        server = Server({"take": lambda x: x.nbytes, "done": lambda: done.set()})
        await server.listen(f"tcp://{address}")
        await done.wait()
        await server.close()

    async def call():
        for _ in range(600):
            try:
                remote = rpc(f"tcp://{address}")
                await remote.take(x=to_serialize(np.ones(1, np.uint8)))
                break
            except OSError:
                await asyncio.sleep(0.05)
        array = np.ones(size, np.uint8)
        for _ in range(repeats):
            started = time.perf_counter()
            assert await remote.take(x=to_serialize(array)) == size
            print(time.perf_counter() - started, flush=True)
        await remote.done()
        await remote.close_rpc()

    asyncio.run(serve() if role == "recv" else call())
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


def run_pair(
    hosts: TestHosts, program: str, target: str, size: int, repeats: int, *extra: str
) -> list[float]:
    """Seconds per transfer, as the sender on host 0 timed them; `extra` arguments go to both."""
    receiver = hosts[1].popen(
        [sys.executable, "-c", program, target, "recv", str(size), str(repeats), *extra],
        stdout=subprocess.DEVNULL,
    )
    sender = hosts[0].popen(
        [sys.executable, "-c", program, target, "send", str(size), str(repeats), *extra],
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
    parser.add_argument("--call", action="store_true", help="a remote call, beside dask's rpc")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if (reason := unavailable_reason()) is not None:
        raise SystemExit(f"test hosts are unavailable: {reason}")
    size = args.size_mib << 20
    transfer, peer, theirs = (
        ("call", "dask rpc", DASK_CALL) if args.call else ("send", "raw TCP", TCP)
    )
    times: dict[str, list[float]] = {"distsrv": [], peer: []}
    with TestHosts(2) as hosts:
        addresses = f"{hosts[0].address}:{PORT},{hosts[1].address}:{PORT}"
        for _ in range(args.rounds):
            times["distsrv"] += run_pair(hosts, DISTSRV, addresses, size, args.repeats, transfer)
            times[peer] += run_pair(hosts, theirs, f"{hosts[1].address}:{PORT}", size, args.repeats)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    what = "call with" if args.call else "send of"
    for name, median in medians.items():
        rate = size / median / 1e9
        print(f"{what} {args.size_mib} MiB  {name:8s}  {median * 1e3:8.1f} ms  {rate:6.2f} GB/s")
    print(f"distsrv / {peer} throughput: {medians[peer] / medians['distsrv']:.2f}x")


if __name__ == "__main__":
    main()
