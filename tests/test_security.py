"""The cluster token: every RPC of every service refuses a caller without it (stock grpcio clients,
every method found through reflection), a cluster that shares it works as before, and a task with
the address but not the token can change nothing."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import distsrv_pb2
import distsrv_pb2_grpc
import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import distsrv
from distsrv import errors
from distsrv.launch import free_ports

TOKEN = "a-cluster-token-0123456789"
# TensorFlow's services, served at paths of their own (not in reflection's descriptors).
TENSORFLOW_METHODS = [
    "/tensorflow.WorkerService/GetStatus",
    "/tensorflow.MasterService/CreateSession",
    "/tensorflow.MasterService/ListDevices",
    "/tensorflow.MasterService/CloseSession",
]
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `metadata` to every call of a channel (grpcio's call credentials need TLS)."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def _add(self, details: Any) -> Any:
        metadata = [*(details.metadata or []), *self._metadata]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._add(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._add(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._add(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._add(details), requests)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _channel(address: str, metadata: list[tuple[str, str]]) -> grpc.Channel:
    return grpc.intercept_channel(grpc.insecure_channel(address), _Metadata(metadata))


@pytest.fixture
def secured() -> Iterator[distsrv.Server]:
    server = distsrv.Server.create_local_server(security=distsrv.Security(TOKEN))
    yield server
    server.stop(grace=0)


def _methods_through_reflection(address: str) -> list[str]:
    """Every method of every service that reflection lists, asked with the token."""
    with _channel(address, _bearer(TOKEN)) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        methods = []
        for service in database.get_services():
            for method in pool.FindServiceByName(service).methods:
                methods.append(f"/{service}/{method.name}")
    return methods


def _call(channel: grpc.Channel, method: str) -> grpc.StatusCode:
    """The status of one call of `method` with an empty request (an empty message is a valid
    request of every method: the token is checked before the body is read anyway)."""
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731
    call = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
    try:
        call(b"", timeout=10)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_every_method_refuses_a_caller_without_the_token(secured: distsrv.Server) -> None:
    methods = _methods_through_reflection(secured.address) + TENSORFLOW_METHODS
    assert {
        "/distsrv.v1.Worker/SendTensor",
        "/distsrv.v1.Worker/RecvTensor",
        "/distsrv.v1.Worker/VariableOp",
        "/distsrv.v1.Worker/Call",
        "/distsrv.v1.Worker/ShmHandshake",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    } <= set(methods)
    guarded = [method for method in methods if not method.startswith("/grpc.health.v1.")]
    refused = 0
    for credentials in ([], _bearer("a-wrong-token"), [("authorization", TOKEN)]):
        with _channel(secured.address, credentials) as channel:
            for method in guarded:
                code = _call(channel, method)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (method, credentials, code)
                refused += 1
    total = 3 * len(guarded)
    print(f"refused {refused} of {total} unauthenticated calls ({len(guarded)} methods)")
    assert refused == total
    # The task kept serving: with the token, the same client is answered.
    with _channel(secured.address, _bearer(TOKEN)) as channel:
        status = distsrv_pb2_grpc.WorkerStub(channel).GetStatus(
            distsrv_pb2.GetStatusRequest(), timeout=10
        )
    assert status.task.job == "localhost"


def test_health_stays_open_unless_closed_too() -> None:
    for open_health, expected in (
        (True, grpc.StatusCode.OK),
        (False, grpc.StatusCode.UNAUTHENTICATED),
    ):
        security = distsrv.Security(TOKEN, open_health=open_health)
        with distsrv.Server.create_local_server(security=security) as server:
            with grpc.insecure_channel(server.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
            assert code == expected, open_health


def test_a_stock_client_with_the_token_sends_a_tensor_that_a_recv_gets(
    secured: distsrv.Server,
) -> None:
    with _channel(secured.address, _bearer(TOKEN)) as channel:
        stub = distsrv_pb2_grpc.WorkerStub(channel)
        header = distsrv_pb2.TensorHeader(
            name="t",
            source=distsrv_pb2.TaskId(job="localhost", index=0),
            dtype=distsrv_pb2.DT_UINT8,
            shape=distsrv_pb2.TensorShapeProto(dim=[distsrv_pb2.TensorShapeProto.Dim(size=3)]),
            total_bytes=3,
        )
        chunks = iter(
            [distsrv_pb2.TensorChunk(header=header), distsrv_pb2.TensorChunk(data=b"\x01\x02\x03")]
        )
        assert stub.SendTensor(chunks, timeout=10).received_bytes == 3
    assert secured.recv("t", source=("localhost", 0), timeout=10).tolist() == [1, 2, 3]


def _three(
    security: distsrv.Security | None, config: distsrv.ServerConfig | None = None
) -> list[distsrv.Server]:
    ports = free_ports(3)
    cluster = distsrv.ClusterSpec({"worker": [f"127.0.0.1:{port}" for port in ports]})
    return [
        distsrv.Server(cluster, "worker", index, config=config, security=security)
        for index in range(3)
    ]


@pytest.mark.parametrize(
    ("kind", "shared_memory"),
    [("token", True), ("token and TLS", True), ("token and TLS", False)],
)
def test_a_secured_cluster_works_as_before(kind: str, shared_memory: bool) -> None:
    security = distsrv.Security(TOKEN) if kind == "token" else distsrv.Security.temporary()
    servers = _three(security, distsrv.ServerConfig(shared_memory=shared_memory))
    try:
        a, b, _ = servers
        b.add_handler("double", lambda x: 2 * x)
        big = np.arange(1 << 20, dtype=np.float32)
        a.send("x", big, to=("worker", 1))
        assert np.array_equal(b.recv("x", source=("worker", 0), timeout=10), big)
        assert a.call(("worker", 1), "double", x=21, timeout=10) == 42
        variable = a.create_variable("w", np.zeros(2, np.float32), on=("worker", 2))
        b.variable("w", on=("worker", 2)).assign_add(np.ones(2, np.float32))
        assert variable.read().tolist() == [1, 1]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            sums = pool.map(
                lambda server: server.all_reduce(np.full(3, server.task_index, np.float32)),
                servers,
            )
            assert [s.tolist() for s in sums] == [[3, 3, 3]] * 3
        assert (a.transport_counts()["shm_sent"] > 0) == shared_memory
        assert len(a.list_devices(timeout=10)) >= 3
    finally:
        for server in servers:
            server.stop(grace=0)


def test_a_task_with_the_address_but_not_the_token_changes_nothing() -> None:
    servers = _three(distsrv.Security(TOKEN))
    a, b, _ = servers
    # Task 2 restarted by an intruder: same cluster, same address, without the token.
    servers[2].stop(grace=0)
    rogue = distsrv.Server(a.cluster_spec, "worker", 2, security=distsrv.Security("a-guess"))
    try:
        a.add_handler("touch", lambda: "touched")
        variable = a.create_variable("w", np.zeros(2, np.float32), on=("worker", 0))
        with pytest.raises(errors.UnauthenticatedError):
            rogue.send("x", np.ones(2, np.float32), to=("worker", 0))
        with pytest.raises(errors.UnauthenticatedError):
            rogue.variable("w", on=("worker", 0)).assign(np.ones(2, np.float32))
        with pytest.raises(errors.UnauthenticatedError):
            rogue.call(("worker", 0), "touch", timeout=10)
        with pytest.raises(errors.DeadlineExceededError):
            a.recv("x", source=("worker", 2), timeout=0.5)
        assert variable.read().tolist() == [0, 0]
        # A stock client without the token neither injects nor takes anything.
        with grpc.insecure_channel(a.address) as channel:
            stub = distsrv_pb2_grpc.WorkerStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.RecvTensor(
                    distsrv_pb2.RecvTensorRequest(
                        source=distsrv_pb2.TaskId(job="worker", index=1), name="y"
                    ),
                    timeout=10,
                ).next()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        b.send("y", np.ones(1, np.float32), to=("worker", 0))
        assert a.recv("y", source=("worker", 1), timeout=10).tolist() == [1]
    finally:
        for server in (a, b, rogue):
            server.stop(grace=0)


def test_status_without_credentials_says_so_plainly(secured: distsrv.Server, tmp_path) -> None:
    command = [sys.executable, "-m", "distsrv", "status", secured.address, "--timeout", "10"]
    environ = {k: v for k, v in os.environ.items() if k != distsrv.security.TOKEN_ENV}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environ)
    assert refused.returncode != 0
    assert "UNAUTHENTICATED" in refused.stdout
    assert "requires the cluster's token" in refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    answered = subprocess.run(
        [*command, "--token-file", str(token_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )
    assert answered.returncode == 0, answered.stderr
    assert "SERVING" in answered.stdout


def test_security_takes_a_token_a_file_or_the_environment(tmp_path, monkeypatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(" from-a-file\n")
    assert distsrv.Security(token_file=token_file).token == "from-a-file"
    monkeypatch.setenv("DISTSRV_TOKEN", "from-the-environment")
    assert distsrv.Security().token == "from-the-environment"
    monkeypatch.delenv("DISTSRV_TOKEN")
    for bad in (
        {},
        {"token": ""},
        {"token": "has space"},
        {"token": "x", "token_file": token_file},
    ):
        with pytest.raises(errors.InvalidArgumentError):
            distsrv.Security(**bad)
    temporary = distsrv.Security.temporary()
    assert len(temporary.token) >= 32
    assert temporary.token not in repr(temporary)
    assert temporary.env()["DISTSRV_TOKEN"] == temporary.token
    assert distsrv.Security("a-token").env() == {"DISTSRV_TOKEN": "a-token"}


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def tls_secured() -> Iterator[tuple[distsrv.Server, distsrv.Security]]:
    security = distsrv.Security.temporary()
    server = distsrv.Server.create_local_server(security=security)
    yield server, security
    server.stop(grace=0)


def _tls_channel(
    address: str, security: distsrv.Security, metadata: list[tuple[str, str]]
) -> grpc.Channel:
    assert security.tls_pem is not None
    ca, cert, key = security.tls_pem
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.intercept_channel(grpc.secure_channel(address, credentials), _Metadata(metadata))


def test_a_stock_tls_client_with_the_token_is_answered_and_without_it_refused(
    tls_secured: tuple[distsrv.Server, distsrv.Security],
) -> None:
    server, security = tls_secured
    assert security.token is not None
    with _tls_channel(server.address, security, _bearer(security.token)) as channel:
        status = distsrv_pb2_grpc.WorkerStub(channel).GetStatus(
            distsrv_pb2.GetStatusRequest(), timeout=10
        )
        assert status.task.job == "localhost"
    refused = 0
    methods = [
        "/distsrv.v1.Worker/GetStatus",
        "/distsrv.v1.Worker/SendTensor",
        "/distsrv.v1.Worker/VariableOp",
        *TENSORFLOW_METHODS,
    ]
    with _tls_channel(server.address, security, []) as channel:
        for method in methods:
            assert _call(channel, method) == grpc.StatusCode.UNAUTHENTICATED, method
            refused += 1
    assert refused == len(methods)


def test_a_plaintext_client_or_a_certificate_of_another_ca_gets_nothing(
    tls_secured: tuple[distsrv.Server, distsrv.Security],
) -> None:
    server, security = tls_secured
    assert security.token is not None
    # Plaintext, as TensorFlow's own clients speak: refused at the connection.
    with _channel(server.address, _bearer(security.token)) as channel:
        for method in ("/distsrv.v1.Worker/GetStatus", *TENSORFLOW_METHODS):
            assert _call(channel, method) == grpc.StatusCode.UNAVAILABLE, method
    # The right token, but a certificate (and CA) of another cluster.
    stranger = distsrv.Security.temporary()
    assert stranger.tls_pem is not None
    other_ca, other_cert, other_key = stranger.tls_pem
    own_ca = security.tls_pem[0] if security.tls_pem else b""
    for root, cert, key in ((own_ca, other_cert, other_key), (other_ca, other_cert, other_key)):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key, certificate_chain=cert
        )
        with grpc.intercept_channel(
            grpc.secure_channel(server.address, credentials), _Metadata(_bearer(security.token))
        ) as channel:
            assert _call(channel, "/distsrv.v1.Worker/GetStatus") == grpc.StatusCode.UNAVAILABLE
    # The server kept serving its own cluster.
    with _tls_channel(server.address, security, _bearer(security.token)) as channel:
        assert _call(channel, HEALTH_CHECK) == grpc.StatusCode.OK


def test_security_reads_tls_files_and_refuses_half_of_them(tmp_path) -> None:
    temporary = distsrv.Security.temporary()
    environ = temporary.env()
    assert set(environ) == {
        "DISTSRV_TOKEN",
        "DISTSRV_TLS_CA",
        "DISTSRV_TLS_CERT",
        "DISTSRV_TLS_KEY",
    }
    files = distsrv.Security(
        tls_ca_file=environ["DISTSRV_TLS_CA"],
        tls_cert=environ["DISTSRV_TLS_CERT"],
        tls_key=environ["DISTSRV_TLS_KEY"],
        require_encryption=True,
    )
    assert files.token is None
    assert files.tls_pem == temporary.tls_pem
    with pytest.raises(errors.InvalidArgumentError, match="all of"):
        distsrv.Security(tls_ca_file=environ["DISTSRV_TLS_CA"])
    with pytest.raises(errors.InvalidArgumentError, match="require_encryption"):
        distsrv.Security("a-token", require_encryption=True)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(errors.InvalidArgumentError, match="TLS"):
        distsrv.Server.create_local_server(
            security=distsrv.Security(tls_ca_file=garbage, tls_cert=garbage, tls_key=garbage)
        )


def test_a_task_certificate_speaks_only_for_its_task() -> None:
    names = [f"/job:worker/task:{index}" for index in range(2)]
    securities = distsrv.Security.temporary_for_tasks(names)
    ports = free_ports(2)
    cluster = distsrv.ClusterSpec({"worker": [f"127.0.0.1:{port}" for port in ports]})
    servers = [
        distsrv.Server(cluster, "worker", index, security=securities[name])
        for index, name in enumerate(names)
    ]
    a, b = servers
    try:
        b.add_handler(
            "whoami",
            lambda context: str(context.caller),
        )
        # Between the two tasks, each under its own certificate, everything works as before.
        a.send("x", np.ones(2, np.float32), to=("worker", 1))
        assert b.recv("x", source=("worker", 0), timeout=10).tolist() == [1, 1]
        assert a.call(("worker", 1), "whoami", timeout=10) == "/job:worker/task:0"
        # A stock client with task 0's certificate and the token cannot speak for task 1.
        token = securities[names[0]].token
        assert token is not None
        with _tls_channel(b.address, securities[names[0]], _bearer(token)) as channel:
            stub = distsrv_pb2_grpc.WorkerStub(channel)
            for source, expected in ((1, grpc.StatusCode.PERMISSION_DENIED), (0, None)):
                header = distsrv_pb2.TensorHeader(
                    name="forged",
                    source=distsrv_pb2.TaskId(job="worker", index=source),
                    dtype=distsrv_pb2.DT_UINT8,
                    shape=distsrv_pb2.TensorShapeProto(
                        dim=[distsrv_pb2.TensorShapeProto.Dim(size=1)]
                    ),
                    total_bytes=1,
                )
                chunks = iter(
                    [distsrv_pb2.TensorChunk(header=header), distsrv_pb2.TensorChunk(data=b"\x07")]
                )
                try:
                    stub.SendTensor(chunks, timeout=10)
                    code = None
                except grpc.RpcError as error:
                    code = error.code()
                assert code == expected, source
            forged = distsrv_pb2.CallRequest(
                op="whoami", caller=distsrv_pb2.TaskId(job="worker", index=1)
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.Call(forged, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # Nor take out of task 1's inbox what task 0 itself sent there.
            a.send("mine", np.ones(1, np.float32), to=("worker", 1))
            with pytest.raises(grpc.RpcError) as refused:
                list(
                    stub.RecvTensor(
                        distsrv_pb2.RecvTensorRequest(
                            name="mine", source=distsrv_pb2.TaskId(job="worker", index=0)
                        ),
                        timeout=10,
                    )
                )
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert b.recv("mine", source=("worker", 0), timeout=10).tolist() == [1]
        with pytest.raises(errors.DeadlineExceededError):
            b.recv("forged", source=("worker", 1), timeout=0.5)
        assert b.recv("forged", source=("worker", 0), timeout=10).tolist() == [7]
    finally:
        for server in servers:
            server.stop(grace=0)


def test_an_open_task_beyond_loopback_says_it_is_unauthenticated(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="distsrv")
    with distsrv.Server.create_local_server():
        pass
    assert not caplog.records, "loopback alone: nothing to say"
    # Bound on every interface for a moment; nothing connects to it.
    with distsrv.Server({"worker": ["0.0.0.0:0"]}) as server:
        pass
    [record] = caplog.records
    assert "without authentication" in record.getMessage()
    assert server.task in record.getMessage()
    caplog.clear()
    with distsrv.Server({"worker": ["0.0.0.0:0"]}, security=distsrv.Security("a-token")):
        pass
    assert not caplog.records
