"""distsrv.Server: construction with TensorFlow's defaulting rules, addresses and ports, the
lifecycle state machine, threads, ServerConfig validation, and the Rust -> distsrv.errors mapping.

The wire itself (health, reflection, malformed bodies) is tested in test_wire.py; process-level
behaviour (Ctrl-C, interpreter exit, fork and spawn) in test_process.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import distsrv_pb2
import distsrv_pb2_grpc
import grpc
import numpy as np
import pytest

import distsrv
from distsrv import errors
from distsrv.launch import free_ports

HAS_PROC = os.path.isdir("/proc/self/task")

MakeServer = Callable[..., distsrv.Server]


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    """``distsrv.Server(...)``, stopped at teardown whatever the test did."""
    servers: list[distsrv.Server] = []

    def make(*args: Any, **kwargs: Any) -> distsrv.Server:
        server = distsrv.Server(*args, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(grace=0)


def get_status(address: str, timeout: float = 10.0) -> Any:
    """GetStatus from a stock grpcio client, over a fresh channel."""
    with grpc.insecure_channel(address) as channel:
        return distsrv_pb2_grpc.WorkerStub(channel).GetStatus(
            distsrv_pb2.GetStatusRequest(), timeout=timeout, wait_for_ready=True
        )


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Polls ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        # A thread may end between the listing and the read.
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/self/task/{tid}/comm") as comm,
        ):
            names.append(comm.read().strip())
    return names


def distsrv_threads() -> int:
    """Threads of servers' runtimes, which are named after their task."""
    return sum(name.startswith("distsrv") for name in thread_names())


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def other_local_addresses() -> list[str]:
    """IPv4 addresses of this machine, other than 127.0.0.1, that a socket can bind."""
    candidates = ["127.0.0.2"]  # Linux routes all of 127/8 to the loopback interface.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # Connecting a UDP socket sends nothing; it only picks the outgoing interface.
            probe.connect(("192.0.2.123", 9))
            candidates.append(probe.getsockname()[0])
        except OSError:
            pass
    usable = []
    for address in candidates:
        if address.startswith("127.0.0.1") or address in usable:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((address, 0))
            except OSError:
                continue
        usable.append(address)
    return usable


def connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


# -- construction: TensorFlow's _make_server_def rules -------------------------------------------


def test_job_and_task_are_inferred_when_the_cluster_leaves_one_choice(
    make_server: MakeServer,
) -> None:
    server = make_server({"worker": ["127.0.0.1:0"]})
    assert (server.job_name, server.task_index) == ("worker", 0)
    assert server.task == "/job:worker/task:0"
    assert (server.server_def.job_name, server.server_def.task_index) == ("worker", 0)
    assert server.server_def.protocol == "grpc"


def test_the_only_task_of_a_sparse_job_is_inferred(make_server: MakeServer) -> None:
    server = make_server({"worker": {3: "127.0.0.1:0"}})
    assert (server.job_name, server.task_index) == ("worker", 3)


def test_task_is_inferred_within_an_explicit_job(make_server: MakeServer) -> None:
    ps_port, worker_port = free_ports(2)
    cluster = {"ps": [f"127.0.0.1:{ps_port}"], "worker": [f"127.0.0.1:{worker_port}"]}
    server = make_server(cluster, job_name="ps")
    assert (server.job_name, server.task_index, server.port) == ("ps", 0, ps_port)


@pytest.mark.parametrize(
    "cluster_input",
    [
        lambda cluster: cluster,
        distsrv.ClusterSpec,
        lambda cluster: distsrv.ClusterSpec(cluster).as_cluster_def(),
    ],
    ids=["dict", "ClusterSpec", "ClusterDef"],
)
def test_every_cluster_form_is_accepted(
    make_server: MakeServer, cluster_input: Callable[[dict[str, list[str]]], Any]
) -> None:
    server = make_server(cluster_input({"worker": ["127.0.0.1:0"]}))
    assert server.status == "running"
    assert server.job_name == "worker"


