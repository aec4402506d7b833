"""Test hosts: Linux network namespaces joined by one bridge, so that a test can run real
processes at separate addresses and cut, slow or freeze them, the way a cluster fails.

One namespace is the switch: it holds a bridge, and every host namespace is joined to it by a veth
pair (``eth0`` in the host, ``h<i>`` on the bridge). Veth ends are created in their namespaces, so
the root namespace gains nothing but the namespaces themselves, and the addresses, from the
benchmarking range 198.18.0.0/15 (RFC 2544), exist only inside them. Needs root and iproute2.

Namespaces are named ``distsrv-test-<pid>-<serial>-net<subnet>-<sw|h<i>>``: the pid lets a later
run remove what a crashed one left (``remove_stale``); the subnet lets harnesses that exist at once
(concurrent runs) choose different ones. Each has its own switch, so a clash would not mix their
traffic, but distinct addresses keep logs unambiguous.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

PREFIX = "distsrv-test"
_NAME = re.compile(rf"^{PREFIX}-(?P<pid>\d+)-\d+-net(?P<subnet>\d+)-(?:sw|h\d+)$")
#: The /24 subnets of 198.18.0.0/15, and the hosts one holds (.1 to .254).
SUBNETS = 512
MAX_HOSTS = 254
#: Bounds every `ip` and `tc` command, so a wedged one fails a test rather than hanging it.
COMMAND_TIMEOUT = 30.0
#: How long close() waits for a killed process to be reaped.
KILL_TIMEOUT = 5.0

_serials = itertools.count()


class HostsError(RuntimeError):
    """A command that sets up, changes or removes test hosts failed."""


def _tool(name: str) -> str | None:
    """The path of ``name``; /usr/sbin and /sbin count even when not on PATH (sudo, cron)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _command(argv: Sequence[str]) -> str:
    """Runs an `ip` or `tc` command; its stdout, or a HostsError naming it with its stderr."""
    tool = _tool(argv[0])
    if tool is None:
        raise HostsError(f"{argv[0]} not found")
    argv = [tool, *argv[1:]]
    try:
        done = subprocess.run(
            argv, check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
    except subprocess.CalledProcessError as error:
        raise HostsError(
            f"{' '.join(argv)} failed with status {error.returncode}: {error.stderr.strip()}"
        ) from None
    except subprocess.TimeoutExpired:
        raise HostsError(f"{' '.join(argv)} took over {COMMAND_TIMEOUT} s") from None
    return done.stdout


def namespaces() -> list[str]:
    """The names of all network namespaces (`ip netns list` adds "(id: N)" to some)."""
    return [line.split()[0] for line in _command(["ip", "netns", "list"]).splitlines() if line]


def _delete_namespace(name: str) -> None:
    """Kills what runs in the namespace, which would otherwise keep it alive, then deletes it."""
    for pid in _command(["ip", "netns", "pids", name]).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    _command(["ip", "netns", "del", name])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Deletes the namespaces of harnesses whose process is gone (a crash, a SIGKILL); their
    names."""
    removed = []
    for name in namespaces():
        match = _NAME.match(name)
        if match is None or _alive(int(match["pid"])):
            continue
        try:
            _delete_namespace(name)
        except HostsError:
            if name in namespaces():  # else another run removed it first
                raise
        removed.append(name)
    return removed


@functools.cache
def unavailable_reason(*, netem: bool = False) -> str | None:
    """Why test hosts cannot be made here, or None: tries a namespace with a bridge and a veth.
    With ``netem``, also why Host.impair() cannot work: netem is a kernel module (sch_netem) that
    minimal kernels leave out, though namespaces, veths and bridges work."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc") if netem else ("ip",):
        if _tool(tool) is None:
            return f"{tool} (iproute2) not found"
    probe = f"{PREFIX}-{os.getpid()}-{next(_serials)}-net0-sw"
    try:
        _command(["ip", "netns", "add", probe])
        try:
            _command(["ip", "-n", probe, "link", "add", "name", "br0", "type", "bridge"])
            veth = ["type", "veth", "peer", "name", "probe1"]
            _command(["ip", "-n", probe, "link", "add", "name", "probe0", *veth])
            if netem:
                qdisc = ["qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms"]
                try:
                    _command(["tc", "-n", probe, *qdisc])
                except HostsError as error:
                    return f"no netem in this kernel (CONFIG_NET_SCH_NETEM, sch_netem): {error}"
        finally:
            _delete_namespace(probe)
    except HostsError as error:
        return str(error)
    return None


