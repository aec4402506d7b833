"""distsrv.messages: TensorFlow's wire bytes for JobDef/ClusterDef/ServerDef, without protobuf.

Expected bytes are written out from TensorFlow's field numbers (cluster.proto,
tensorflow_server.proto): ClusterDef.job = 1; JobDef.name = 1, JobDef.tasks = 2 as
map<int32, string> entries (key = 1, value = 2); ServerDef.cluster = 1, job_name = 2,
task_index = 3, protocol = 5, port = 6. Encoders are canonical proto3: fields in number order,
map entries in key order, default scalars (a map key of 0, a task_index or port of 0) omitted.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from distsrv.messages import ClusterDef, JobDef, ServerDef


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def varint_field(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def task_entry(index: int, address: str, *, write_zero_key: bool = False) -> bytes:
    key = varint_field(1, index) if index or write_zero_key else b""
    return length_delimited(2, key + length_delimited(2, address.encode()))


def job_bytes(name: str, tasks: dict[int, str]) -> bytes:
    return length_delimited(1, name.encode()) + b"".join(
        task_entry(index, address) for index, address in sorted(tasks.items())
    )


TWO_JOBS = ClusterDef(
    job=(
        JobDef("ps", {0: "ps0:2222"}),
        JobDef("worker", {2: "w2:2222", 0: "w0:2222"}),
    )
)


# --- Wire bytes.


def test_single_task_cluster_def_bytes_literally() -> None:
    definition = ClusterDef(job=(JobDef("local", {0: "localhost:2222"}),))
    assert definition.SerializeToString() == (
        b"\x0a\x19"  # ClusterDef.job (1), 25 bytes
        b"\x0a\x05local"  # JobDef.name (1)
        b"\x12\x10"  # JobDef.tasks (2), one entry of 16 bytes
        b"\x12\x0elocalhost:2222"  # entry value (2); key 0 is the default and omitted
    )


def test_two_job_cluster_def_bytes() -> None:
    expected = length_delimited(1, job_bytes("ps", {0: "ps0:2222"})) + length_delimited(
        1, job_bytes("worker", {0: "w0:2222", 2: "w2:2222"})
    )
    assert TWO_JOBS.SerializeToString() == expected
    # Non-zero keys are written: entry for task 2 is 12 0b 08 02 12 07 "w2:2222".
    assert b"\x12\x0b\x08\x02\x12\x07w2:2222" in expected


def test_many_tasks_encode_in_index_order() -> None:
    # A hash map would emit these in a varying order; the bytes must be deterministic.
    tasks = {index: f"h{index}:{1000 + index}" for index in (9, 3, 200, 0, 17, 128, 1)}
    definition = ClusterDef(job=(JobDef("worker", tasks),))
    assert definition.SerializeToString() == length_delimited(1, job_bytes("worker", tasks))


def test_empty_job_and_empty_cluster_bytes() -> None:
    assert ClusterDef().SerializeToString() == b""
    assert ClusterDef(job=(JobDef("worker", {}),)).SerializeToString() == b"\x0a\x08\x0a\x06worker"


def test_job_def_bytes() -> None:
    job = JobDef("worker", {0: "w0:2222", 2: "w2:2222"})
    assert job.SerializeToString() == job_bytes("worker", {0: "w0:2222", 2: "w2:2222"})
    assert JobDef("ps", {}).SerializeToString() == b"\x0a\x02ps"


def test_server_def_bytes() -> None:
    server_def = ServerDef(TWO_JOBS, "worker", 2, "grpc", 2222)
    expected = (
        length_delimited(1, TWO_JOBS.SerializeToString())
        + length_delimited(2, b"worker")
        + varint_field(3, 2)
        + length_delimited(5, b"grpc")
        + varint_field(6, 2222)
    )
    assert server_def.SerializeToString() == expected
    assert expected.endswith(b"\x2a\x04grpc\x30\xae\x11")  # protocol (5), port (6) = 2222
    # protobuf's keyword, which callers of TensorFlow's messages pass.
    for deterministic in (True, False):
        assert server_def.SerializeToString(deterministic=deterministic) == expected
        assert (
            TWO_JOBS.SerializeToString(deterministic=deterministic)
            == expected[2:][: len(TWO_JOBS.SerializeToString())]
        )
        job = TWO_JOBS.job[0]
        assert job.SerializeToString(deterministic=deterministic) == job.SerializeToString()


def test_server_def_bytes_omit_zero_task_index_and_port() -> None:
    cluster = ClusterDef(job=(JobDef("local", {0: "localhost:0"}),))
    server_def = ServerDef(cluster, "local", 0, "grpc")
    assert server_def.port == 0
    assert server_def.SerializeToString() == (
        length_delimited(1, cluster.SerializeToString())
        + length_delimited(2, b"local")
        + length_delimited(5, b"grpc")
    )


# --- Decoding, including the way TensorFlow's C++/Python protobuf writes the same messages.


def test_cluster_def_round_trip() -> None:
    copy = ClusterDef.FromString(TWO_JOBS.SerializeToString())
    assert copy == TWO_JOBS
    assert [job.name for job in copy.job] == ["ps", "worker"]
    assert dict(copy.job[1].tasks) == {0: "w0:2222", 2: "w2:2222"}


def test_cluster_def_from_tensorflow_style_bytes() -> None:
    # C++ protobuf writes a map entry's key even when it is 0, and may order entries freely.
    tensorflow_bytes = length_delimited(
        1,
        length_delimited(1, b"worker")
        + task_entry(2, "w2:2222")
        + task_entry(0, "w0:2222", write_zero_key=True),
    )
    definition = ClusterDef.FromString(tensorflow_bytes)
    assert definition == ClusterDef(job=(JobDef("worker", {0: "w0:2222", 2: "w2:2222"}),))


def test_server_def_round_trip() -> None:
    server_def = ServerDef(TWO_JOBS, "worker", 2, "grpc", 2222)
    assert ServerDef.FromString(server_def.SerializeToString()) == server_def
    local = ServerDef(
        ClusterDef(job=(JobDef("localhost", {0: "localhost:0"}),)), "localhost", 0, "grpc"
    )
    assert ServerDef.FromString(local.SerializeToString()) == local


def test_server_def_from_tensorflow_bytes_skips_fields_distsrv_does_not_use() -> None:
    # default_session_config (4) and cluster_device_filters (7) exist in TensorFlow's ServerDef.
    tensorflow_bytes = (
        length_delimited(1, TWO_JOBS.SerializeToString())
        + length_delimited(2, b"ps")
        + length_delimited(4, varint_field(2, 1))
        + length_delimited(5, b"grpc")
        + length_delimited(7, b"")
    )
    server_def = ServerDef.FromString(tensorflow_bytes)
    assert server_def == ServerDef(TWO_JOBS, "ps", 0, "grpc", 0)


def test_job_def_round_trip() -> None:
    job = JobDef("worker", {0: "w0:2222", 5: "[::1]:2225"})
    assert JobDef.FromString(job.SerializeToString()) == job
    assert JobDef.FromString(b"\x0a\x02ps") == JobDef("ps", {})


def test_from_string_accepts_bytes_like() -> None:
    data = TWO_JOBS.SerializeToString()
    assert ClusterDef.FromString(bytearray(data)) == TWO_JOBS
    assert ClusterDef.FromString(memoryview(data)) == TWO_JOBS


@pytest.mark.parametrize("data", [b"\xff\xff", b"\x0a\x05ab", b"\x0a\x80"])
def test_garbage_bytes_are_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        ClusterDef.FromString(data)
    with pytest.raises(ValueError, match=r"."):
        ServerDef.FromString(data)


@pytest.mark.parametrize("data", ["\x0a\x02ps", 5, None])
def test_from_string_refuses_non_bytes(data: Any) -> None:
    with pytest.raises(TypeError, match="expected bytes"):
        ClusterDef.FromString(data)
    with pytest.raises(TypeError, match="expected bytes"):
        JobDef.FromString(data)


# --- The objects themselves.


def test_job_def_tasks_are_sorted_and_read_only() -> None:
    source = {3: "h3:1", 1: "h1:1"}
    job = JobDef("w", source)
    source[9] = "h9:1"
    assert list(job.tasks) == [1, 3]
    with pytest.raises(TypeError):
        job.tasks[5] = "h5:1"  # type: ignore[index]


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        TWO_JOBS.job = ()  # type: ignore[misc]
    server_def = ServerDef(TWO_JOBS, "ps", 0, "grpc")
    with pytest.raises(AttributeError):
        server_def.port = 1  # type: ignore[misc]


def test_equality_and_hash() -> None:
    a = ServerDef(TWO_JOBS, "worker", 2, "grpc", 5)
    b = ServerDef(ClusterDef(job=list(TWO_JOBS.job)), "worker", 2, "grpc", 5)  # type: ignore[arg-type]
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != ServerDef(TWO_JOBS, "worker", 1, "grpc", 5)
    assert JobDef("w", {0: "a:1", 1: "b:1"}) == JobDef("w", {1: "b:1", 0: "a:1"})
    assert hash(JobDef("w", {0: "a:1", 1: "b:1"})) == hash(JobDef("w", {1: "b:1", 0: "a:1"}))
    assert JobDef("w", {0: "a:1"}) != JobDef("w", {0: "b:1"})
    assert ClusterDef(job=(JobDef("a"), JobDef("b"))) != ClusterDef(job=(JobDef("b"), JobDef("a")))


def test_defaults_are_protobufs() -> None:
    assert JobDef() == JobDef("", {})
    assert ClusterDef().job == ()
    assert ServerDef() == ServerDef(ClusterDef(), "", 0, "", 0)


def test_repr_is_readable() -> None:
    assert (
        repr(JobDef("ps", {1: "h:1", 0: "h:0"})) == "JobDef(name='ps', tasks={0: 'h:0', 1: 'h:1'})"
    )
    assert repr(ClusterDef(job=(JobDef("ps", {0: "h:0"}),))) == (
        "ClusterDef(job=(JobDef(name='ps', tasks={0: 'h:0'}),))"
    )
    assert repr(ServerDef(ClusterDef(), "ps", 1, "grpc", 7)) == (
        "ServerDef(cluster=ClusterDef(job=()), job_name='ps', task_index=1, protocol='grpc', "
        "port=7)"
    )


def test_pickle_round_trip() -> None:
    server_def = ServerDef(TWO_JOBS, "worker", 2, "grpc", 5)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(server_def, protocol=protocol))
        assert copy == server_def
        assert list(copy.cluster.job[1].tasks) == [0, 2]


def test_duplicate_job_names_are_value_error() -> None:
    with pytest.raises(ValueError, match="job 'ps' appears twice"):
        ClusterDef(job=(JobDef("ps", {0: "a:1"}), JobDef("ps", {1: "b:1"})))


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    [
        (JobDef, {"name": 1}, TypeError, "JobDef.name must be a str"),
        (JobDef, {"tasks": [(0, "a:1")]}, TypeError, "JobDef.tasks must be a mapping"),
        (JobDef, {"tasks": {"0": "a:1"}}, TypeError, "task index of job '' must be an int"),
        (JobDef, {"tasks": {True: "a:1"}}, TypeError, "task index of job '' must be an int"),
        (JobDef, {"tasks": {0: b"a:1"}}, TypeError, "address of task 0 of job '' must be"),
        (JobDef, {"tasks": {2**31: "a:1"}}, ValueError, r"out of range \[0, 2147483647\]"),
        (JobDef, {"tasks": {-1: "a:1"}}, ValueError, r"task index of job '' -1 is out of range"),
        (ClusterDef, {"job": ("ps",)}, TypeError, "ClusterDef.job must hold JobDef"),
        (ServerDef, {"cluster": {}}, TypeError, "ServerDef.cluster must be a ClusterDef"),
        (ServerDef, {"job_name": None}, TypeError, "ServerDef.job_name must be a str"),
        (ServerDef, {"task_index": "0"}, TypeError, "ServerDef.task_index must be an int"),
        (ServerDef, {"protocol": 1}, TypeError, "ServerDef.protocol must be a str"),
        (ServerDef, {"task_index": -1}, ValueError, r"ServerDef.task_index -1 is out of range"),
        (ServerDef, {"port": -1}, ValueError, r"ServerDef.port -1 is out of range \[0, 65535\]"),
        (ServerDef, {"port": 65536}, ValueError, r"ServerDef.port 65536 is out of range"),
    ],
)
def test_field_types_are_checked_like_protobuf(
    cls: type[Any], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        cls(**kwargs)