def test_a_cluster_with_several_jobs_needs_an_explicit_job_name() -> None:
    cluster = {"ps": ["127.0.0.1:0"], "worker": ["127.0.0.1:0"]}
    with pytest.raises(ValueError, match=re.escape("Must specify an explicit `job_name`.")):
        distsrv.Server(cluster)


def test_a_job_with_several_tasks_needs_an_explicit_task_index() -> None:
    cluster = {"worker": ["127.0.0.1:0", "127.0.0.1:0"]}
    with pytest.raises(ValueError, match=re.escape("Must specify an explicit `task_index`.")):
        distsrv.Server(cluster, job_name="worker")


def test_an_unknown_job_without_a_task_index_is_tensorflows_value_error() -> None:
    # TensorFlow looks up the task indices of the named job first, which raises ValueError.
    with pytest.raises(ValueError, match="No such job in cluster"):
        distsrv.Server({"worker": ["127.0.0.1:0"]}, job_name="ps")


def test_something_that_is_not_a_cluster_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        distsrv.Server(42)


def test_a_server_def_is_used_with_explicit_arguments_overriding_its_fields(
    make_server: MakeServer,
) -> None:
    ps, worker0, worker1 = free_ports(3)
    cluster = distsrv.ClusterSpec(
        {
            "ps": [f"127.0.0.1:{ps}"],
            "worker": [f"127.0.0.1:{worker0}", f"127.0.0.1:{worker1}"],
        }
    ).as_cluster_def()
    definition = distsrv.ServerDef(
        cluster=cluster, job_name="ps", task_index=0, protocol="grpc+tls"
    )
    server = make_server(definition, job_name="worker", task_index=1, protocol="grpc")
    assert (server.job_name, server.task_index, server.port) == ("worker", 1, worker1)
    assert server.server_def.protocol == "grpc"
    assert server.server_def.job_name == "worker"


def test_a_server_def_without_overrides_is_used_as_is(make_server: MakeServer) -> None:
    (port,) = free_ports(1)
    definition = distsrv.ServerDef(
        cluster=distsrv.ClusterSpec({"worker": {2: f"127.0.0.1:{port}"}}).as_cluster_def(),
        job_name="worker",
        task_index=2,
    )
    server = make_server(definition)
    assert (server.job_name, server.task_index, server.port) == ("worker", 2, port)
    # An empty protocol means TensorFlow's default.
    assert server.server_def.protocol == "grpc"


def test_the_port_of_a_server_def_overrides_the_clusters(make_server: MakeServer) -> None:
    in_cluster, override = free_ports(2)
    definition = distsrv.ServerDef(
        cluster=distsrv.ClusterSpec({"worker": [f"127.0.0.1:{in_cluster}"]}).as_cluster_def(),
        job_name="worker",
        task_index=0,
        port=override,
    )
    server = make_server(definition)
    assert server.port == override
    assert server.address == f"127.0.0.1:{override}"
    assert server.server_def.port == override
    assert port_is_free("127.0.0.1", in_cluster)


def test_server_def_bytes_round_trip_and_rebuild_the_same_server(make_server: MakeServer) -> None:
    (other,) = free_ports(1)
    server = make_server(
        {"ps": ["127.0.0.1:0"], "worker": {1: f"127.0.0.1:{other}"}}, job_name="ps"
    )
    data = server.server_def.SerializeToString()
    parsed = distsrv.ServerDef.FromString(data)
    assert parsed == server.server_def
    assert parsed.port == server.port
    assert dict(parsed.cluster.job[0].tasks) == {0: server.address}
    assert dict(parsed.cluster.job[1].tasks) == {1: f"127.0.0.1:{other}"}
    # The bytes describe the bound server: stopped, it can be rebuilt from them on its port.
    server.stop()
    again = make_server(parsed)
    assert (again.job_name, again.task_index, again.port) == ("ps", 0, server.port)


# -- create_local_server -------------------------------------------------------------------------


def test_create_local_server_is_localhost_task_0_on_a_real_port() -> None:
    with distsrv.Server.create_local_server() as server:
        assert (server.job_name, server.task_index) == ("localhost", 0)
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert int(port) == server.port != 0
        assert server.target == f"grpc://127.0.0.1:{server.port}"
        assert server.status == "running"
        status = get_status(server.address)
        assert (status.task.job, status.task.index) == ("localhost", 0)


