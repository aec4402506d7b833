"""Parameter-server variables: tensors hosted on one task, read and updated from any task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy.typing as npt

if TYPE_CHECKING:
    from distsrv import _native

__all__ = ["Variable"]


class Variable:
    """A handle to the variable ``name`` hosted on task ``host``.

    Every update is applied on the host, in Rust, atomically per variable: many workers may
    update one variable at once and no update is lost. Updates must match the variable's dtype
    and shape (``InvalidArgumentError`` otherwise); a variable that does not exist raises
    ``NotFoundError``. Every operation takes ``timeout=`` (seconds; ``None`` waits as long as
    the host is up: a host lost meanwhile raises ``UnavailableError`` within the config's
    ``peer_timeout``) and raises ``DeadlineExceededError`` past it. Get handles from
    :meth:`distsrv.Server.create_variable` and :meth:`distsrv.Server.variable`.
    """

    def __init__(self, native: _native.Server, name: str, host: tuple[str, int]) -> None:
        self._native = native
        self._name = name
        self._host = host

    @property
    def name(self) -> str:
        return self._name

    @property
    def host(self) -> str:
        """The task hosting the variable, "/job:<job>/task:<index>"."""
        return f"/job:{self._host[0]}/task:{self._host[1]}"

    def read(self, *, timeout: float | None = None) -> npt.NDArray[Any]:
        """The current value, a new array."""
        value = self._native.variable_op(self._host, self._name, "read", timeout=timeout)
        assert value is not None, "a read yields the value"
        return value

    def assign(self, value: npt.ArrayLike, *, timeout: float | None = None) -> None:
        """Replaces the value."""
        self._update("assign", value, timeout=timeout)

    def assign_add(self, delta: npt.ArrayLike, *, timeout: float | None = None) -> None:
        """Adds ``delta`` to the value."""
        self._update("assign_add", delta, timeout=timeout)

    def sgd_step(
        self, gradient: npt.ArrayLike, learning_rate: float, *, timeout: float | None = None
    ) -> None:
        """One step of gradient descent: ``value -= learning_rate * gradient`` (floating dtypes)."""
        self._update("sgd_step", gradient, float(learning_rate), timeout=timeout)

    def _update(
        self,
        op: str,
        value: npt.ArrayLike,
        learning_rate: float = 0.0,
        *,
        timeout: float | None,
    ) -> None:
        self._native.variable_op(self._host, self._name, op, value, learning_rate, timeout)

    def __repr__(self) -> str:
        return f"<distsrv.Variable {self._name!r} on {self.host}>"
