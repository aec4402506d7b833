"""Rendezvous: tasks that know only their own job and index, how many tasks there are and one
coordinator address (torchrun's environment, Kubernetes JobSets and StatefulSets, Ray) learn
each other's addresses. Read through :meth:`distsrv.ClusterSpec.rendezvous`.

The coordinator task listens on the coordinator address; every task (the coordinator too)
picks a free port of its own and registers it there, over one TCP connection, as a line of
JSON; once all have registered, each gets the whole cluster back. With a token, both sides
prove they hold it without sending it: each message carries an HMAC-SHA256 over the other
side's fresh nonce, so a registration without the token is refused and a forged cluster is not
believed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import time
from collections.abc import Mapping
from typing import Any

from distsrv import _native
from distsrv.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    OpError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = ["host_towards", "rendezvous"]

#: What a registration or an answer may hold, at most: a line of JSON.
MAX_LINE_BYTES = 1 << 20
#: How long past its own timeout a task waits for the coordinator's verdict, which names the
#: tasks that never registered when the coordinator's timeout (begun about when this task's
#: did) passes.
VERDICT_GRACE = 2.0
_ERRORS: dict[str, type[OpError]] = {
    "invalid": InvalidArgumentError,
    "unauthenticated": UnauthenticatedError,
    "deadline": DeadlineExceededError,
}


def rendezvous(
    coordinator: str,
    job: str,
    task_index: int,
    tasks: Mapping[str, int],
    *,
    coordinator_task: tuple[str, int],
    host: str | None = None,
    token: str | None = None,
    timeout: float = 300.0,
) -> dict[str, list[str]]:
    """Every task's address, job by job in index order, once all of ``tasks`` (job -> count)
    have registered with the coordinator at ``coordinator`` ("host:port"), which the task
    ``coordinator_task`` serves. This task's address is a free port of ``host`` (by default, the
    address this host reaches the coordinator from)."""
    expected = {(name, index) for name, count in tasks.items() for index in range(count)}
    if (job, task_index) not in expected:
        raise InvalidArgumentError(
            f"/job:{job}/task:{task_index} is not one of the {len(expected)} tasks"
        )
    if coordinator_task not in expected:
        raise InvalidArgumentError(
            f"the coordinator task {coordinator_task} is not one of the tasks"
        )
    coordinator_host, coordinator_port = _split(coordinator)
    own_host = host or host_towards(coordinator_host, coordinator_port)
    address = _join(own_host, _free_port(own_host))
    deadline = time.monotonic() + timeout
    key = token.encode() if token is not None else None
    if (job, task_index) == coordinator_task:
        listener = socket.create_server((coordinator_host, coordinator_port))
        with listener:
            return _Coordinator(tasks, expected, key, listener, deadline, timeout).run(
                (job, task_index), address
            )
    return _register(coordinator_host, coordinator_port, (job, task_index), address, key, deadline)


def _split(address: str) -> tuple[str, int]:
    try:
        return _native.parse_address(address)
    except ValueError as error:
        raise InvalidArgumentError(f"the coordinator: {error}") from None


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_towards(host: str, port: int) -> str:
    """The local address the route to ``host`` leaves from (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        local: str = probe.getsockname()[0]
        return local


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _mac(key: bytes | None, *parts: str) -> str:
    if key is None:
        return ""
    return hmac.new(key, "\0".join(parts).encode(), hashlib.sha256).hexdigest()


def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _receive(sock: socket.socket, deadline: float) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError("the rendezvous did not complete in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            raise UnavailableError("the rendezvous peer closed the connection")
        data += chunk
        if len(data) > MAX_LINE_BYTES:
            raise InvalidArgumentError("a rendezvous message past its size limit")
    try:
        message = json.loads(data)
    except ValueError:
        raise InvalidArgumentError("a rendezvous message that is not JSON") from None
    if not isinstance(message, dict):
        raise InvalidArgumentError("a rendezvous message that is not a JSON object")
    return message


def _register(
    host: str,
    port: int,
    task: tuple[str, int],
    address: str,
    key: bytes | None,
    deadline: float,
) -> dict[str, list[str]]:
    sock = _connect(host, port, deadline)
    with sock:
        challenge = _receive(sock, deadline)
        server_nonce = str(challenge.get("nonce", ""))
        nonce = secrets.token_hex(16)
        name = f"/job:{task[0]}/task:{task[1]}"
        _send(
            sock,
            {
                "job": task[0],
                "index": task[1],
                "address": address,
                "nonce": nonce,
                "mac": _mac(key, server_nonce, name, address, nonce),
            },
        )
        answer = _receive(sock, deadline + VERDICT_GRACE)
    if "error" in answer:
        kind = _ERRORS.get(str(answer.get("kind")), InvalidArgumentError)
        raise kind(f"the rendezvous at {host}:{port} refused {name}: {answer['error']}")
    cluster = answer.get("cluster")
    if not isinstance(cluster, dict):
        raise InvalidArgumentError("the coordinator's answer holds no cluster")
    mac = str(answer.get("mac", ""))
    if not hmac.compare_digest(mac, _mac(key, nonce, json.dumps(cluster, sort_keys=True))):
        raise UnauthenticatedError("the coordinator's answer does not prove the cluster token")
    return {str(job): [str(address) for address in addresses] for job, addresses in cluster.items()}


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """A connection to the coordinator, which may start after this task does."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(f"no rendezvous coordinator answered at {host}:{port}")
        try:
            return socket.create_connection((host, port), timeout=min(left, 5.0))
        except OSError:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


class _Coordinator:
    """Collects the registrations, then answers every task with the whole cluster."""

    def __init__(
        self,
        tasks: Mapping[str, int],
        expected: set[tuple[str, int]],
        key: bytes | None,
        listener: socket.socket,
        deadline: float,
        timeout: float,
    ) -> None:
        self.tasks = tasks
        self.expected = expected
        self.key = key
        self.listener = listener
        self.deadline = deadline
        self.timeout = timeout
        self.addresses: dict[tuple[str, int], str] = {}
        # The connection of each registered task, with its nonce, to answer once all are in.
        self.waiting: list[tuple[socket.socket, str]] = []
        self.failure: OpError | None = None

    def run(self, me: tuple[str, int], address: str) -> dict[str, list[str]]:
        self.addresses[me] = address
        try:
            while self.failure is None and len(self.addresses) < len(self.expected):
                left = self.deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(self.expected - set(self.addresses))
                    names = ", ".join(f"/job:{job}/task:{index}" for job, index in missing)
                    self.failure = DeadlineExceededError(
                        f"the rendezvous did not complete within {self.timeout:g}s: {names} "
                        "never registered"
                    )
                    break
                self.listener.settimeout(left)
                try:
                    connection, _ = self.listener.accept()
                except TimeoutError:
                    continue
                self._admit(connection)
            if self.failure is not None:
                self._answer_all({"error": str(self.failure), "kind": self._kind(self.failure)})
                raise self.failure
            cluster = {
                job: [self.addresses[(job, index)] for index in range(count)]
                for job, count in self.tasks.items()
            }
            canonical = json.dumps(cluster, sort_keys=True)
            for connection, nonce in self.waiting:
                with contextlib.suppress(OSError):
                    _send(connection, {"cluster": cluster, "mac": _mac(self.key, nonce, canonical)})
            return cluster
        finally:
            for connection, _ in self.waiting:
                connection.close()

    def _admit(self, connection: socket.socket) -> None:
        """Reads one registration; keeps the connection to answer, or refuses it."""
        nonce = secrets.token_hex(16)
        try:
            _send(connection, {"nonce": nonce})
            # One registration at a time: a peer slow to send holds the line for 5 s at most.
            registration = _receive(connection, min(self.deadline, time.monotonic() + 5.0))
            job, index = registration.get("job"), registration.get("index")
            address = registration.get("address")
            client_nonce = str(registration.get("nonce", ""))
            if (
                not isinstance(job, str)
                or not isinstance(index, int)
                or not isinstance(address, str)
            ):
                raise InvalidArgumentError("a registration without job, index and address")
            name = f"/job:{job}/task:{index}"
            mac = _mac(self.key, nonce, name, address, client_nonce)
            if not hmac.compare_digest(str(registration.get("mac", "")), mac):
                raise UnauthenticatedError("the registration does not prove the cluster token")
            if (job, index) not in self.expected:
                raise InvalidArgumentError(f"{name} is not one of the {len(self.expected)} tasks")
        except (OpError, OSError) as refused:
            with contextlib.suppress(OSError):
                _send(connection, {"error": str(refused), "kind": self._kind(refused)})
            connection.close()
            return
        if (job, index) in self.addresses:
            # Two processes think they are the same task: neither can go on.
            self.failure = InvalidArgumentError(f"{name} registered twice")
            self.waiting.append((connection, client_nonce))
            return
        self.addresses[(job, index)] = address
        self.waiting.append((connection, client_nonce))

    def _answer_all(self, message: Mapping[str, Any]) -> None:
        for connection, _ in self.waiting:
            with contextlib.suppress(OSError):
                _send(connection, message)

    @staticmethod
    def _kind(error: BaseException) -> str:
        for kind, cls in _ERRORS.items():
            if isinstance(error, cls):
                return kind
        return "invalid"
