"""Process-level behaviour of distsrv.Server: Ctrl-C while blocked, interpreter exit with servers
running, and multiprocessing with the "spawn" and "fork" start methods.

Every child is bounded by a timeout and binds 127.0.0.1 only. The functions multiprocessing
runs in a child are at module level so that "spawn" can import them.
"""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import textwrap
import time
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import read_line
from grpc_health.v1 import health_pb2, health_pb2_grpc

import distsrv
from distsrv.launch import free_ports

# What a Rust panic, an abort or a crash in a child would print.
CRASH_SIGNS = (
    "panicked",
    "PanicException",
    "Fatal Python error",
    "Segmentation fault",
    "Aborted",
    "core dumped",
    "Traceback",
    "Exception ignored",
)


def start_child(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(
    process: subprocess.Popen[str], timeout: float, stdin: str | None = None
) -> tuple[str, str, float]:
    """Waits for the child to exit: (stdout, stderr, seconds taken); kills it past ``timeout``."""
    began = time.monotonic()
    try:
        stdout, stderr = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate(timeout=10)
        pytest.fail(f"the child did not exit within {timeout} s; stderr:\n{stderr}")
    return stdout, stderr, time.monotonic() - began


# -- Ctrl-C --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "blocking_call",
    [
        "server.join()",
        'server.recv("never", source=server.task)',
        # A collective waits for a member that never comes (nothing listens on port 9).
        'distsrv.Server({"w": ["127.0.0.1:0", "127.0.0.1:9"]}, "w", 0).all_reduce([1.0])',
    ],
    ids=["join", "recv", "all_reduce"],
)
def test_ctrl_c_interrupts_a_blocked_call_promptly(blocking_call: str) -> None:
    child = start_child(
        f"""
        import distsrv
        server = distsrv.Server({{"worker": ["127.0.0.1:0"]}})
        print("ready", flush=True)
        {blocking_call}
        print("returned", flush=True)
        """
    )
    assert read_line(child, timeout=30) == "ready"
    child.send_signal(signal.SIGINT)
    stdout, stderr, took = finish(child, timeout=10)
    assert took < 5, f"the child took {took:.1f} s to react to SIGINT"
    assert child.returncode != 0
    assert "KeyboardInterrupt" in stderr
    assert "returned" not in stdout
    assert "panicked" not in stderr


# -- interpreter exit ----------------------------------------------------------------------------


def test_a_child_exiting_with_servers_running_exits_promptly_and_cleanly() -> None:
    child = start_child(
        """
        import threading
        import numpy as np
        import distsrv

        running = distsrv.Server({"worker": ["127.0.0.1:0"]})
        created = distsrv.Server.create_local_server(start=False)
        running.send("x", np.ones(1000), to=running.task)
        waiting = threading.Event()

        def blocked():
            waiting.set()
            try:
                running.recv("never", source=running.task)
            except distsrv.errors.OpError as error:
                print("receiver:", type(error).__name__, flush=True)

        threading.Thread(target=blocked, daemon=True).start()
        waiting.wait(10)
        print("exiting", running.status, created.status, flush=True)
        """
    )
    stdout, stderr, took = finish(child, timeout=30)
    assert child.returncode == 0, stderr
    assert "exiting running created" in stdout
    assert took < 15
    for sign in CRASH_SIGNS:
        assert sign not in stderr, stderr


def test_exit_with_a_call_in_flight_does_not_wait_out_the_grace() -> None:
    # The stock grpcio client is here, in the parent: grpcio itself can hang at exit with a
    # stream open in its own process, which is not what this test is about.
    child = start_child(
        """
        import sys
        import distsrv

        config = distsrv.ServerConfig(shutdown_grace=60)
        server = distsrv.Server({"worker": ["127.0.0.1:0"]}, config=config)
        print(server.address, flush=True)
        sys.stdin.readline()
        print("exiting", flush=True)
        """
    )
    address = read_line(child, timeout=30)
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=60
        )
        try:
            # SERVING: the Watch is now a call in flight on the child's server.
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stdout, stderr, took = finish(child, timeout=30, stdin="go\n")
            with pytest.raises(grpc.RpcError):
                for _ in watch:  # NOT_SERVING may come first; then the stream is cut
                    pass
        finally:
            watch.cancel()
    assert child.returncode == 0, stderr
    assert "exiting" in stdout
    assert took < 5, f"exit took {took:.1f} s"
    for sign in CRASH_SIGNS:
        assert sign not in stderr, stderr


# -- multiprocessing: spawn ----------------------------------------------------------------------


def _spawned_task(cluster: dict[str, list[str]], index: int, report: Connection) -> None:
    """A spawned child: its own server for worker ``index``, echoing a tensor to worker 0."""
    try:
        with distsrv.Server(cluster, job_name="worker", task_index=index) as server:
            received = server.recv("to_child", source=("worker", 0), timeout=60)
            server.send("to_parent", received * index, to=("worker", 0))
        report.send(("ok", received.shape))
    except BaseException as error:  # reported to the parent, which fails the test
        report.send(("error", repr(error)))
        raise