def test_create_local_server_takes_config_and_start() -> None:
    config = distsrv.ServerConfig(connection_limit=3, worker_threads=1)
    server = distsrv.Server.create_local_server(config=config, start=False)
    try:
        assert server.status == "created"
        assert server.config is config
        assert server.connection_limit == 3
        assert server.port != 0
        server.start()
        assert server.status == "running"
    finally:
        server.stop()


# -- addresses and ports -------------------------------------------------------------------------


@pytest.mark.parametrize("start", [True, False])
def test_port_0_reports_the_bound_port_everywhere(make_server: MakeServer, start: bool) -> None:
    (other,) = free_ports(1)
    server = make_server(
        {"worker": ["127.0.0.1:0", f"127.0.0.1:{other}"]},
        job_name="worker",
        task_index=0,
        start=start,
    )
    port = server.port
    assert port != 0
    assert server.address == f"127.0.0.1:{port}"
    assert server.listen_address == f"127.0.0.1:{port}"
    assert server.target == f"grpc://127.0.0.1:{port}"
    definition = server.server_def
    assert definition.port == port
    assert dict(definition.cluster.job[0].tasks) == {
        0: f"127.0.0.1:{port}",
        1: f"127.0.0.1:{other}",
    }
    assert server.cluster_spec.task_address("worker", 0) == f"127.0.0.1:{port}"
    # The port is really held, whether or not serving has begun.
    assert not port_is_free("127.0.0.1", port)


@pytest.mark.parametrize("start", [True, False])
def test_a_port_in_use_is_unavailable_naming_the_address(
    make_server: MakeServer, start: bool
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        threads = distsrv_threads() if HAS_PROC else 0
        with pytest.raises(errors.UnavailableError, match=re.escape(f"127.0.0.1:{port}")) as info:
            distsrv.Server({"worker": [f"127.0.0.1:{port}"]}, start=start)
        assert info.value.error_code == errors.UNAVAILABLE
        if HAS_PROC:
            # An earlier test's runtime may still be winding down: fewer threads is fine.
            left = wait_until(lambda: distsrv_threads() <= threads)
            assert left, f"a failed construction left threads running: {thread_names()}"
    # Nothing of the failed attempt holds on: once the port is free the same cluster works.
    server = make_server({"worker": [f"127.0.0.1:{port}"]})
    assert server.port == port
    assert server.status == "running"


def test_a_port_held_by_another_server_is_refused_and_that_server_keeps_serving(
    make_server: MakeServer,
) -> None:
    first = make_server({"worker": ["127.0.0.1:0"]})
    with pytest.raises(errors.UnavailableError, match=re.escape(first.address)):
        distsrv.Server({"worker": [first.address]})
    assert first.status == "running"
    assert get_status(first.address).incarnation == first.incarnation


@pytest.mark.parametrize(
    "arguments",
    [
        {"job_name": "ps", "task_index": 0},
        {"job_name": "worker", "task_index": 1},
        {"job_name": "worker", "task_index": 0, "protocol": "grpc+tls"},
        {"job_name": "worker", "task_index": 0, "protocol": "http"},
    ],
    ids=["unknown-job", "unknown-task", "protocol-grpc+tls", "protocol-http"],
)
def test_a_task_not_in_the_spec_or_an_unknown_protocol_is_invalid_and_binds_nothing(
    arguments: dict[str, Any],
) -> None:
    (port,) = free_ports(1)
    with pytest.raises(errors.InvalidArgumentError) as info:
        distsrv.Server({"worker": [f"127.0.0.1:{port}"]}, **arguments)
    assert info.value.error_code == errors.INVALID_ARGUMENT
    assert port_is_free("127.0.0.1", port)


def test_a_config_that_is_not_a_server_config_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="ServerConfig"):
        distsrv.Server({"worker": ["127.0.0.1:0"]}, config={"connection_limit": 1})


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_an_ipv6_server_in_brackets(make_server: MakeServer) -> None:
    server = make_server({"worker": ["[::1]:0"]})
    port = server.port
    assert port != 0
    assert server.address == f"[::1]:{port}"
    assert server.listen_address == f"[::1]:{port}"
    assert server.target == f"grpc://[::1]:{port}"
    assert server.server_def.port == port
    assert dict(server.server_def.cluster.job[0].tasks) == {0: f"[::1]:{port}"}
    status = get_status(server.address)
    assert status.incarnation == server.incarnation


