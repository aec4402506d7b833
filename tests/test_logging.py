"""What a task does goes to Python's logging under the ``distsrv`` logger: serving, peers coming
up, lost and restarted, stopping; quiet unless the application shows INFO."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import pair_cluster

import distsrv


def wait_for(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in record.getMessage() for record in caplog.records):
        if time.monotonic() > deadline:
            pytest.fail(f"no log record with {text!r}: {[r.getMessage() for r in caplog.records]}")
        time.sleep(0.05)


def test_a_task_logs_its_life_and_its_peers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distsrv")
    spec = pair_cluster(2)
    config = distsrv.ServerConfig(connect_timeout=2.0, peer_timeout=0.5)
    a = distsrv.Server(spec, "worker", 0, config=config)
    b = distsrv.Server(spec, "worker", 1, config=config)
    try:
        wait_for(caplog, f"/job:worker/task:0 serving at {spec.task_address('worker', 0)}")
        a.send("x", np.ones(1), to=b.task, timeout=10)  # a watches b from now on
        wait_for(caplog, "/job:worker/task:1 is up (incarnation ")
        b.stop(grace=0)
        wait_for(caplog, "/job:worker/task:1 stopped")
        wait_for(caplog, "/job:worker/task:1 is gone")
    finally:
        a.stop(grace=0)
        b.stop(grace=0)
    names = {record.name for record in caplog.records if record.name.startswith("distsrv")}
    assert "distsrv.transport.liveness" in names
    assert all(name.startswith("distsrv.") for name in names), names
    assert all(record.levelno == logging.INFO for record in caplog.records if record.name in names)


def test_nothing_is_shown_unless_the_application_asks() -> None:
    script = textwrap.dedent(
        """
        import numpy as np
        import distsrv
        server = distsrv.Server.create_local_server()
        server.send("x", np.ones(1), to=server.task)
        server.recv("x", source=server.task, timeout=10)
        server.stop()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""
