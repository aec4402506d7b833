"""Parameter-server variables: tensors hosted on one task, read and updated from any task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from distsrv import _native

__all__ = ["Variable"]


class Variable:
    """A handle to the variable ``name`` hosted on task ``host``.

    Every update is applied on the host, in Rust, atomically per variable: many workers may
    update one variable at once and no update is lost. Optimizer steps keep their state (a
    momentum buffer, Adam's moments) on the host beside the variable, so workers send only
    gradients. An update must have the variable's shape; one of another dtype is cast to the
    variable's where numpy's ``same_kind`` rule allows (a float64 gradient into a float32
    variable), and refused with ``InvalidArgumentError`` otherwise. A variable that does not
    exist raises ``NotFoundError``. Every operation takes ``timeout=`` (seconds; ``None`` waits
    as long as the host is up: a host lost meanwhile raises ``UnavailableError`` within the
    config's ``peer_timeout``) and raises ``DeadlineExceededError`` past it. Get handles from
    :meth:`distsrv.Server.create_variable`, :meth:`~distsrv.Server.variable` and
    :meth:`~distsrv.Server.variables`.
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

    @property
    def dtype(self) -> np.dtype[Any]:
        """The variable's dtype, as its host has it (one round trip)."""
        return self._describe()[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The variable's shape, as its host has it (one round trip)."""
        return self._describe()[1]

    def read(self, *, timeout: float | None = None) -> npt.NDArray[Any]:
        """The current value, a new array."""
        value: npt.NDArray[Any] = self._op("read", timeout=timeout)
        return value

    def assign(self, value: npt.ArrayLike, *, timeout: float | None = None) -> None:
        """Replaces the value."""
        self._op("assign", value, timeout=timeout)

    def assign_add(self, delta: npt.ArrayLike, *, timeout: float | None = None) -> None:
        """Adds ``delta`` to the value."""
        self._op("assign_add", delta, timeout=timeout)

    def sgd_step(
        self, gradient: npt.ArrayLike, learning_rate: float, *, timeout: float | None = None
    ) -> None:
        """One step of gradient descent: ``value -= learning_rate * gradient`` (floating dtypes)."""
        self._op("sgd_step", gradient, learning_rate=float(learning_rate), timeout=timeout)

    def momentum_step(
        self,
        gradient: npt.ArrayLike,
        learning_rate: float,
        momentum: float = 0.9,
        *,
        nesterov: bool = False,
        timeout: float | None = None,
    ) -> None:
        """One step of SGD with momentum, as ``torch.optim.SGD``'s (float32 and float64):
        ``buf = momentum * buf + gradient``, then ``value -= learning_rate * buf`` (with
        ``nesterov``, ``learning_rate * (gradient + momentum * buf)``). The buffer starts at
        zero and lives on the host."""
        self._op(
            "momentum_step",
            gradient,
            learning_rate=float(learning_rate),
            momentum=float(momentum),
            nesterov=bool(nesterov),
            timeout=timeout,
        )

    def adam_step(
        self,
        gradient: npt.ArrayLike,
        learning_rate: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        *,
        timeout: float | None = None,
    ) -> None:
        """One step of Adam, as ``torch.optim.Adam``'s (float32 and float64), its moments and
        step count kept on the host. A variable stepped by one optimizer refuses the other's
        steps with ``FailedPreconditionError``."""
        self._op(
            "adam_step",
            gradient,
            learning_rate=float(learning_rate),
            beta1=float(beta1),
            beta2=float(beta2),
            epsilon=float(epsilon),
            timeout=timeout,
        )

    def delete(self, *, timeout: float | None = None) -> None:
        """Removes the variable, and its optimizer state, from its host."""
        self._op("delete", timeout=timeout)

    def _describe(self) -> tuple[np.dtype[Any], tuple[int, ...]]:
        dtype, shape = self._op("describe")
        return dtype, tuple(shape)

    def _op(self, op: str, value: npt.ArrayLike | None = None, **options: Any) -> Any:
        return self._native.variable_op(self._host, self._name, op, value, **options)

    def __repr__(self) -> str:
        return f"<distsrv.Variable {self._name!r} on {self.host}>"
