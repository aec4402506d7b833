"""Stock TensorFlow as a real client and a real peer of distsrv. Runs only where TensorFlow is
installed (``pip install tensorflow-cpu``); tests/test_tensorflow_compat.py checks the same wire
with stock grpcio clients everywhere."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import pair_cluster

import distsrv
from distsrv import _native
from distsrv.launch import free_ports

with warnings.catch_warnings():
    # TensorFlow's import warns about its own dependencies; the suite turns warnings into errors.
    warnings.simplefilter("ignore")
    tf = pytest.importorskip(
        "tensorflow",
        reason="TensorFlow is not installed: `make develop` installs tensorflow-cpu (the "
        "tensorflow extra) where PyPI has a wheel for it, Linux on x86-64 only",
    )
    from tensorflow.core.framework import device_attributes_pb2

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tensorflow_get_status_response() -> Any:
    """TensorFlow's GetStatusResponse (worker.proto: field 1, repeated DeviceAttributes), built
    on TensorFlow's own DeviceAttributes: TensorFlow's Python package does not ship worker_pb2."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.Default()
    name = "distsrv_test.GetStatusResponse"
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="distsrv_test/get_status.proto",
        package="distsrv_test",
        syntax="proto3",
        dependency=[device_attributes_pb2.DESCRIPTOR.name],
    )
    message = file.message_type.add(name="GetStatusResponse")
    message.field.add(
        name="device_attributes",
        number=1,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        type_name=".tensorflow.DeviceAttributes",
    )
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


@pytest.fixture
def pair() -> Iterator[list[distsrv.Server]]:
    cluster = pair_cluster(2)
    servers = [distsrv.Server(cluster, job_name="worker", task_index=i) for i in range(2)]
    yield servers
    for server in servers:
        server.stop(grace=0)


def test_a_tensorflow_session_lists_a_distsrv_clusters_devices(
    pair: list[distsrv.Server],
) -> None:
    with tf.compat.v1.Session(pair[0].target) as session:
        listed = session.list_devices()
    expected = pair[0].list_devices(timeout=10)
    # TensorFlow's Python wrapper reports the fixed64 incarnation as a signed int64.
    assert [
        (d.name, d.device_type, d.memory_limit_bytes, d.incarnation % 2**64) for d in listed
    ] == [(d.name, d.device_type, d.memory_limit, d.incarnation) for d in expected]


def test_tensorflows_own_messages_decode_our_get_status(pair: list[distsrv.Server]) -> None:
    with grpc.insecure_channel(pair[0].address) as channel:
        get_status = channel.unary_unary(
            "/tensorflow.WorkerService/GetStatus",
            # GetStatusRequest has no fields: its encoding is empty.
            request_serializer=bytes,
            response_deserializer=_tensorflow_get_status_response().FromString,
        )
        reply: Any = get_status(b"", timeout=10)
    assert [
        (d.name, d.device_type, d.memory_limit, d.incarnation) for d in reply.device_attributes
    ] == [(d.name, d.device_type, d.memory_limit, d.incarnation) for d in pair[0].local_devices()]


def test_distsrv_inspects_a_stock_tensorflow_server() -> None:
    ports = free_ports(2)
    cluster = {"tf": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{ports[1]}"]}
    # Kept referenced: TensorFlow cannot stop its server, which serves until the process ends.
    tf_server = tf.distribute.Server(cluster, job_name="tf", task_index=0, start=True)
    assert tf_server.target == f"grpc://127.0.0.1:{ports[0]}"
    _, task, _, version, devices = _native.query_status(f"127.0.0.1:{ports[0]}", 10.0)
    assert (task, version) == ("/job:tf/task:0", None)
    assert "/job:tf/replica:0/task:0/device:CPU:0" in [d[0] for d in devices]
    with distsrv.Server(cluster, job_name="worker", task_index=0) as server:
        server.wait_for_cluster(timeout=30)
        names = [d.name for d in server.list_devices(timeout=10)]
    assert "/job:tf/replica:0/task:0/device:CPU:0" in names
    assert "/job:worker/replica:0/task:0/device:CPU:0" in names