@pytest.mark.parametrize("other", other_local_addresses() or ["none"])
def test_only_the_host_in_the_spec_is_bound(make_server: MakeServer, other: str) -> None:
    if other == "none":
        pytest.skip("this machine has no local IPv4 address besides 127.0.0.1")
    server = make_server({"worker": ["127.0.0.1:0"]})
    assert connects("127.0.0.1", server.port)
    assert not connects(other, server.port), f"127.0.0.1's server answered on {other}"


def test_all_interfaces_are_bound_only_when_the_spec_says_so(make_server: MakeServer) -> None:
    server = make_server({"worker": ["0.0.0.0:0"]})
    assert server.address == f"0.0.0.0:{server.port}"
    assert server.listen_address == f"0.0.0.0:{server.port}"
    for host in ["127.0.0.1", *other_local_addresses()]:
        assert connects(host, server.port), host


# -- lifecycle -----------------------------------------------------------------------------------


def test_status_goes_created_running_closed() -> None:
    server = distsrv.Server({"worker": ["127.0.0.1:0"]}, start=False)
    try:
        assert server.status == "created"
        server.start()
        assert server.status == "running"
        incarnation = server.incarnation
        server.start()  # idempotent
        assert server.status == "running"
        assert get_status(server.address).incarnation == incarnation
        server.stop()
        assert server.status == "closed"
        server.stop()  # idempotent
        server.close()
        assert server.status == "closed"
        with pytest.raises(errors.FailedPreconditionError, match="closed"):
            server.start()
        assert server.status == "closed"
    finally:
        server.stop()


def test_a_server_stopped_before_starting_is_closed_and_frees_its_port() -> None:
    server = distsrv.Server({"worker": ["127.0.0.1:0"]}, start=False)
    port = server.port
    server.stop()
    assert server.status == "closed"
    assert server.join(timeout=0) is True
    assert port_is_free("127.0.0.1", port)
    with pytest.raises(errors.FailedPreconditionError):
        server.start()


def test_repr_names_task_address_and_status() -> None:
    server = distsrv.Server.create_local_server(start=False)
    assert repr(server) == f"<distsrv.Server /job:localhost/task:0 at {server.address} (created)>"
    server.stop()
    assert repr(server).endswith("(closed)>")


def test_join_with_a_timeout_returns_false_while_running(make_server: MakeServer) -> None:
    server = make_server({"worker": ["127.0.0.1:0"]})
    began = time.monotonic()
    assert server.join(timeout=0.2) is False
    waited = time.monotonic() - began
    assert 0.19 <= waited < 2.0
    assert server.status == "running"


def test_join_returns_true_once_another_thread_stops_the_server(make_server: MakeServer) -> None:
    server = make_server({"worker": ["127.0.0.1:0"]})
    joined: list[bool] = []
    joiner = threading.Thread(target=lambda: joined.append(server.join()))
    joiner.start()
    joiner.join(timeout=0.3)
    assert joiner.is_alive(), "join() returned while the server was running"
    server.stop()
    joiner.join(timeout=5)
    assert not joiner.is_alive(), "join() did not return after stop()"
    assert joined == [True]
    assert server.join(timeout=0) is True


def test_context_manager_returns_the_server_and_stops_it() -> None:
    with distsrv.Server.create_local_server() as server:
        assert isinstance(server, distsrv.Server)
        assert server.status == "running"
    assert server.status == "closed"
    assert port_is_free("127.0.0.1", server.port)


def test_context_manager_stops_the_server_when_the_body_raises() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), distsrv.Server.create_local_server() as server:
        raise Boom
    assert server.status == "closed"


