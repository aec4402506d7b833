"""The test-host harness itself (tests/hosts.py): hosts reach each other and nothing else, and a
cut, a delay and a frozen process look to TCP the way the tests that use them assume.

Every socket is opened by a child inside a test host, at the hosts' addresses, and has a timeout;
the test process itself opens none.
"""

from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import hosts as harness
import pytest
from hosts import PREFIX, Host, TestHosts, freeze, namespaces, remove_stale, require_hosts, thaw

pytestmark = [pytest.mark.usefixtures("_hosts_available"), pytest.mark.timeout(30)]

#: Listens at the address it is given, prints its port, echoes every connection.
ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys, threading

    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    server = socket.create_server((sys.argv[1], 0))
    print(server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
    """
)

#: Holds one connection open; for each timeout read from stdin, sends a fresh token and prints
#: "echo <seconds>" once it is echoed, or the error's name. Echoes of tokens an earlier timeout
#: gave up on are skipped, so the same connection stays usable.
PROBE = textwrap.dedent(
    """
    import socket, sys, time

    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print("connected", conn.getsockname()[0], flush=True)
    received, serial = b"", 0
    while line := sys.stdin.readline():
        serial += 1
        token = b"%08d\\n" % serial  # fixed width: no token turns up inside another
        conn.settimeout(float(line))
        began = time.monotonic()
        try:
            conn.sendall(token)
            while token not in received:
                data = conn.recv(65536)
                if not data:
                    raise EOFError
                received += data
            received = received.split(token, 1)[1]
            print("echo", time.monotonic() - began, flush=True)
        except (OSError, EOFError) as error:
            print(type(error).__name__, flush=True)
    """
)


@pytest.fixture
def _hosts_available() -> None:
    require_hosts()


@pytest.fixture
def two_hosts() -> Iterator[TestHosts]:
    with TestHosts(2) as hosts:
        yield hosts


def _line(process: subprocess.Popen[str], timeout: float) -> str:
    """The child's next line of stdout, stripped; fails the test if none comes in ``timeout``."""
    assert process.stdout is not None
    if select.select([process.stdout], [], [], timeout)[0]:
        if line := process.stdout.readline():
            return line.strip()
        _, stderr = process.communicate(timeout=5)
        pytest.fail(f"{process.args!r} exited with status {process.returncode}:\n{stderr}")
    pytest.fail(f"{process.args!r} printed nothing within {timeout} s")


def _ip(*args: str) -> str:
    """An `ip` command in the root namespace, which only reads here."""
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


def _echo_server(host: Host) -> tuple[subprocess.Popen[str], int]:
    """An echo server in ``host`` and its port."""
    argv = [sys.executable, "-c", ECHO_SERVER, host.address]
    server = host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return server, int(_line(server, 10))


class Probe:
    """A connection from one host to an echo server, held open so a test can try it after a cut
    or a freeze and see the same connection recover."""

    def __init__(self, host: Host, address: str, port: int) -> None:
        self.process = host.popen(
            [sys.executable, "-c", PROBE, address, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        connected, self.local_address = _line(self.process, 10).split()
        assert connected == "connected"

    def echo(self, timeout: float) -> tuple[str, float]:
        """("echo", seconds the round trip took), or (the error's name, 0)."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{timeout}\n")
        self.process.stdin.flush()
        outcome, *seconds = _line(self.process, timeout + 10).split()
        return outcome, float(seconds[0]) if seconds else 0.0


def test_hosts_reach_each_other_over_tcp(two_hosts: TestHosts) -> None:
    a, b = two_hosts
    assert len(two_hosts) == 2
    assert [host.name for host in two_hosts] == [a.name, b.name]
    _, port = _echo_server(a)
    probe = Probe(b, a.address, port)
    assert probe.local_address == b.address
    assert probe.echo(timeout=5)[0] == "echo"


def test_addresses_exist_only_inside_the_hosts() -> None:
    with TestHosts(2) as hosts, TestHosts(1) as other:
        everyone = [*hosts, *other]
        names = [host.name for host in everyone]
        assert set(names) <= set(namespaces())
        root = _ip("-o", "addr")
        for host in everyone:
            assert f" {host.address}/" not in root
        inside = hosts[0].run(
            ["ip", "-o", "-4", "addr"], check=True, capture_output=True, text=True, timeout=10
        )
        assert re.findall(r"inet (\S+)", inside.stdout) == ["127.0.0.1/8", f"{hosts[0].address}/24"]
        # Two harnesses at once take different subnets.
        assert hosts[0].address.rsplit(".", 1)[0] != other[0].address.rsplit(".", 1)[0]
    assert not set(names) & set(namespaces())


def test_a_cut_is_silence_and_a_restore_resumes_the_connection(two_hosts: TestHosts) -> None:
    a, b = two_hosts
    _, port = _echo_server(a)
    probe = Probe(b, a.address, port)
    assert probe.echo(timeout=5)[0] == "echo"
    a.cut()
    # No reset and no ICMP error, only a timeout.
    assert probe.echo(timeout=0.5)[0] == "TimeoutError"
    a.restore()
    # The same connection, once TCP retransmits (200 ms, then 400 ms... after the first loss).
    assert probe.echo(timeout=5)[0] == "echo"


def test_impair_delays_each_direction(two_hosts: TestHosts) -> None:
    require_hosts(netem=True)
    a, b = two_hosts
    _, port = _echo_server(a)
    probe = Probe(b, a.address, port)
    outcome, seconds = probe.echo(timeout=5)
    assert (outcome, seconds < 0.08) == ("echo", True)
    a.impair(delay_ms=50)
    outcome, seconds = probe.echo(timeout=5)
    assert (outcome, seconds >= 0.095) == ("echo", True), seconds
    a.clear_impairment()
    a.clear_impairment()  # nothing left to clear
    outcome, seconds = probe.echo(timeout=5)
    assert (outcome, seconds < 0.08) == ("echo", True), seconds


class _Raised(Exception):
    pass


def test_close_runs_when_the_block_raises_and_kills_what_runs_there() -> None:
    seen: dict[str, Any] = {}

    def raise_inside() -> None:
        with TestHosts(1) as hosts:
            seen["name"] = hosts[0].name
            seen["child"] = hosts[0].popen(["sleep", "60"])
            # A grandchild close() does not track: deleting the namespace kills it.
            shell = hosts[0].popen(
                ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True
            )
            seen["grandchild"] = int(_line(shell, 10))
            raise _Raised

    with pytest.raises(_Raised):
        raise_inside()
    assert seen["child"].returncode == -signal.SIGKILL
    assert seen["name"] not in namespaces()
    deadline = time.monotonic() + 5
    while not _gone(seen["grandchild"]):
        assert time.monotonic() < deadline, "the grandchild outlived its namespace"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie that init has yet to reap counts)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_frozen_server_is_silent_until_thawed(two_hosts: TestHosts) -> None:
    a, b = two_hosts
    server, port = _echo_server(a)
    probe = Probe(b, a.address, port)
    assert probe.echo(timeout=5)[0] == "echo"
    freeze(server)
    assert probe.echo(timeout=0.5)[0] == "TimeoutError"
    thaw(server)
    assert probe.echo(timeout=5)[0] == "echo"


def test_remove_stale_deletes_only_what_dead_runs_left() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    stale = f"{PREFIX}-{dead.pid}-0-net0-h0"
    try:
        with TestHosts(1) as live:
            _ip("netns", "add", stale)
            assert stale in remove_stale()
            assert stale not in namespaces()
            assert live[0].name in namespaces()
            # Making hosts removes stale ones first.
            _ip("netns", "add", stale)
            with TestHosts(1):
                assert stale not in namespaces()
    finally:
        if stale in namespaces():
            _ip("netns", "del", stale)


def test_require_hosts_skips_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "unavailable_reason", lambda **_: "no ip here")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no ip here"):
        require_hosts()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no ip here"):
        require_hosts()
