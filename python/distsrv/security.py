"""``distsrv.Security``: what a task trusts, shaped like dask.distributed's ``Security``."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from distsrv.errors import InvalidArgumentError

__all__ = ["TOKEN_ENV", "Security"]

#: The environment variable a cluster token is read from when none is given.
TOKEN_ENV = "DISTSRV_TOKEN"


class Security:
    """A cluster token: a shared secret that every call to a task must carry, and that the task
    presents on every call to its peers (gRPC metadata ``authorization: Bearer <token>``). A call
    without it is refused with ``UNAUTHENTICATED`` before its body is read, on every service:
    distsrv's, reflection, and TensorFlow's. Health checks stay open unless ``open_health=False``
    (probes and load balancers ask them).

    The token is given directly, read from ``token_file`` (surrounding white space stripped), or
    read from ``$DISTSRV_TOKEN``. It is visible ASCII with no spaces. Pass the object as
    ``Server(..., security=...)``; without one a server admits every caller, as before.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        token_file: str | os.PathLike[str] | None = None,
        open_health: bool = True,
    ) -> None:
        if token is not None and token_file is not None:
            raise InvalidArgumentError("give a token or a token_file, not both")
        if token_file is not None:
            try:
                token = Path(token_file).read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError) as error:
                raise InvalidArgumentError(
                    f"cannot read a token from {token_file}: {error}"
                ) from None
        elif token is None:
            token = os.environ.get(TOKEN_ENV)
        if not token:
            raise InvalidArgumentError(
                f"Security needs a cluster token: give token= or token_file=, or set ${TOKEN_ENV}"
            )
        if not isinstance(token, str) or not all("!" <= c <= "~" for c in token):
            raise InvalidArgumentError("a cluster token is visible ASCII characters, no spaces")
        if not isinstance(open_health, bool):
            raise InvalidArgumentError(f"open_health must be a bool, not {open_health!r}")
        self._token = token
        self._open_health = open_health

    @classmethod
    def temporary(cls) -> Security:
        """A fresh random token, for a local cluster: hand it to every task (``env()``)."""
        return cls(secrets.token_urlsafe(32))

    @property
    def token(self) -> str:
        return self._token

    @property
    def open_health(self) -> bool:
        return self._open_health

    def env(self) -> dict[str, str]:
        """The environment that gives a child process this token (``Security()`` reads it)."""
        return {TOKEN_ENV: self._token}

    def __repr__(self) -> str:
        # Never the token itself: reprs end up in logs.
        return f"Security(token=<{len(self._token)} characters>, open_health={self._open_health})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Security):
            return NotImplemented
        return secrets.compare_digest(self._token, other._token) and (
            self._open_health == other._open_health
        )

    def __hash__(self) -> int:
        return hash((Security, self._open_health))
