"""The ``distsrv`` command as Kubernetes and Slurm run it: ``distsrv serve`` stops gracefully on
SIGTERM and Ctrl-C, serves ``--handlers``, and says in one line what is wrong with a bad
configuration; ``distsrv --version``."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from conftest import read_line

import distsrv
from distsrv.launch import free_ports

TIMEOUT = 30
DISTSRV = [sys.executable, "-m", "distsrv"]


def environment(python_path: pathlib.Path | None = None, **variables: str) -> dict[str, str]:
    """This process's environment without a cluster or security of its own, plus ``variables``
    and ``python_path`` ahead of the PYTHONPATH that finds distsrv here."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "TF_CONFIG" and not name.startswith("DISTSRV_")
    }
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            path for path in (str(python_path), os.environ.get("PYTHONPATH")) if path
        )
    return {**env, **variables}


def write_cluster(directory: pathlib.Path, cluster: object) -> str:
    path = directory / "cluster.json"
    path.write_text(json.dumps(cluster))
    return str(path)


@contextlib.contextmanager
def served(*arguments: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """``distsrv serve`` in a child, once it has said it serves; killed if still running after."""
    with subprocess.Popen(
        [*DISTSRV, "serve", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as process:
        try:
            line = read_line(process, TIMEOUT)
            assert line.startswith("distsrv: serving /job:worker/task:0 at grpc://"), line
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(TIMEOUT)


def stop(process: subprocess.Popen[str], signum: signal.Signals) -> tuple[str, str]:
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    return stdout, stderr


def test_sigterm_stops_gracefully_and_exits_0() -> None:
    (port,) = free_ports(1)
    tf_config = {
        "cluster": {"worker": [f"127.0.0.1:{port}"]},
        "task": {"type": "worker", "index": 0},
    }
    with served(env=environment(TF_CONFIG=json.dumps(tf_config))) as process:
        status = subprocess.run(
            [*DISTSRV, "status", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            env=environment(),
            timeout=TIMEOUT,
        )
        assert status.returncode == 0, status.stderr
        assert "SERVING" in status.stdout
        stdout, _ = stop(process, signal.SIGTERM)
    assert stdout.strip() == "distsrv: stopping /job:worker/task:0 (SIGTERM)"


def test_sigint_stops_gracefully_and_exits_0(tmp_path: pathlib.Path) -> None:
    cluster = write_cluster(tmp_path, {"worker": [f"127.0.0.1:{free_ports(1)[0]}"]})
    arguments = ("--cluster", cluster, "--job", "worker", "--task", "0")
    with served(*arguments, env=environment()) as process:
        stdout, _ = stop(process, signal.SIGINT)
    assert stdout.strip() == "distsrv: stopping /job:worker/task:0 (SIGINT)"


def test_handlers_from_a_dict_and_a_function_are_served(tmp_path: pathlib.Path) -> None:
    (tmp_path / "cli_handlers.py").write_text(
        textwrap.dedent(
            """
            HANDLERS = {"echo": lambda value: value}

            def more_handlers():
                return {"double": lambda value: 2 * value}
            """
        )
    )
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    arguments = (
        *("--cluster", write_cluster(tmp_path, {"worker": addresses})),
        *("--job", "worker", "--task", "0"),
        *("--handlers", "cli_handlers:HANDLERS", "--handlers", "cli_handlers:more_handlers"),
    )
    with served(*arguments, env=environment(python_path=tmp_path)) as process:
        with distsrv.Server({"worker": addresses}, "worker", 1) as caller:
            assert caller.call(("worker", 0), "echo", value="hi", timeout=TIMEOUT) == "hi"
            assert caller.call(("worker", 0), "double", value=21, timeout=TIMEOUT) == 42
        stop(process, signal.SIGTERM)


BAD_HANDLERS = """
NOT_A_DICT = 3
NOT_CALLABLE = {"echo": 3}

def returns_a_list():
    return []
"""

# (arguments, TF_CONFIG, what the error names); "{cluster}" is a valid cluster file of one task,
# "{dir}" the directory it is in.
TASK = ["--job", "worker", "--task", "0"]
CLUSTER = ["--cluster", "{cluster}", *TASK]
BAD_CONFIGURATIONS = {
    "no cluster": ([], None, "TF_CONFIG"),
    "TF_CONFIG not JSON": ([], "{not json", "not valid JSON"),
    "TF_CONFIG not a cluster": (
        [],
        json.dumps({"cluster": {"worker": ["no-port"]}, "task": {"type": "worker", "index": 0}}),
        "'cluster' is not valid",
    ),
    "cluster file missing": (["--cluster", "{dir}/missing.json", *TASK], None, "missing.json"),
    "cluster file not JSON": (["--cluster", "{dir}/not.json", *TASK], None, "not JSON"),
    "cluster file not a mapping": (
        ["--cluster", "{dir}/list.json", *TASK],
        None,
        "job -> addresses",
    ),
    "--cluster without --job": (["--cluster", "{cluster}", "--task", "0"], None, "needs --job"),
    "--cluster without --task": (["--cluster", "{cluster}", "--job", "worker"], None, "--task"),
    "job not in cluster": (["--cluster", "{cluster}", "--job", "ps", "--task", "0"], None, "'ps'"),
    "task not in cluster": (
        ["--cluster", "{cluster}", "--job", "worker", "--task", "3"],
        None,
        "task 3",
    ),
    "handlers without a colon": ([*CLUSTER, "--handlers", "bad_handlers"], None, "MODULE:ATTR"),
    "handlers module missing": (
        [*CLUSTER, "--handlers", "no_such_module:H"],
        None,
        "no_such_module",
    ),
    "handlers attribute missing": (
        [*CLUSTER, "--handlers", "bad_handlers:MISSING"],
        None,
        "'MISSING'",
    ),
    "handlers not a dict": ([*CLUSTER, "--handlers", "bad_handlers:NOT_A_DICT"], None, "callable"),
    "handlers not callable": (
        [*CLUSTER, "--handlers", "bad_handlers:NOT_CALLABLE"],
        None,
        "callable",
    ),
    "handlers function returns no dict": (
        [*CLUSTER, "--handlers", "bad_handlers:returns_a_list"],
        None,
        "callable",
    ),
}


def assert_bad_configuration(result: subprocess.CompletedProcess[str], named: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("distsrv serve: "), line
    assert named in line


@pytest.mark.parametrize(
    ("arguments", "tf_config", "named"),
    BAD_CONFIGURATIONS.values(),
    ids=BAD_CONFIGURATIONS.keys(),
)
def test_bad_configuration_is_one_line_and_exit_status_2(
    tmp_path: pathlib.Path, arguments: list[str], tf_config: str | None, named: str
) -> None:
    cluster = write_cluster(tmp_path, {"worker": [f"127.0.0.1:{free_ports(1)[0]}"]})
    (tmp_path / "not.json").write_text("{worker")
    (tmp_path / "list.json").write_text('["127.0.0.1:2222"]')
    (tmp_path / "bad_handlers.py").write_text(BAD_HANDLERS)
    variables = {} if tf_config is None else {"TF_CONFIG": tf_config}
    result = subprocess.run(
        [*DISTSRV, "serve", *(a.format(cluster=cluster, dir=tmp_path) for a in arguments)],
        capture_output=True,
        text=True,
        env=environment(python_path=tmp_path, **variables),
        timeout=TIMEOUT,
    )
    assert_bad_configuration(result, named)


def test_port_in_use_is_one_line_and_exit_status_2(tmp_path: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cluster = write_cluster(tmp_path, {"worker": [f"127.0.0.1:{taken.getsockname()[1]}"]})
        result = subprocess.run(
            [*DISTSRV, "serve", "--cluster", cluster, "--job", "worker", "--task", "0"],
            capture_output=True,
            text=True,
            env=environment(),
            timeout=TIMEOUT,
        )
    assert_bad_configuration(result, "Address already in use")


def test_version() -> None:
    result = subprocess.run(
        [*DISTSRV, "--version"], capture_output=True, text=True, env=environment(), timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"distsrv {distsrv.__version__}\n"


@pytest.mark.parametrize("command", [[], ["launch"], ["serve"], ["demo"], ["status"]])
def test_help_is_plain_text_and_lists_only_real_commands(command: list[str]) -> None:
    result = subprocess.run(
        [*DISTSRV, *command, "--help"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "==SUPPRESS==" not in result.stdout
    assert "``" not in result.stdout
    assert "demo-worker" not in result.stdout
    if not command:
        for listed in ("demo", "launch", "serve", "status"):
            assert f"    {listed} " in result.stdout
