"""TensorFlow's wire, without TensorFlow: stock grpcio clients built from
protos/tensorflow_compat.proto call the paths TensorFlow's runtime calls
(``/tensorflow.WorkerService/GetStatus``, ``/tensorflow.MasterService/...``) as TensorFlow does,
the replies' bytes are checked field by field against TensorFlow's numbers (tf-wire.md), and a
grpcio server that answers like a stock TensorFlow worker is inspected by distsrv."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import distsrv_pb2
import grpc
import pytest
import tensorflow_compat_pb2 as tf_pb2
from conftest import pair_cluster
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import distsrv
from distsrv import _native
from distsrv.launch import free_ports

GET_STATUS = "/tensorflow.WorkerService/GetStatus"
CREATE_SESSION = "/tensorflow.MasterService/CreateSession"
LIST_DEVICES = "/tensorflow.MasterService/ListDevices"
CLOSE_SESSION = "/tensorflow.MasterService/CloseSession"


def call(channel: grpc.Channel, path: str, request: Any, reply_type: Any) -> Any:
    """A unary call the way TensorFlow's hand-written client makes it: by path."""
    method = channel.unary_unary(
        path,
        request_serializer=type(request).SerializeToString,
        response_deserializer=reply_type.FromString,
    )
    return method(request, timeout=10)


def raw_call(channel: grpc.Channel, path: str, body: bytes) -> bytes:
    method = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    reply: bytes = method(body, timeout=10)
    return reply