def require_hosts(*, netem: bool = False) -> None:
    """Skips the calling test where test hosts cannot be made here, but fails it in CI (CI=true),
    which must run these tests. With ``netem``, also skips where the kernel has no netem, in CI
    too: the project's machines run a kernel built without it."""
    reason = unavailable_reason()
    if reason is None and netem and (missing := unavailable_reason(netem=True)) is not None:
        pytest.skip(f"Host.impair() is unavailable: {missing}")
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"test hosts are unavailable in CI: {reason}")
    pytest.skip(f"test hosts are unavailable: {reason}")


def freeze(process: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Stops the process (SIGSTOP) like a hung or swapped-out peer: its sockets stay open and the
    kernel still completes TCP handshakes, but nothing answers. Returns once every thread has
    stopped: a thread woken by data before the stop reaches it could still answer."""
    process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not _stopped(process.pid):
        if time.monotonic() > deadline:
            raise HostsError(f"process {process.pid} did not stop within {timeout} s")
        time.sleep(0.001)


def _stopped(pid: int) -> bool:
    """Every thread of the process is stopped; a HostsError if it has exited."""
    states = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(FileNotFoundError):  # a thread that has just exited
            states.append(task.read_text().rsplit(")", 1)[1].split()[0])
    if not states or "Z" in states or "X" in states:
        raise HostsError(f"process {pid} has exited")
    return all(state in ("T", "t") for state in states)


def thaw(process: subprocess.Popen[Any]) -> None:
    """Lets a frozen process run on (SIGCONT)."""
    process.send_signal(signal.SIGCONT)


class Host:
    """One test host: a network namespace with ``address`` on its ``eth0``, and 127.0.0.1."""

    def __init__(
        self,
        name: str,
        address: str,
        switch: str,
        port: str,
        processes: list[subprocess.Popen[Any]],
    ) -> None:
        self.name = name
        self.address = address
        self._switch = switch
        self._port = port  # this host's end of the link on the bridge, in the switch namespace
        self._processes = processes

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address!r})"

    def _exec(self, argv: Sequence[str]) -> list[str]:
        return [_tool("ip") or "ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Starts ``argv`` in this host (environment inherited); its pid is the program's own, as
        `ip netns exec` execs it. TestHosts.close() kills it if it still runs."""
        process = subprocess.Popen(self._exec(argv), **kwargs)
        self._processes.append(process)
        return process

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Runs ``argv`` in this host to completion: subprocess.run, with its arguments."""
        return subprocess.run(self._exec(argv), **kwargs)

    def cut(self) -> None:
        """Takes the host's link down at both ends: packets to and from it are dropped, with no
        reset or ICMP error, so open connections see only silence. New connections fail: a peer's
        after about 3 s with EHOSTUNREACH (ARP goes unanswered); the host's own at once with
        ENETUNREACH, as its route goes down with the link."""
        _command(["ip", "-n", self.name, "link", "set", "eth0", "down"])
        _command(["ip", "-n", self._switch, "link", "set", self._port, "down"])

    def restore(self) -> None:
        """Brings the link back up; open connections resume at TCP's next retransmission."""
        _command(["ip", "-n", self._switch, "link", "set", self._port, "up"])
        _command(["ip", "-n", self.name, "link", "set", "eth0", "up"])

    def impair(self, *, delay_ms: float = 0, loss_percent: float = 0) -> None:
        """Delays and drops packets on the host's link, in each direction (so a round trip to an
        unimpaired host takes 2 * ``delay_ms`` more); replaces any earlier impairment."""
        if delay_ms < 0 or not 0 <= loss_percent <= 100:
            raise ValueError(f"delay_ms={delay_ms}, loss_percent={loss_percent}")
        # netem's queue holds what the delay keeps in flight; its default of 1000 packets would
        # turn a delay into loss at high rates.
        netem = ["netem", "limit", "100000", "delay", f"{delay_ms}ms", "loss", f"{loss_percent}%"]
        for namespace, device in self._link_ends():
            _command(["tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", *netem])

    def clear_impairment(self) -> None:
        """Removes what impair() set, if anything."""
        for namespace, device in self._link_ends():
            if "netem" in _command(["tc", "-n", namespace, "qdisc", "show", "dev", device]):
                _command(["tc", "-n", namespace, "qdisc", "del", "dev", device, "root"])

    def _link_ends(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """(namespace, device) of each end; qdiscs shape what leaves a device, so one at each end
        covers both directions."""
        return (self.name, "eth0"), (self._switch, self._port)


class TestHosts:
    """``count`` hosts on one switch, removed by close(), on leaving ``with``, or at exit."""

    __test__ = False  # a class, not tests, for pytest

    def __init__(self, count: int) -> None:
        if not 1 <= count <= MAX_HOSTS:
            raise ValueError(f"count must be 1 to {MAX_HOSTS}, not {count}")
        remove_stale()
        self._processes: list[subprocess.Popen[Any]] = []
        self._namespaces: list[str] = []  # what close() deletes, in order
        self._hosts: list[Host] = []
        serial = next(_serials)
        subnet = self._free_subnet(start=os.getpid() * 17 + serial)
        net = f"198.{18 + subnet // 256}.{subnet % 256}"
        stem = f"{PREFIX}-{os.getpid()}-{serial}-net{subnet}"
        _open.add(self)
        try:
            switch = self._add_namespace(f"{stem}-sw")
            _command(["ip", "-n", switch, "link", "add", "name", "br0", "type", "bridge"])
            _command(["ip", "-n", switch, "link", "set", "br0", "up"])
            for i in range(count):
                name, port = self._add_namespace(f"{stem}-h{i}"), f"h{i}"
                peer = ["peer", "name", "eth0", "netns", name]
                _command(["ip", "-n", switch, "link", "add", "name", port, "type", "veth", *peer])
                _command(["ip", "-n", switch, "link", "set", port, "master", "br0", "up"])
                _command(["ip", "-n", name, "addr", "add", f"{net}.{i + 1}/24", "dev", "eth0"])
                _command(["ip", "-n", name, "link", "set", "eth0", "up"])
                self._hosts.append(Host(name, f"{net}.{i + 1}", switch, port, self._processes))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _free_subnet(start: int) -> int:
        """The first subnet from ``start`` on that no live harness has. Two harnesses starting at
        once may still take the same one: harmless, as each has its own switch."""
        taken = {int(m["subnet"]) for name in namespaces() if (m := _NAME.match(name))}
        for step in range(SUBNETS):
            if (subnet := (start + step) % SUBNETS) not in taken:
                return subnet
        raise HostsError(f"all {SUBNETS} subnets of 198.18.0.0/15 are taken")

    def _add_namespace(self, name: str) -> str:
        _command(["ip", "netns", "add", name])
        self._namespaces.append(name)
        _command(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def close(self) -> None:
        """Kills the processes popen() started that still run (and closes their pipes), then
        deletes the namespaces, killing whatever else runs there. Safe to call again; a second
        call retries what a failed one left."""
        for process in self._processes:
            if process.poll() is None:
                process.kill()
                # A slow reap must not keep the namespaces below from being deleted.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=KILL_TIMEOUT)
                for pipe in (process.stdin, process.stdout, process.stderr):
                    if pipe is not None:
                        # Closing stdin flushes what a dead process will never read.
                        with contextlib.suppress(OSError):
                            pipe.close()
        self._processes.clear()
        failure: HostsError | None = None
        for name in list(reversed(self._namespaces)):
            try:
                _delete_namespace(name)
            except HostsError as error:
                failure = failure or error
            else:
                self._namespaces.remove(name)
        if failure is not None:
            raise failure
        _open.discard(self)

    def __enter__(self) -> TestHosts:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getitem__(self, index: int) -> Host:
        return self._hosts[index]

    def __len__(self) -> int:
        return len(self._hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self._hosts)


#: Harnesses not yet closed, for the exit hook.
_open: set[TestHosts] = set()


@atexit.register
def _close_all() -> None:
    for hosts in list(_open):
        try:
            hosts.close()
        except HostsError as error:
            print(f"test hosts: {error}", file=sys.stderr)
