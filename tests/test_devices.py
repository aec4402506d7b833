"""The device registry: each task's own devices named TensorFlow's way, every task's devices
gathered at once, waiting for a cluster whose tasks start in any order (in separate processes),
and ``distsrv status`` on the command line.

Every server binds 127.0.0.1 on free ports; every wait is bounded."""

from __future__ import annotations

import ctypes.util
import json
import pathlib
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import pair_cluster, read_line

import distsrv
from distsrv.errors import DeadlineExceededError, UnavailableError
from distsrv.launch import free_ports

HAS_NVIDIA_GPU = (
    pathlib.Path("/proc/driver/nvidia/gpus").exists()
    or ctypes.util.find_library("nvidia-ml") is not None
)


def physical_memory() -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


@pytest.fixture
def trio() -> Iterator[list[distsrv.Server]]:
    """A running cluster of three workers in this process."""
    cluster = pair_cluster(3)
    servers = [distsrv.Server(cluster, job_name="worker", task_index=i) for i in range(3)]
    yield servers
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An address that accepts connections and never answers, like a hung process."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


# -- this task's devices -------------------------------------------------------------------------


def test_devices_are_named_as_tensorflow_names_them() -> None:
    cluster = pair_cluster(2)
    with distsrv.Server(cluster, job_name="worker", task_index=1) as server:
        devices = server.local_devices()
    cpu, *gpus = devices
    assert cpu.name == "/job:worker/replica:0/task:1/device:CPU:0"
    assert cpu.device_type == "CPU"
    assert cpu.task == "/job:worker/task:1"
    assert 0 < cpu.memory_limit <= physical_memory()
    assert cpu.incarnation != 0
    assert cpu.bus_id == 0  # TensorFlow's CPU device has no specific locality
    for n, gpu in enumerate(gpus):
        assert gpu.name == f"/job:worker/replica:0/task:1/device:GPU:{n}"
        assert gpu.device_type == "GPU"
        assert gpu.physical_device_desc.startswith(f"device: {n}, name: ")
        assert gpu.bus_id >= 1
    assert len({device.incarnation for device in devices}) == len(devices)


@pytest.mark.skipif(HAS_NVIDIA_GPU, reason="this machine has an NVIDIA GPU")
def test_a_machine_without_a_gpu_has_only_the_cpu(local_server: distsrv.Server) -> None:
    (device,) = local_server.local_devices()
    assert device.device_type == "CPU"
    assert device.name == "/job:localhost/replica:0/task:0/device:CPU:0"


def test_device_records_are_frozen_and_compare_by_value(local_server: distsrv.Server) -> None:
    first, second = local_server.local_devices()[0], local_server.local_devices()[0]
    assert first == second
    with pytest.raises(AttributeError):
        first.name = "changed"  # type: ignore[misc]


def test_a_restarted_task_has_new_incarnations() -> None:
    cluster = pair_cluster(2)
    with distsrv.Server(cluster, job_name="worker", task_index=0) as watcher:
        peer = distsrv.Server(cluster, job_name="worker", task_index=1)
        before = watcher.wait_for_cluster(timeout=30)
        old_devices = peer.local_devices()
        assert before["/job:worker/task:1"] == peer.incarnation
        peer.stop()
        with distsrv.Server(cluster, job_name="worker", task_index=1) as restarted:
            after = watcher.wait_for_cluster(timeout=30)
            assert after["/job:worker/task:1"] == restarted.incarnation
            assert after["/job:worker/task:1"] != before["/job:worker/task:1"]
            assert after["/job:worker/task:0"] == before["/job:worker/task:0"]
            new_devices = restarted.local_devices()
            assert [d.name for d in new_devices] == [d.name for d in old_devices]
            assert {d.incarnation for d in new_devices}.isdisjoint(
                d.incarnation for d in old_devices
            )
            # The peer's devices are seen with their new incarnations.
            listed = watcher.list_devices(timeout=10)
            assert [d for d in listed if d.task == "/job:worker/task:1"] == new_devices


# -- the cluster's devices -----------------------------------------------------------------------


def test_every_task_lists_the_whole_clusters_devices(trio: list[distsrv.Server]) -> None:
    expected = [device for server in trio for device in server.local_devices()]
    for server in trio:
        assert server.list_devices(timeout=10) == expected
    assert [device.task for device in expected if device.device_type == "CPU"] == [
        "/job:worker/task:0",
        "/job:worker/task:1",
        "/job:worker/task:2",
    ]


def test_list_devices_names_a_task_that_cannot_be_reached() -> None:
    cluster = pair_cluster(3)
    with (
        distsrv.Server(cluster, job_name="worker", task_index=0) as server,
        distsrv.Server(cluster, job_name="worker", task_index=1),
    ):
        began = time.monotonic()
        with pytest.raises(UnavailableError) as info:
            server.list_devices(timeout=1)
    assert time.monotonic() - began < 5
    message = str(info.value)
    assert "/job:worker/task:2" in message
    assert "/job:worker/task:1" not in message


def test_one_slow_task_does_not_hold_up_the_others(black_hole: str) -> None:
    # Two tasks that accept connections but never answer: asked one after the other, they would
    # take twice the timeout.
    (port,) = free_ports(1)
    cluster = {"worker": [f"127.0.0.1:{port}", black_hole, black_hole]}
    with distsrv.Server(cluster, job_name="worker", task_index=0) as server:
        began = time.monotonic()
        with pytest.raises(UnavailableError) as info:
            server.list_devices(timeout=1.5)
        took = time.monotonic() - began
    assert 1.4 < took < 2.8, f"listing took {took:.2f} s"
    assert "/job:worker/task:1" in str(info.value)
    assert "/job:worker/task:2" in str(info.value)