def test_a_new_server_on_the_same_port_works_at_once_after_stop() -> None:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    incarnations = set()
    # One client channel across all servers: each stop leaves that connection's socket behind.
    with grpc.insecure_channel(address) as channel:
        stub = distsrv_pb2_grpc.WorkerStub(channel)
        for _ in range(4):
            server = distsrv.Server({"worker": [address]})
            try:
                assert server.port == port
                status = stub.GetStatus(
                    distsrv_pb2.GetStatusRequest(), timeout=10, wait_for_ready=True
                )
                assert status.incarnation == server.incarnation
                incarnations.add(status.incarnation)
            finally:
                server.stop()
            assert server.status == "closed"
    assert len(incarnations) == 4


def test_several_threads_stop_query_and_join_at_once(make_server: MakeServer) -> None:
    server = make_server({"worker": ["127.0.0.1:0"]})
    count = 8
    barrier = threading.Barrier(count)
    failures: list[BaseException] = []
    results: list[tuple[bool, str]] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            assert server.status in ("running", "closing", "closed")
            if index % 2:
                server.stop()
            else:
                server.join(timeout=0.01)
                server.stop(grace=0)
            stopped = server.join(timeout=10)
            with lock:
                results.append((stopped, server.status))
        except BaseException as error:  # reported below, with the thread's own traceback
            with lock:
                failures.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert results == [(True, "closed")] * count


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to count threads")
def test_several_threads_starting_at_once_start_one_runtime(make_server: MakeServer) -> None:
    config = distsrv.ServerConfig(worker_threads=2)
    server = make_server({"worker": ["127.0.0.1:0"]}, config=config, start=False)
    before = distsrv_threads()
    barrier = threading.Barrier(6)
    failures: list[BaseException] = []

    def starter() -> None:
        try:
            barrier.wait(timeout=10)
            server.start()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=starter) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []
    assert server.status == "running"
    assert wait_until(lambda: distsrv_threads() - before == 2), thread_names()
    server.stop()
    assert wait_until(lambda: distsrv_threads() == before), thread_names()


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to count threads")
def test_the_servers_threads_go_away_after_stop() -> None:
    # Servers of earlier tests may still be winding down: count from a quiet start.
    assert wait_until(lambda: distsrv_threads() == 0), thread_names()
    before = len(os.listdir("/proc/self/task"))
    for _ in range(3):
        server = distsrv.Server.create_local_server(config=distsrv.ServerConfig(worker_threads=3))
        assert wait_until(lambda: distsrv_threads() >= 3), thread_names()
        server.send("x", np.arange(4), to=server.task)
        assert server.recv("x", source=server.task, timeout=5).tolist() == [0, 1, 2, 3]
        server.stop()
    assert wait_until(lambda: len(os.listdir("/proc/self/task")) <= before), thread_names()
    assert distsrv_threads() == 0


def test_stop_with_a_waiting_receive_cancels_it(make_server: MakeServer) -> None:
    server = make_server({"worker": ["127.0.0.1:0"]})
    outcome: list[BaseException] = []

    def receive() -> None:
        try:
            server.recv("never", source=server.task, timeout=30)
        except BaseException as error:
            outcome.append(error)

    receiver = threading.Thread(target=receive)
    receiver.start()
    receiver.join(timeout=0.2)
    assert receiver.is_alive(), f"recv did not wait: {outcome}"
    began = time.monotonic()
    server.stop()
    receiver.join(timeout=10)
    assert not receiver.is_alive()
    assert time.monotonic() - began < 5
    assert len(outcome) == 1
    assert isinstance(outcome[0], errors.CancelledError), repr(outcome[0])


def test_stop_does_not_wait_for_an_idle_connection_that_never_spoke_http2() -> None:
    config = distsrv.ServerConfig(shutdown_grace=2.0)
    server = distsrv.Server.create_local_server(config=config)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            # Connections are accepted in order: once a later one is served, this one is open.
            get_status(server.address)
            began = time.monotonic()
            server.stop()
            assert time.monotonic() - began < 1.0
    finally:
        server.stop(grace=0)


