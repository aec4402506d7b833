"""The other tasks' comings and goings, as :meth:`distsrv.Server.watch_peers` reports them."""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["PeerEvent", "PeerState"]

#: ``up``: the task answers (first seen, or back as the same incarnation); ``restarted``: it
#: answers as a new incarnation, which holds nothing of the old one's; ``lost``: it stopped
#: answering for ``config.peer_timeout``, or nothing listens at its address.
PeerState = Literal["up", "restarted", "lost"]


class PeerEvent(NamedTuple):
    """A change of one task's presence."""

    #: The task, "/job:<job>/task:<index>".
    task: str
    state: PeerState
    #: The incarnation that is up now, or (lost) the one last seen up; ``None`` if never seen.
    incarnation: int | None
    #: Why the task counts as lost; ``None`` otherwise.
    reason: str | None