def fields(data: bytes) -> list[tuple[int, int, Any]]:
    """The (field number, wire type, value) of each field of a protobuf message, in order."""

    def varint(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[at]
            value |= (byte & 0x7F) << shift
            at += 1
            if byte < 0x80:
                return value, at
            shift += 7

    out: list[tuple[int, int, Any]] = []
    at = 0
    while at < len(data):
        key, at = varint(at)
        number, wire_type = key >> 3, key & 7
        value: Any
        if wire_type == 0:
            value, at = varint(at)
        elif wire_type == 1:
            (value,) = struct.unpack_from("<Q", data, at)
            at += 8
        elif wire_type == 2:
            size, at = varint(at)
            value, at = data[at : at + size], at + size
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        out.append((number, wire_type, value))
    return out


@pytest.fixture
def pair() -> Iterator[tuple[distsrv.Server, distsrv.Server]]:
    cluster = pair_cluster(2)
    servers = [distsrv.Server(cluster, job_name="worker", task_index=i) for i in range(2)]
    yield servers[0], servers[1]
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def master(pair: tuple[distsrv.Server, distsrv.Server]) -> Iterator[grpc.Channel]:
    """A channel to the first task of ``pair``, as TensorFlow's session opens one."""
    with grpc.insecure_channel(pair[0].address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


def as_records(devices: Any) -> list[distsrv.DeviceAttributes]:
    return [
        distsrv.DeviceAttributes(
            d.name,
            d.device_type,
            d.memory_limit,
            d.incarnation,
            d.physical_device_desc,
            d.locality.bus_id,
        )
        for d in devices
    ]


# -- the messages --------------------------------------------------------------------------------


def numbers(message: Any) -> dict[str, int]:
    return {field.name: field.number for field in message.DESCRIPTOR.fields}


def test_mirrored_messages_keep_tensorflows_field_numbers() -> None:
    # tensorflow/core/protobuf/master.proto
    assert numbers(tf_pb2.CreateSessionRequest) == {"graph_def": 1, "config": 2, "target": 3}
    assert numbers(tf_pb2.CreateSessionResponse) == {"session_handle": 1, "graph_version": 2}
    assert numbers(tf_pb2.CloseSessionRequest) == {"session_handle": 1}
    assert numbers(tf_pb2.CloseSessionResponse) == {}
    assert numbers(tf_pb2.ListDevicesRequest) == {"session_handle": 1}
    assert numbers(tf_pb2.ListDevicesResponse) == {"local_device": 1, "remote_device": 2}
    # tensorflow/core/protobuf/worker.proto
    assert numbers(tf_pb2.GetStatusRequest) == {}
    assert numbers(tf_pb2.GetStatusResponse) == {"device_attributes": 1}
    # tensorflow/core/framework/graph.proto
    assert numbers(tf_pb2.GraphDef) == {"node": 1}
    assert numbers(tf_pb2.NodeDef) == {"name": 1, "op": 2}
    # tensorflow/core/framework/device_attributes.proto
    assert numbers(distsrv_pb2.DeviceAttributes) == {
        "name": 1,
        "device_type": 2,
        "memory_limit": 4,
        "locality": 5,
        "incarnation": 6,
        "physical_device_desc": 7,
        "xla_global_id": 8,
    }
    incarnation = distsrv_pb2.DeviceAttributes.DESCRIPTOR.fields_by_name["incarnation"]
    assert incarnation.type == incarnation.TYPE_FIXED64
    assert numbers(distsrv_pb2.DeviceLocality) == {"bus_id": 1, "numa_node": 2, "links": 3}


def test_reflection_serves_the_tensorflow_mirrors(master: grpc.Channel) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(master))
    served = pool.FindMessageTypeByName("distsrv.tfcompat.v1.CreateSessionRequest")
    assert {f.name: f.number for f in served.fields} == numbers(tf_pb2.CreateSessionRequest)


# -- WorkerService -------------------------------------------------------------------------------


def test_get_status_at_tensorflows_path_lists_this_tasks_devices(
    pair: tuple[distsrv.Server, distsrv.Server], master: grpc.Channel
) -> None:
    reply = call(master, GET_STATUS, tf_pb2.GetStatusRequest(), tf_pb2.GetStatusResponse)
    assert as_records(reply.device_attributes) == pair[0].local_devices()


def test_get_status_bytes_carry_tensorflows_field_numbers(
    pair: tuple[distsrv.Server, distsrv.Server], master: grpc.Channel
) -> None:
    cpu = pair[0].local_devices()[0]
    reply = raw_call(master, GET_STATUS, b"")
    top = fields(reply)
    # GetStatusResponse: only field 1, device_attributes, length-delimited (key byte 0x0A).
    assert reply[0] == 0x0A
    assert {(number, wire_type) for number, wire_type, _ in top} == {(1, 2)}
    device = {number: (wire_type, value) for number, wire_type, value in fields(top[0][2])}
    assert device[1] == (2, cpu.name.encode())
    assert device[2] == (2, b"CPU")
    assert 3 not in device
    assert device[4] == (0, cpu.memory_limit)
    assert device[5] == (2, b"")  # an empty locality, as TensorFlow gives its CPU
    assert device[6] == (1, cpu.incarnation)  # fixed64: key byte 0x31
    assert b"\x31" + struct.pack("<Q", cpu.incarnation) in top[0][2]
    assert device[8] == (0, 2**64 - 1)  # xla_global_id -1: no XLA id


def test_a_malformed_request_at_a_tensorflow_path_is_refused_and_serving_goes_on(
    master: grpc.Channel,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        raw_call(master, LIST_DEVICES, b"\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    reply = call(master, GET_STATUS, tf_pb2.GetStatusRequest(), tf_pb2.GetStatusResponse)
    assert len(reply.device_attributes) >= 1


@pytest.mark.parametrize(
    "path",
    [
        "/tensorflow.WorkerService/RunGraph",
        "/tensorflow.MasterService/RunStep",
        "/tensorflow.grpc.WorkerService/GetStatus",
    ],
)
def test_what_distsrv_does_not_serve_is_unimplemented(master: grpc.Channel, path: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        raw_call(master, path, b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- MasterService -------------------------------------------------------------------------------


def test_a_session_lists_the_clusters_devices_as_tensorflows_session_does(
    pair: tuple[distsrv.Server, distsrv.Server], master: grpc.Channel
) -> None:
    # What tf.compat.v1.Session(target).list_devices() sends: CreateSession with an empty graph,
    # ListDevices with the handle, then CloseSession.
    created = call(
        master,
        CREATE_SESSION,
        tf_pb2.CreateSessionRequest(graph_def=tf_pb2.GraphDef(), target=pair[0].target),
        tf_pb2.CreateSessionResponse,
    )
    assert created.session_handle
    listed = call(
        master,
        LIST_DEVICES,
        tf_pb2.ListDevicesRequest(session_handle=created.session_handle),
        tf_pb2.ListDevicesResponse,
    )
    assert as_records(listed.local_device) == pair[0].local_devices()
    assert as_records(listed.remote_device) == pair[1].local_devices()
    call(
        master,
        CLOSE_SESSION,
        tf_pb2.CloseSessionRequest(session_handle=created.session_handle),
        tf_pb2.CloseSessionResponse,
    )
    # Closed: TensorFlow's codes for a handle the master does not know.
    with pytest.raises(grpc.RpcError) as info:
        call(
            master,
            CLOSE_SESSION,
            tf_pb2.CloseSessionRequest(session_handle=created.session_handle),
            tf_pb2.CloseSessionResponse,
        )
    assert info.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as info:
        call(
            master,
            LIST_DEVICES,
            tf_pb2.ListDevicesRequest(session_handle=created.session_handle),
            tf_pb2.ListDevicesResponse,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_devices_without_a_session_uses_the_servers_cluster(
    pair: tuple[distsrv.Server, distsrv.Server], master: grpc.Channel
) -> None:
    listed = call(master, LIST_DEVICES, tf_pb2.ListDevicesRequest(), tf_pb2.ListDevicesResponse)
    assert as_records(listed.local_device) + as_records(listed.remote_device) == (
        pair[0].list_devices()
    )


def test_a_config_and_graph_library_in_create_session_are_accepted(
    master: grpc.Channel,
) -> None:
    # TensorFlow fills config (a ConfigProto) and the graph's versions; neither has nodes.
    graph_with_versions = bytes([0x22, 0x02, 0x08, 0x1B])  # GraphDef.versions {producer: 27}
    request = tf_pb2.CreateSessionRequest(
        graph_def=tf_pb2.GraphDef.FromString(graph_with_versions),
        config=bytes([0x10, 0x02]),  # ConfigProto.intra_op_parallelism_threads = 2
        target="grpc://elsewhere:1",
    )
    created = call(master, CREATE_SESSION, request, tf_pb2.CreateSessionResponse)
    assert created.session_handle
    assert created.graph_version == 0


def test_a_graph_with_nodes_is_not_executed(master: grpc.Channel) -> None:
    graph = tf_pb2.GraphDef(node=[tf_pb2.NodeDef(name="x", op="Const")])
    with pytest.raises(grpc.RpcError) as info:
        call(
            master,
            CREATE_SESSION,
            tf_pb2.CreateSessionRequest(graph_def=graph),
            tf_pb2.CreateSessionResponse,
        )
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "distsrv does not execute TensorFlow graphs" in info.value.details()


def test_list_devices_fails_naming_an_unreachable_task() -> None:
    cluster = pair_cluster(2)
    config = distsrv.ServerConfig(connect_timeout=1)
    with (
        distsrv.Server(cluster, job_name="worker", task_index=0, config=config) as server,
        grpc.insecure_channel(server.address) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        call(channel, LIST_DEVICES, tf_pb2.ListDevicesRequest(), tf_pb2.ListDevicesResponse)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "/job:worker/task:1" in info.value.details()


# -- a stock TensorFlow worker, as distsrv sees it -----------------------------------------------


def tf_device(job: str, task: int, incarnation: int) -> Any:
    return distsrv_pb2.DeviceAttributes(
        name=f"/job:{job}/replica:0/task:{task}/device:CPU:0",
        device_type="CPU",
        memory_limit=256 << 20,
        locality=distsrv_pb2.DeviceLocality(),
        incarnation=incarnation,
    )


@pytest.fixture
def tf_worker() -> Iterator[tuple[str, Any]]:
    """A grpcio server that serves only what a stock TensorFlow worker serves here: GetStatus at
    ``/tensorflow.WorkerService/GetStatus`` (and not distsrv's Worker, nor gRPC health)."""
    device = tf_device("tf", 0, incarnation=0x1234_5678_9ABC_DEF1)

    def get_status(request: Any, context: grpc.ServicerContext) -> Any:
        return tf_pb2.GetStatusResponse(device_attributes=[device])

    handler: Callable[..., Any] = grpc.unary_unary_rpc_method_handler(
        get_status,
        request_deserializer=tf_pb2.GetStatusRequest.FromString,
        response_serializer=tf_pb2.GetStatusResponse.SerializeToString,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("tensorflow.WorkerService", {"GetStatus": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", device
    server.stop(grace=0).wait(timeout=10)


def test_status_of_a_tensorflow_worker_comes_through_tensorflows_path(
    tf_worker: tuple[str, Any],
) -> None:
    address, device = tf_worker
    health, task, incarnation, version, devices = _native.query_status(address, 5.0)
    assert health is None  # TensorFlow serves no gRPC health service
    assert task == "/job:tf/task:0"
    assert version is None
    assert incarnation == device.incarnation
    assert [d[0] for d in devices] == [device.name]


def test_a_mixed_cluster_lists_the_tensorflow_tasks_devices_too(
    tf_worker: tuple[str, Any],
) -> None:
    address, device = tf_worker
    (port,) = free_ports(1)
    cluster = {"tf": [address], "worker": [f"127.0.0.1:{port}"]}
    with distsrv.Server(cluster, job_name="worker", task_index=0) as server:
        seen = server.wait_for_cluster(timeout=10)
        listed = server.list_devices(timeout=10)
    assert seen == {"/job:tf/task:0": device.incarnation, "/job:worker/task:0": server.incarnation}
    assert [d.name for d in listed] == [device.name] + [d.name for d in server.local_devices()]


def test_distsrv_status_shows_a_tensorflow_worker(tf_worker: tuple[str, Any]) -> None:
    address, _ = tf_worker
    result = subprocess.run(
        [sys.executable, "-m", "distsrv", "status", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith(address)]
    assert "/job:tf/task:0" in row
    assert "tensorflow" in row
    assert "CPU:0" in row