# -- ServerConfig --------------------------------------------------------------------------------


def test_server_config_defaults_are_valid_and_sensible() -> None:
    config = distsrv.ServerConfig()
    assert config.connect_timeout > 0
    assert config.shutdown_grace > 0
    assert 0 < config.chunk_bytes <= config.max_message_bytes
    assert config.max_pending_bytes >= config.max_message_bytes
    assert config.connection_limit > 0
    assert config.worker_threads >= 1


def test_server_config_repr_shows_every_field() -> None:
    config = distsrv.ServerConfig(connection_limit=7, shutdown_grace=0.5)
    text = repr(config)
    assert text.startswith("ServerConfig(")
    for field in dataclasses.fields(config):
        assert f"{field.name}={getattr(config, field.name)!r}" in text
    assert "connection_limit=7" in text


def test_server_config_is_immutable() -> None:
    config = distsrv.ServerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.connection_limit = 1  # type: ignore[misc]


def test_zero_timeouts_are_allowed(make_server: MakeServer) -> None:
    config = distsrv.ServerConfig(connect_timeout=0, shutdown_grace=0)
    server = make_server({"worker": ["127.0.0.1:0"]}, config=config)
    assert server.config.shutdown_grace == 0
    assert server.status == "running"


BAD_CONFIG_FIELDS = [
    ("connect_timeout", -1.0),
    ("connect_timeout", math.nan),
    ("connect_timeout", "1"),
    ("connect_timeout", None),
    ("connect_timeout", True),
    ("shutdown_grace", -0.5),
    ("shutdown_grace", "5"),
    ("max_message_bytes", 0),
    ("max_message_bytes", -1),
    ("max_message_bytes", 1.5),
    ("max_message_bytes", True),
    ("chunk_bytes", 0),
    ("chunk_bytes", -4096),
    ("chunk_bytes", 4096.0),
    ("max_pending_bytes", 0),
    ("max_pending_bytes", -1),
    ("connection_limit", 0),
    ("connection_limit", -3),
    ("connection_limit", 2.0),
    ("connection_limit", "8"),
    ("max_connections_per_address", 0),
    ("max_connections_per_address", 1.5),
    ("peer_share", 0),
    ("peer_share", 2.0),
    ("peer_share", "half"),
    ("peer_share", float("nan")),
    ("peer_share", True),
    ("worker_threads", 0),
    ("worker_threads", -2),
    ("worker_threads", None),
    ("worker_threads", True),
]


@pytest.mark.parametrize(("field", "value"), BAD_CONFIG_FIELDS)
def test_server_config_refuses_zero_negative_and_ill_typed_fields(field: str, value: Any) -> None:
    with pytest.raises(errors.InvalidArgumentError, match=field):
        distsrv.ServerConfig(**{field: value})


