"""distsrv: an in-process server for distributed training.

Every process of a training job runs one :class:`Server`; all share one :class:`ClusterSpec`.
Servers find each other, move numpy arrays between them by name over gRPC, reduce them together
(collectives), host parameter-server variables, and call each other's handlers.
"""

# tensors up front: the native layer reads its dtype tables at the first send or receive, and
# importing them there would stall that first exchange.
from distsrv import errors, handlers, tensors
from distsrv._native import __version__
from distsrv.cluster import ClusterSpec
from distsrv.config import ServerConfig
from distsrv.devices import DeviceAttributes
from distsrv.handlers import CallContext
from distsrv.handles import CallHandle, CollectiveHandle, RecvHandle, SendHandle
from distsrv.messages import ClusterDef, JobDef, ServerDef
from distsrv.peers import PeerEvent
from distsrv.security import Security
from distsrv.server import EVERY_TASK, Server
from distsrv.variables import Variable

__all__ = [
    "EVERY_TASK",
    "CallContext",
    "CallHandle",
    "ClusterDef",
    "ClusterSpec",
    "CollectiveHandle",
    "DeviceAttributes",
    "JobDef",
    "PeerEvent",
    "RecvHandle",
    "Security",
    "SendHandle",
    "Server",
    "ServerConfig",
    "ServerDef",
    "Variable",
    "__version__",
    "errors",
    "handlers",
    "tensors",
]