# -- waiting for the cluster ---------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    import distsrv

    cluster, index = json.loads(sys.argv[1]), int(sys.argv[2])
    with distsrv.Server(cluster, job_name="worker", task_index=index) as server:
        seen = server.wait_for_cluster(timeout=60)
        print(json.dumps({"task": server.task, "incarnation": server.incarnation, "seen": seen}),
              flush=True)
        sys.stdin.readline()  # stay up until every task has seen the others
    """
)


def test_tasks_started_in_random_order_all_see_the_whole_cluster() -> None:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(3)]}
    order = random.sample(range(3), 3)
    children: dict[int, subprocess.Popen[str]] = {}
    try:
        for index in order:
            time.sleep(random.uniform(0.0, 0.8))
            children[index] = subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(cluster), str(index)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        reports = [json.loads(read_line(children[index], timeout=60)) for index in range(3)]
    finally:
        for child in children.values():
            try:
                child.communicate("\n", timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate(timeout=10)
    assert all(child.returncode == 0 for child in children.values()), order
    incarnations = {report["task"]: report["incarnation"] for report in reports}
    assert sorted(incarnations) == [f"/job:worker/task:{i}" for i in range(3)]
    for report in reports:
        assert report["seen"] == incarnations, f"started in order {order}"


def test_wait_for_cluster_names_a_task_that_never_starts_in_bounded_time() -> None:
    cluster = pair_cluster(3)
    with (
        distsrv.Server(cluster, job_name="worker", task_index=0) as server,
        distsrv.Server(cluster, job_name="worker", task_index=2),
    ):
        began = time.monotonic()
        with pytest.raises(DeadlineExceededError) as info:
            server.wait_for_cluster(timeout=2)
        took = time.monotonic() - began
    assert 1.9 < took < 5, f"waiting took {took:.2f} s"
    message = str(info.value)
    assert "/job:worker/task:1" in message
    assert "/job:worker/task:2" not in message


def test_wait_for_cluster_waits_for_a_task_that_starts_late() -> None:
    cluster = pair_cluster(2)
    with distsrv.Server(cluster, job_name="worker", task_index=0) as server:
        # Bound, so connections queue, but not serving until half a second into the wait.
        late = distsrv.Server(cluster, job_name="worker", task_index=1, start=False)
        try:
            starter = threading.Timer(0.5, late.start)
            starter.start()
            seen = server.wait_for_cluster(timeout=30)
            starter.join()
            assert seen == {
                "/job:worker/task:0": server.incarnation,
                "/job:worker/task:1": late.incarnation,
            }
        finally:
            late.stop(grace=0)


def test_a_server_of_another_cluster_at_a_tasks_address_is_not_taken_for_it() -> None:
    ports = free_ports(2)
    ours = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    theirs = {"ps": [f"127.0.0.1:{ports[1]}"]}
    with (
        distsrv.Server(ours, job_name="worker", task_index=0) as server,
        distsrv.Server(theirs, job_name="ps", task_index=0),
    ):
        with pytest.raises(DeadlineExceededError) as info:
            server.wait_for_cluster(timeout=1)
        assert "/job:ps/task:0" in str(info.value)
        with pytest.raises(UnavailableError):
            server.list_devices(timeout=5)


def test_device_queries_need_a_running_server() -> None:
    server = distsrv.Server.create_local_server(start=False)
    try:
        assert server.local_devices()[0].device_type == "CPU"
        with pytest.raises(distsrv.errors.FailedPreconditionError):
            server.list_devices()
        with pytest.raises(distsrv.errors.FailedPreconditionError):
            server.wait_for_cluster(timeout=1)
    finally:
        server.stop()


# -- distsrv status ------------------------------------------------------------------------------


def run_status(*addresses: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distsrv", "status", "--timeout", "3", *addresses],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_prints_each_tasks_health_and_devices(trio: list[distsrv.Server]) -> None:
    result = run_status(*(server.address for server in trio))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ADDRESS",
        "TASK",
        "HEALTH",
        "SERVER",
        "DEVICE",
        "MEMORY",
        "DESCRIPTION",
    ]
    for server in trio:
        (row,) = [line for line in lines if line.startswith(server.address)]
        assert server.task in row
        assert "SERVING" in row
        assert f"distsrv {distsrv.__version__}" in row
        assert "CPU:0" in row
        assert "GiB" in row or "MiB" in row


def test_status_fails_naming_an_address_that_does_not_answer(
    local_server: distsrv.Server, black_hole: str
) -> None:
    (closed,) = free_ports(1)
    result = run_status(local_server.address, f"127.0.0.1:{closed}", black_hole)
    assert result.returncode == 1
    assert local_server.task in result.stdout
    for address in (f"127.0.0.1:{closed}", black_hole):
        (row,) = [line for line in result.stdout.splitlines() if line.startswith(address)]
        assert "UNREACHABLE" in row
        assert f"distsrv: {address}:" in result.stderr


def test_status_accepts_a_tensorflow_target(local_server: distsrv.Server) -> None:
    result = run_status(local_server.target)
    assert result.returncode == 0, result.stderr
    assert local_server.task in result.stdout
