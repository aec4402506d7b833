"""What a user who installed only the wheel gets: run by `make wheel-check` with the python of a
fresh virtualenv holding the wheel and what it depends on, nothing else, outside the checkout."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
import threading

import numpy as np

import distsrv

prefix = pathlib.Path(sys.prefix).resolve()
installed = pathlib.Path(distsrv.__file__).resolve()
assert prefix in installed.parents, f"distsrv came from {installed}, not the wheel in {prefix}"
assert distsrv._native.BUILD_PROFILE == "release", distsrv._native.BUILD_PROFILE

command = pathlib.Path(sys.executable).with_name("distsrv")
shown = subprocess.run([command, "--help"], capture_output=True, text=True, check=True, timeout=60)
assert "launch" in shown.stdout, shown.stdout
version = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
assert version.stdout.strip() == f"distsrv {distsrv.__version__}", version.stdout

sockets = [socket.socket() for _ in range(2)]
for sock in sockets:
    sock.bind(("127.0.0.1", 0))
cluster = distsrv.ClusterSpec(
    {"worker": [f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]}
)
for sock in sockets:
    sock.close()
received: list[np.ndarray] = []


def second() -> None:
    with distsrv.Server(cluster, "worker", 1) as server:
        received.append(server.recv("x", source=("worker", 0), timeout=30))
        server.barrier(timeout=30)


thread = threading.Thread(target=second)
thread.start()
with distsrv.Server(cluster, "worker", 0) as server:
    server.send("x", np.arange(5.0), to=("worker", 1), timeout=30)
    server.barrier(timeout=30)
thread.join(timeout=60)
np.testing.assert_array_equal(received[0], np.arange(5.0))
print(f"wheel ok: distsrv {distsrv.__version__} from {installed.parent}")