def test_a_server_raises_the_open_file_limit_to_the_hard_limit() -> None:
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = textwrap.dedent(
        f"""
        import resource
        import distsrv
        resource.setrlimit(resource.RLIMIT_NOFILE, ({min(soft, 256)}, {hard}))
        server = distsrv.Server.create_local_server()
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        server.stop(grace=0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert int(done.stdout.split()[-1]) == hard


def test_max_pending_bytes_may_not_exceed_the_machines_memory() -> None:
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(errors.InvalidArgumentError, match="memory"):
        distsrv.ServerConfig(max_pending_bytes=memory + 1)
    assert distsrv.ServerConfig().max_pending_bytes <= memory // 2


def test_chunk_bytes_may_not_exceed_max_message_bytes() -> None:
    with pytest.raises(errors.InvalidArgumentError, match="chunk_bytes"):
        distsrv.ServerConfig(chunk_bytes=2048, max_message_bytes=1024)
    config = distsrv.ServerConfig(chunk_bytes=1024, max_message_bytes=1024)
    assert config.chunk_bytes == config.max_message_bytes


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("connect_timeout", math.inf),
        ("shutdown_grace", 1e300),
        ("max_pending_bytes", 2**64),
        ("connection_limit", 2**62),
    ],
)
def test_a_config_that_validates_makes_a_working_server(field: str, value: Any) -> None:
    """Either ServerConfig refuses a value, or a Server runs with it; never a late surprise."""
    try:
        config = distsrv.ServerConfig(**{field: value})
    except errors.InvalidArgumentError:
        return
    server = distsrv.Server.create_local_server(config=config)
    try:
        assert server.status == "running"
    finally:
        server.stop(grace=0)


# -- distsrv.errors: what the Rust side raises ---------------------------------------------------


def _port_in_use(make_server: MakeServer) -> None:
    first = make_server({"worker": ["127.0.0.1:0"]})
    distsrv.Server({"worker": [first.address]})


def _start_after_stop(make_server: MakeServer) -> None:
    server = make_server({"worker": ["127.0.0.1:0"]})
    server.stop()
    server.start()


def _recv_after_stop(make_server: MakeServer) -> None:
    server = make_server({"worker": ["127.0.0.1:0"]})
    server.stop()
    server.recv("x", source=server.task, timeout=1)


def _recv_timeout(make_server: MakeServer) -> None:
    server = make_server({"worker": ["127.0.0.1:0"]})
    server.recv("never", source=server.task, timeout=0.05)


def _negative_join_timeout(make_server: MakeServer) -> None:
    make_server({"worker": ["127.0.0.1:0"]}).join(timeout=-1)


def _negative_grace(make_server: MakeServer) -> None:
    make_server({"worker": ["127.0.0.1:0"]}).stop(grace=-1)


def _send_to_a_task_not_in_the_cluster(make_server: MakeServer) -> None:
    server = make_server({"worker": ["127.0.0.1:0"]})
    server.send("x", np.zeros(2), to=("ps", 0))


def _rust_protocol_check(make_server: MakeServer) -> None:
    # The Rust core checks the protocol too; reach it past the Python check.
    distsrv._native.Server(
        {"worker": {0: "127.0.0.1:0"}}, "worker", 0, "http", 0, distsrv.ServerConfig()
    )


def _unresolvable_host(make_server: MakeServer) -> None:
    distsrv.Server({"worker": ["no-such-host.invalid:0"]})


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        (_port_in_use, errors.UnavailableError),
        (_unresolvable_host, errors.UnavailableError),
        (_start_after_stop, errors.FailedPreconditionError),
        (_recv_after_stop, errors.FailedPreconditionError),
        (_recv_timeout, errors.DeadlineExceededError),
        (_negative_join_timeout, errors.InvalidArgumentError),
        (_negative_grace, errors.InvalidArgumentError),
        (_send_to_a_task_not_in_the_cluster, errors.InvalidArgumentError),
        (_rust_protocol_check, errors.InvalidArgumentError),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_rust_errors_are_the_distsrv_errors_class_of_their_code(
    make_server: MakeServer, cause: Callable[[MakeServer], None], expected: type[errors.OpError]
) -> None:
    with pytest.raises(errors.OpError) as info:
        cause(make_server)
    error = info.value
    assert type(error) is expected
    assert error.error_code == errors.error_code_from_exception_type(expected)
    assert type(error) is errors.exception_type_from_error_code(error.error_code)
    assert error.message
    assert str(error) == error.message


def test_a_connection_that_sends_nothing_is_closed_and_others_are_served() -> None:
    # Slow-loris: connections that never speak would hold a descriptor each for ever.
    config = distsrv.ServerConfig(peer_timeout=0.5)
    with distsrv.Server.create_local_server(config) as server:
        host, port = server.address.rsplit(":", 1)
        # Each read waits at most 10 s: a connection left open fails the test by timing out.
        silent = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
        try:
            for connection in silent:
                # The server's HTTP/2 settings may come first; then the connection ends.
                while connection.recv(4096):
                    pass
        finally:
            for connection in silent:
                connection.close()
        with grpc.insecure_channel(server.address) as channel:
            reply = distsrv_pb2_grpc.WorkerStub(channel).GetStatus(
                distsrv_pb2.GetStatusRequest(), timeout=10
            )
        assert reply.incarnation == server.incarnation
