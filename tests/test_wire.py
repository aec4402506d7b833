"""The Rust server as stock grpcio clients see it: the standard health service, server
reflection, distsrv.v1.Worker through stubs generated from protos/, bad requests, the call
limit, and ServerDef bytes read by generated protobuf code."""

from __future__ import annotations

import threading
import time
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
from distsrv.launch import free_ports

WORKER = "distsrv.v1.Worker"
HEALTH = "grpc.health.v1.Health"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def task(job: str = "localhost", index: int = 0) -> Any:
    return distsrv_pb2.TaskId(job=job, index=index)


def poll(call: Callable[[], Any], until: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """Makes ``call`` until its outcome (a result or a grpc.RpcError) satisfies ``until``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            outcome = call()
        except grpc.RpcError as error:
            outcome = error
        if until(outcome) or time.monotonic() > deadline:
            return outcome
        time.sleep(0.01)


def code_of(outcome: Any) -> grpc.StatusCode:
    return outcome.code() if isinstance(outcome, grpc.RpcError) else grpc.StatusCode.OK


# -- health --------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", WORKER])
def test_health_check_is_serving_while_running(channel: grpc.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == SERVING


def test_health_check_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("service", ["", WORKER])
def test_health_turns_not_serving_and_unavailable_once_stopped(
    local_server: distsrv.Server, channel: grpc.Channel, service: str
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
    assert next(watch).status == SERVING
    # A health watch is not work to drain: stop() does not wait out the grace for it, and the
    # watcher hears NOT_SERVING or sees its stream end.
    began = time.monotonic()
    stopper = threading.Thread(target=local_server.stop, kwargs={"grace": 20})
    stopper.start()
    try:
        heard = next(watch).status
    except grpc.RpcError as ended:
        heard = ended.code()
    finally:
        watch.cancel()
    assert heard in (NOT_SERVING, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    assert time.monotonic() - began < 5
    assert local_server.status == "closed"
    with (
        grpc.insecure_channel(local_server.address) as fresh,
        pytest.raises(grpc.RpcError) as info,
    ):
        health_pb2_grpc.HealthStub(fresh).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# -- reflection ----------------------------------------------------------------------------------


def test_reflection_lists_the_worker_and_health_services(channel: grpc.Channel) -> None:
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert WORKER in services
    assert HEALTH in services


def test_reflection_serves_the_worker_descriptor_of_protos(channel: grpc.Channel) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    served = pool.FindServiceByName(WORKER)
    generated = distsrv_pb2.DESCRIPTOR.services_by_name["Worker"]

    def shape(service: Any) -> dict[str, tuple[str, str, bool, bool]]:
        return {
            method.name: (
                method.input_type.full_name,
                method.output_type.full_name,
                method.client_streaming,
                method.server_streaming,
            )
            for method in service.methods
        }

    assert shape(served) == shape(generated)
    assert {"GetStatus", "SendTensor", "RecvTensor"} <= set(shape(served))
    # Message layouts come along: field numbers of a TensorFlow mirror as protos/ has them.
    server_def = pool.FindMessageTypeByName("distsrv.v1.ServerDef")
    assert {f.name: f.number for f in server_def.fields} == {
        f.name: f.number for f in distsrv_pb2.ServerDef.DESCRIPTOR.fields
    }


def test_reflection_serves_the_health_descriptor(channel: grpc.Channel) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    health = pool.FindServiceByName(HEALTH)
    assert {method.name for method in health.methods} >= {"Check", "Watch"}


# -- distsrv.v1.Worker ---------------------------------------------------------------------------


def test_get_status_reports_task_incarnation_and_version(
    local_server: distsrv.Server, channel: grpc.Channel
) -> None:
    stub = distsrv_pb2_grpc.WorkerStub(channel)
    reply = stub.GetStatus(distsrv_pb2.GetStatusRequest(), timeout=10)
    assert (reply.task.job, reply.task.index) == ("localhost", 0)
    assert reply.incarnation != 0
    assert reply.incarnation == local_server.incarnation
    assert reply.version == distsrv.__version__
    # The same server keeps its incarnation.
    assert stub.GetStatus(distsrv_pb2.GetStatusRequest(), timeout=10).incarnation == (
        reply.incarnation
    )


def test_each_server_has_its_own_incarnation(local_server: distsrv.Server) -> None:
    with distsrv.Server.create_local_server() as other:
        assert other.incarnation not in (0, local_server.incarnation)


def test_get_status_of_a_worker_task() -> None:
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    with (
        distsrv.Server(cluster, job_name="worker", task_index=1) as server,
        grpc.insecure_channel(server.address) as worker_channel,
    ):
        reply = distsrv_pb2_grpc.WorkerStub(worker_channel).GetStatus(
            distsrv_pb2.GetStatusRequest(), timeout=10, wait_for_ready=True
        )
        assert (reply.task.job, reply.task.index) == ("worker", 1)
        assert reply.incarnation == server.incarnation


def test_recv_tensor_streams_a_tensor_the_server_holds(
    local_server: distsrv.Server, channel: grpc.Channel
) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    local_server.send("weights", array, to=local_server.task)
    stub = distsrv_pb2_grpc.WorkerStub(channel)
    request = distsrv_pb2.RecvTensorRequest(name="weights", source=task(), timeout_millis=5000)
    chunks = list(stub.RecvTensor(request, timeout=10))
    header = chunks[0].header
    assert header.name == "weights"
    assert (header.source.job, header.source.index) == ("localhost", 0)
    assert header.dtype == distsrv_pb2.DT_FLOAT
    assert [dim.size for dim in header.shape.dim] == [3, 4]
    assert header.total_bytes == array.nbytes
    assert b"".join(chunk.data for chunk in chunks) == array.tobytes()


def test_send_tensor_from_a_stock_client_is_received(
    local_server: distsrv.Server, channel: grpc.Channel
) -> None:
    array = np.arange(6, dtype=np.int64)
    header = distsrv_pb2.TensorHeader(
        name="grads",
        source=task(),
        dtype=distsrv_pb2.DT_INT64,
        shape=distsrv_pb2.TensorShapeProto(dim=[distsrv_pb2.TensorShapeProto.Dim(size=6)]),
        total_bytes=array.nbytes,
    )
    data = array.tobytes()
    chunks = [
        distsrv_pb2.TensorChunk(header=header),
        distsrv_pb2.TensorChunk(data=data[:16]),
        distsrv_pb2.TensorChunk(data=data[16:]),
    ]
    reply = distsrv_pb2_grpc.WorkerStub(channel).SendTensor(iter(chunks), timeout=10)
    assert reply.received_bytes == array.nbytes
    received = local_server.recv("grads", source=local_server.task, timeout=5)
    assert received.dtype == np.int64
    assert received.tolist() == array.tolist()


def _raw_unary(channel: grpc.Channel, path: str, body: bytes) -> Any:
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    return call(body, timeout=10)


def _raw_client_stream(channel: grpc.Channel, path: str, body: bytes) -> Any:
    call = channel.stream_unary(path, request_serializer=None, response_deserializer=None)
    return call(iter([body]), timeout=10)


def _raw_server_stream(channel: grpc.Channel, path: str, body: bytes) -> Any:
    call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
    return list(call(body, timeout=10))


@pytest.mark.parametrize(
    ("method", "send", "code"),
    [
        # tonic's generated codec reports a request it cannot decode as INTERNAL, as grpc-core
        # and grpcio's own servers do.
        ("GetStatus", _raw_unary, grpc.StatusCode.INTERNAL),
        ("RecvTensor", _raw_server_stream, grpc.StatusCode.INTERNAL),
        # SendTensor is decoded by distsrv itself, which calls it what it is.
        ("SendTensor", _raw_client_stream, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_a_malformed_request_body_is_refused_and_the_server_keeps_serving(
    local_server: distsrv.Server,
    channel: grpc.Channel,
    method: str,
    send: Callable[[grpc.Channel, str, bytes], Any],
    code: grpc.StatusCode,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        send(channel, f"/{WORKER}/{method}", b"\xff\xff\xff")
    assert info.value.code() == code
    reply = distsrv_pb2_grpc.WorkerStub(channel).GetStatus(
        distsrv_pb2.GetStatusRequest(), timeout=10
    )
    assert reply.incarnation == local_server.incarnation
    assert local_server.status == "running"


@pytest.mark.parametrize("path", [f"/{WORKER}/NoSuchMethod", "/no.such.Service/Method"])
def test_an_unknown_method_is_unimplemented(
    local_server: distsrv.Server, channel: grpc.Channel, path: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _raw_unary(channel, path, b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    reply = distsrv_pb2_grpc.WorkerStub(channel).GetStatus(
        distsrv_pb2.GetStatusRequest(), timeout=10
    )
    assert reply.incarnation == local_server.incarnation


# -- the call limit ------------------------------------------------------------------------------


@pytest.fixture
def limited() -> Iterator[tuple[distsrv.Server, Any]]:
    """A server that serves one call at a time, and a Worker stub to it."""
    server = distsrv.Server.create_local_server(config=distsrv.ServerConfig(connection_limit=1))
    with grpc.insecure_channel(server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield server, distsrv_pb2_grpc.WorkerStub(channel)
    server.stop(grace=0)


def _start_waiting_recv(stub: Any, timeout_millis: int) -> tuple[Any, threading.Thread, list[Any]]:
    request = distsrv_pb2.RecvTensorRequest(
        name="never", source=task(), timeout_millis=timeout_millis
    )
    call = stub.RecvTensor(request, timeout=30)
    outcome: list[Any] = []

    def drain() -> None:
        try:
            outcome.append(list(call))
        except grpc.RpcError as error:
            outcome.append(error)

    drainer = threading.Thread(target=drain)
    drainer.start()
    return call, drainer, outcome


def _get_status(stub: Any) -> Any:
    return stub.GetStatus(distsrv_pb2.GetStatusRequest(), timeout=10)


def test_connection_limit_refuses_calls_beyond_it_until_one_ends(
    limited: tuple[distsrv.Server, Any],
) -> None:
    server, stub = limited
    assert server.connection_limit == 1
    call, drainer, outcome = _start_waiting_recv(stub, timeout_millis=3000)
    try:
        refused = poll(
            lambda: _get_status(stub),
            until=lambda o: code_of(o) == grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "connection_limit" in refused.details()
        assert drainer.is_alive(), f"the waiting call ended early: {outcome}"
        # Every method of the Worker counts, streaming ones too.
        with pytest.raises(grpc.RpcError) as info:
            list(
                stub.RecvTensor(
                    distsrv_pb2.RecvTensorRequest(name="other", source=task()), timeout=10
                )
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        call.cancel()
    drainer.join(timeout=10)
    assert code_of(outcome[0]) == grpc.StatusCode.CANCELLED
    # The cancelled call gave its place back.
    after = poll(lambda: _get_status(stub), until=lambda o: code_of(o) == grpc.StatusCode.OK)
    assert code_of(after) == grpc.StatusCode.OK, after
    assert after.incarnation == server.incarnation


def test_a_call_that_ends_by_itself_gives_its_place_back(
    limited: tuple[distsrv.Server, Any],
) -> None:
    server, stub = limited
    _, drainer, outcome = _start_waiting_recv(stub, timeout_millis=300)
    drainer.join(timeout=10)
    assert not drainer.is_alive()
    assert code_of(outcome[0]) == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(3):
        assert _get_status(stub).incarnation == server.incarnation


def test_health_is_not_held_back_by_the_connection_limit(
    limited: tuple[distsrv.Server, Any],
) -> None:
    server, stub = limited
    call, drainer, _ = _start_waiting_recv(stub, timeout_millis=3000)
    try:
        poll(
            lambda: _get_status(stub),
            until=lambda o: code_of(o) == grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        with grpc.insecure_channel(server.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=WORKER), timeout=10
            )
        assert reply.status == SERVING
    finally:
        call.cancel()
        drainer.join(timeout=10)


# -- ServerDef bytes and generated protobuf ------------------------------------------------------


def test_server_def_bytes_parse_as_the_generated_server_def() -> None:
    (other,) = free_ports(1)
    cluster = {"ps": ["127.0.0.1:0"], "worker": {1: f"127.0.0.1:{other}", 4: "[::1]:2224"}}
    with distsrv.Server(cluster, job_name="ps", task_index=0) as server:
        ours = server.server_def
        parsed = distsrv_pb2.ServerDef.FromString(ours.SerializeToString())
    assert parsed.job_name == ours.job_name == "ps"
    assert parsed.task_index == ours.task_index == 0
    assert parsed.protocol == ours.protocol == "grpc"
    assert parsed.port == ours.port == server.port != 0
    assert {job.name: dict(job.tasks) for job in parsed.cluster.job} == {
        "ps": {0: f"127.0.0.1:{server.port}"},
        "worker": {1: f"127.0.0.1:{other}", 4: "[::1]:2224"},
    }


def test_a_generated_server_def_is_accepted_as_is() -> None:
    (port,) = free_ports(1)
    message = distsrv_pb2.ServerDef(
        cluster=distsrv_pb2.ClusterDef(
            job=[distsrv_pb2.JobDef(name="worker", tasks={2: f"127.0.0.1:{port}"})]
        ),
        job_name="worker",
        task_index=2,
        protocol="grpc",
    )
    assert distsrv.ServerDef.FromString(message.SerializeToString()) == distsrv.ServerDef(
        cluster=distsrv.ClusterDef(job=(distsrv.JobDef("worker", {2: f"127.0.0.1:{port}"}),)),
        job_name="worker",
        task_index=2,
        protocol="grpc",
    )
    with distsrv.Server(message) as server:
        assert (server.job_name, server.task_index, server.port) == ("worker", 2, port)


def test_mirrored_messages_keep_tensorflows_field_numbers() -> None:
    def numbers(message: Any) -> dict[str, int]:
        return {field.name: field.number for field in message.DESCRIPTOR.fields}

    # tensorflow/core/protobuf/tensorflow_server.proto and cluster.proto.
    assert numbers(distsrv_pb2.ServerDef) == {
        "cluster": 1,
        "job_name": 2,
        "task_index": 3,
        "protocol": 5,
        "port": 6,
    }
    assert numbers(distsrv_pb2.ClusterDef) == {"job": 1}
    assert numbers(distsrv_pb2.JobDef) == {"name": 1, "tasks": 2}
