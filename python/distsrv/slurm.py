"""Slurm's environment, read for :meth:`distsrv.ClusterSpec.from_slurm`: the address of every task
of a job step, from its compressed node list and tasks-per-node list."""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["slurm_addresses", "slurm_int"]


def slurm_addresses(env: Mapping[str, str], port: int) -> list[str]:
    """The address of every task of the step, in rank order."""
    hosts = _expand_hostlist(_slurm_var(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"))
    tasks_per_node = _expand_tasks_per_node(
        _slurm_var(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    )
    if len(tasks_per_node) != len(hosts):
        raise ValueError(
            f"The Slurm node list has {len(hosts)} nodes but the tasks-per-node list has "
            f"{len(tasks_per_node)} entries"
        )
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"The Slurm node list names a node twice: {hosts}")
    addresses = [
        f"{host}:{port + offset}"
        for host, count in zip(hosts, tasks_per_node, strict=True)
        for offset in range(count)
    ]
    if "SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env:
        declared = slurm_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        if declared != len(addresses):
            raise ValueError(
                f"Slurm reports {declared} tasks but its tasks-per-node list adds up to "
                f"{len(addresses)}"
            )
    return addresses


def _slurm_var(env: Mapping[str, str], *names: str) -> str:
    """The first of ``names`` that is set; the step's variable comes before the job's."""
    for name in names:
        if name in env:
            return env[name]
    raise ValueError(f"{' / '.join(names)} not found in environment. Not running inside Slurm?")


def slurm_int(env: Mapping[str, str], *names: str) -> int:
    value = _slurm_var(env, *names)
    if not value.strip().isdecimal():
        raise ValueError(f"{' / '.join(names)} must be a non-negative integer, not {value!r}")
    return int(value)


_HOSTLIST_PART = re.compile(r"([^\[\]]*)(?:\[([^\[\]]+)\])?")
_TASKS_PER_NODE_PART = re.compile(r"(\d+)(?:\(x(\d+)\))?")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _split_hostlist(hostlist: str) -> list[str]:
    """Splits a Slurm host list at the commas that are outside brackets."""
    parts = []
    depth = 0
    current = ""
    for char in hostlist:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
        if depth not in (0, 1):
            raise ValueError("unbalanced or nested brackets")
    if depth:
        raise ValueError("unclosed '['")
    parts.append(current)
    if "" in parts:
        raise ValueError("empty host name")
    return parts


def _expand_hostlist(hostlist: str) -> list[str]:
    """Expands Slurm's compressed host list: ``"n[1-2,07],m5"`` -> ``n1 n2 n07 m5``.

    Order is kept and nothing is deduplicated, as in TensorFlow; unlike TensorFlow's version,
    zero padding is kept (``n[08-10]`` -> ``n08 n09 n10``), as Slurm itself expands it.
    """
    hosts: list[str] = []
    try:
        for part in _split_hostlist(hostlist.strip()):
            match = _HOSTLIST_PART.fullmatch(part)
            if match is None:
                raise ValueError(f"invalid part {part!r}")
            prefix, ranges = match.groups()
            if ranges is None:
                hosts.append(prefix)
                continue
            for item in ranges.split(","):
                bounds = _RANGE.fullmatch(item)
                if bounds is None:
                    raise ValueError(f"invalid range {item!r}")
                low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
                if int(high) < int(low):
                    raise ValueError(f"range {item!r} is reversed")
                width = len(low)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(low), int(high) + 1))
    except ValueError as err:
        raise ValueError(f'Invalid hostlist format "{hostlist}": {err}') from None
    return hosts


def _expand_tasks_per_node(tasks_per_node: str) -> list[int]:
    """Expands Slurm's tasks-per-node list: ``"3(x2),2,1"`` -> ``[3, 3, 2, 1]``."""
    result: list[int] = []
    for part in tasks_per_node.strip().split(","):
        match = _TASKS_PER_NODE_PART.fullmatch(part)
        if match is None:
            raise ValueError(f'Invalid tasks-per-node list format "{tasks_per_node}"')
        count, repetitions = match.groups()
        result.extend([int(count)] * int(repetitions or 1))
    return result