def test_spawned_children_run_their_own_servers_and_exchange_tensors() -> None:
    context = multiprocessing.get_context("spawn")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(3)]}
    children = []
    with distsrv.Server(cluster, job_name="worker", task_index=0) as server:
        for index in (1, 2):
            reader, writer = context.Pipe(duplex=False)
            child = context.Process(target=_spawned_task, args=(cluster, index, writer))
            child.start()
            writer.close()
            children.append((index, child, reader))
        try:
            array = np.arange(24, dtype=np.float64).reshape(4, 6)
            for index, _, _ in children:
                # Waits (up to the config's connect_timeout) for the child's server to be up.
                server.send("to_child", array, to=("worker", index))
            for index, _, _ in children:
                back = server.recv("to_parent", source=("worker", index), timeout=60)
                assert back.dtype == np.float64
                np.testing.assert_array_equal(back, array * index)
            for index, child, reader in children:
                assert reader.poll(60), f"worker {index} did not report"
                assert reader.recv() == ("ok", (4, 6))
                child.join(timeout=30)
                assert child.exitcode == 0, f"worker {index} exited with {child.exitcode}"
        finally:
            for _, child, reader in children:
                if child.is_alive():
                    child.kill()
                    child.join(timeout=10)
                reader.close()


# -- multiprocessing: fork -----------------------------------------------------------------------


def _forked_task(server: distsrv.Server, report: Connection) -> None:
    """A forked child: the parent's server must refuse promptly; a new one of its own works."""
    outcome: dict[str, Any] = {}
    uses = {
        "recv": lambda: server.recv("x", source=server.task, timeout=30),
        "send": lambda: server.send("x", np.ones(3), to=server.task),
        "irecv": lambda: server.irecv("x", source=server.task, timeout=30),
        "join": lambda: server.join(timeout=30),
        "start": server.start,
        "stop": server.stop,
    }
    for name, use in uses.items():
        began = time.monotonic()
        try:
            use()
            outcome[name] = ("returned", time.monotonic() - began, "")
        except BaseException as error:
            outcome[name] = (type(error).__name__, time.monotonic() - began, str(error))
    try:
        with distsrv.Server({"child": ["127.0.0.1:0"]}) as own:
            own.send("y", np.arange(5), to=own.task)
            outcome["own"] = own.recv("y", source=own.task, timeout=10).tolist()
    except BaseException as error:
        outcome["own"] = repr(error)
    report.send(outcome)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
# JAX, imported by the session's other tests, warns at every fork of its process.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_a_server_used_after_fork_fails_clearly_and_the_child_can_make_its_own() -> None:
    context = multiprocessing.get_context("fork")
    with distsrv.Server({"parent": ["127.0.0.1:0"]}) as server:
        server.send("before", np.arange(3), to=server.task)
        reader, writer = context.Pipe(duplex=False)
        child = context.Process(target=_forked_task, args=(server, writer))
        child.start()
        writer.close()
        try:
            assert reader.poll(60), "the forked child did not report (hung?)"
            outcome = reader.recv()
            child.join(timeout=30)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join(timeout=10)
            reader.close()
        for name in ("recv", "send", "irecv", "join", "start", "stop"):
            kind, took, message = outcome[name]
            assert kind == "FailedPreconditionError", (name, kind, message)
            assert took < 1.0, (name, took)
            assert "fork" in message, message
        assert outcome["own"] == [0, 1, 2, 3, 4]
        # The parent's server is untouched: still running, its inbox and exchange work.
        assert server.status == "running"
        assert server.recv("before", source=server.task, timeout=5).tolist() == [0, 1, 2]
        server.send("after", np.arange(2), to=server.task)
        assert server.recv("after", source=server.task, timeout=5).tolist() == [0, 1]


# -- a handle's result is taken once ------------------------------------------------------------


# In a child because the failure this guards against is a deadlock with the GIL held (a second
# wait() re-locked the handle's state while the guard of the first lock was still alive), which
# no timeout inside the test process could interrupt.
def test_waiting_twice_on_a_finished_handle_raises_instead_of_hanging() -> None:
    child = start_child(
        """
        import numpy as np
        import distsrv

        server = distsrv.Server({"worker": ["127.0.0.1:0"]})
        handle = server.irecv("x", source=server.task, timeout=5)
        server.send("x", np.arange(3), to=server.task)
        print("first", handle.wait(5).tolist(), flush=True)
        try:
            handle.wait(1)
        except distsrv.errors.FailedPreconditionError:
            print("second: FailedPreconditionError", flush=True)
        """
    )
    stdout, stderr, _ = finish(child, timeout=30)
    assert child.returncode == 0, stderr
    assert "first [0, 1, 2]" in stdout
    assert "second: FailedPreconditionError" in stdout
