"""Device records: what each task of a cluster has, described as TensorFlow describes devices."""

from __future__ import annotations

from dataclasses import dataclass

from distsrv import _native

__all__ = ["DeviceAttributes"]


@dataclass(frozen=True)
class DeviceAttributes:
    """A device of a task, with the fields of TensorFlow's ``DeviceAttributes``.

    ``name`` is TensorFlow's full device name, e.g. ``"/job:worker/replica:0/task:0/device:GPU:1"``;
    ``memory_limit`` is in bytes (for the CPU, the memory this task's process may use; 0 where
    unknown); ``incarnation`` is random and new each time the device's server starts, so a
    restarted task is told apart; ``bus_id`` is TensorFlow's locality (0: no specific locality).
    """

    name: str
    device_type: str
    memory_limit: int
    incarnation: int
    physical_device_desc: str
    bus_id: int

    @property
    def task(self) -> str:
        """The task that has the device, ``"/job:<job>/task:<index>"``."""
        job, index = _native.parse_task(self.name.partition("/device:")[0])
        return f"/job:{job}/task:{index}"
