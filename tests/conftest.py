"""Shared test set-up: Python gRPC stubs generated from protos/ (so the tests are stock grpcio
clients of the Rust server), and servers that are always stopped."""

from __future__ import annotations

import importlib.resources
import pathlib
import select
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from grpc_tools import protoc

import distsrv

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = pathlib.Path(__file__).resolve().parent / "_generated"


def _generate_stubs() -> None:
    """Generates where the tests run, so the generated code matches the installed protobuf."""
    GENERATED.mkdir(exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p.name) for p in (ROOT / "protos").glob("*.proto"))
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{well_known}",
            f"--python_out={GENERATED}",
            f"--grpc_python_out={GENERATED}",
            *protos,
        ]
    )
    if status != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with status {status}")


_generate_stubs()
sys.path.insert(0, str(GENERATED))


@pytest.fixture
def local_server() -> Iterator[distsrv.Server]:
    """A running single-task server on a free port of 127.0.0.1."""
    server = distsrv.Server.create_local_server()
    yield server
    server.stop(grace=0)


@pytest.fixture
def channel(local_server: distsrv.Server) -> Iterator[grpc.Channel]:
    """A stock grpcio channel to ``local_server``."""
    with grpc.insecure_channel(local_server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


def pair_cluster(count: int = 2) -> distsrv.ClusterSpec:
    """A cluster of ``count`` workers on free ports of 127.0.0.1."""
    from distsrv.launch import free_ports

    return distsrv.ClusterSpec({"worker": [f"127.0.0.1:{p}" for p in free_ports(count)]})


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """A child's next line of stdout, stripped; fails the test if none comes within ``timeout``."""
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    if not readable:
        process.kill()
        _, stderr = process.communicate(timeout=10)
        pytest.fail(f"the child printed nothing within {timeout} s; stderr:\n{stderr}")
    return process.stdout.readline().strip()
