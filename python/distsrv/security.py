"""``distsrv.Security``: what a task trusts, shaped like dask.distributed's ``Security``."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

from distsrv import _native
from distsrv.errors import InvalidArgumentError

__all__ = ["TLS_ENV", "TOKEN_ENV", "Security"]

#: The environment variable a cluster token is read from when none is given.
TOKEN_ENV = "DISTSRV_TOKEN"
#: The environment variables of the TLS files, read when none are given.
TLS_ENV = {"ca": "DISTSRV_TLS_CA", "cert": "DISTSRV_TLS_CERT", "key": "DISTSRV_TLS_KEY"}

PathLike = str | os.PathLike[str]
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class Security:
    """What a task trusts, and what it shows its peers.

    - A cluster **token**: a shared secret that every call to the task must carry and that the
      task presents on every call it makes (gRPC metadata ``authorization: Bearer <token>``).
      Given directly, read from ``token_file`` (surrounding white space stripped), or from
      ``$DISTSRV_TOKEN``; visible ASCII with no spaces.
    - **TLS** (rustls), mutual: ``tls_ca_file`` (the CA that every peer's certificate must chain
      to), ``tls_cert`` and ``tls_key`` (this task's certificate, shown as server and as client;
      it must name the host peers dial). Read from ``$DISTSRV_TLS_CA``, ``$DISTSRV_TLS_CERT`` and
      ``$DISTSRV_TLS_KEY`` when none are given. ``require_encryption=True`` refuses to go without.

    A call that lacks either is refused (``UNAUTHENTICATED`` for the token, a failed TLS
    handshake for a certificate), on every service: distsrv's, reflection, TensorFlow's. Health
    checks stay open to token-less probes unless ``open_health=False``. Pass the object as
    ``Server(..., security=...)``; without one a server admits every caller over plaintext.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        token_file: PathLike | None = None,
        tls_ca_file: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        require_encryption: bool = False,
        open_health: bool = True,
    ) -> None:
        if token is not None and token_file is not None:
            raise InvalidArgumentError("give a token or a token_file, not both")
        tls_files: tuple[PathLike | None, ...] = (tls_ca_file, tls_cert, tls_key)
        given = token is not None or token_file is not None or any(tls_files)
        if token_file is not None:
            token = _read(token_file, "a token").decode("ascii", "replace").strip()
        elif not given:
            token = os.environ.get(TOKEN_ENV) or None
            tls_files = tuple(os.environ.get(TLS_ENV[part]) for part in ("ca", "cert", "key"))
        if token is not None and (
            not isinstance(token, str) or not token or not all("!" <= c <= "~" for c in token)
        ):
            raise InvalidArgumentError("a cluster token is visible ASCII characters, no spaces")
        if any(tls_files) and not all(tls_files):
            raise InvalidArgumentError("TLS needs all of tls_ca_file, tls_cert and tls_key")
        tls: tuple[bytes, bytes, bytes] | None = None
        if all(tls_files):
            ca, cert, key = (_read(path, "TLS material") for path in tls_files if path is not None)
            tls = (ca, cert, key)
        if tls is None and require_encryption:
            raise InvalidArgumentError("require_encryption needs tls_ca_file, tls_cert, tls_key")
        if token is None and tls is None:
            raise InvalidArgumentError(
                f"Security needs a cluster token or TLS files: give token=, token_file= or the "
                f"tls_ files, or set ${TOKEN_ENV}"
            )
        for name, flag in (
            ("open_health", open_health),
            ("require_encryption", require_encryption),
        ):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(f"{name} must be a bool, not {flag!r}")
        self._token = token
        self._tls_files = tls_files if tls is not None else None
        self._tls_pem = tls
        self._open_health = open_health

    @classmethod
    def temporary(cls, hosts: Sequence[str] = _LOCAL_HOSTS) -> Security:
        """A fresh random token and a fresh CA with one certificate of it for ``hosts``, for a
        local cluster whose tasks all share them: hand them to each task with ``env()``. The
        files live in a private temporary folder while this object does."""
        return cls._issue(hosts, [None])[0]

    @classmethod
    def temporary_for_tasks(
        cls, tasks: Sequence[str], hosts: Sequence[str] = _LOCAL_HOSTS
    ) -> dict[str, Security]:
        """Like :meth:`temporary`, with a certificate per task (``"/job:worker/task:0"``), each
        bound to its task: a peer that authenticates with it may send tensors, call and shake
        hands only as that task (``PermissionDeniedError`` otherwise). All share one token and
        CA."""
        return dict(zip(tasks, cls._issue(hosts, list(tasks)), strict=True))

    @classmethod
    def _issue(cls, hosts: Sequence[str], tasks: list[str | None]) -> list[Security]:
        token = secrets.token_urlsafe(32)
        issued = []
        for pems in _native.temporary_tls(list(hosts), list(tasks)):
            directory = tempfile.mkdtemp(prefix="distsrv-tls-")  # private: mode 0700
            paths = [Path(directory) / name for name in ("ca.pem", "cert.pem", "key.pem")]
            for path, pem in zip(paths, pems, strict=True):
                path.touch(mode=0o600)
                path.write_bytes(pem)
            security = cls(token, tls_ca_file=paths[0], tls_cert=paths[1], tls_key=paths[2])
            weakref.finalize(security, shutil.rmtree, directory, ignore_errors=True)
            issued.append(security)
        return issued

    @classmethod
    def from_env(cls) -> Security | None:
        """The security ``$DISTSRV_TOKEN`` and ``$DISTSRV_TLS_*`` describe; None if unset."""
        names = (TOKEN_ENV, *TLS_ENV.values())
        return cls() if any(os.environ.get(name) for name in names) else None

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def tls_pem(self) -> tuple[bytes, bytes, bytes] | None:
        """The CA, certificate and key, PEM-encoded, as read at construction."""
        return self._tls_pem

    @property
    def open_health(self) -> bool:
        return self._open_health

    def env(self) -> dict[str, str]:
        """The environment that gives a child process the same security (``Security()`` reads
        it)."""
        environ = {TOKEN_ENV: self._token} if self._token is not None else {}
        if self._tls_files is not None:
            for part, path in zip(("ca", "cert", "key"), self._tls_files, strict=True):
                if path is not None:
                    environ[TLS_ENV[part]] = os.fspath(path)
        return environ

    def __repr__(self) -> str:
        # Never the token itself: reprs end up in logs.
        token = "None" if self._token is None else f"<{len(self._token)} characters>"
        tls = self._tls_pem is not None
        return f"Security(token={token}, tls={tls}, open_health={self._open_health})"


def _read(path: PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise InvalidArgumentError(f"cannot read {what} from {path}: {error}") from None
