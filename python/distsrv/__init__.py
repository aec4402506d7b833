"""distsrv: an in-process server for distributed training.

Every process of a training job runs one :class:`Server`; all share one :class:`ClusterSpec`.
Servers find each other, move numpy arrays between them by name over gRPC, reduce them together
(collectives) and host parameter-server variables.
"""

from distsrv import errors
from distsrv._native import __version__
from distsrv.cluster import ClusterSpec
from distsrv.config import ServerConfig
from distsrv.devices import DeviceAttributes
from distsrv.messages import ClusterDef, JobDef, ServerDef
from distsrv.server import RecvHandle, SendHandle, Server
from distsrv.variables import Variable

__all__ = [
    "ClusterDef",
    "ClusterSpec",
    "DeviceAttributes",
    "JobDef",
    "RecvHandle",
    "SendHandle",
    "Server",
    "ServerConfig",
    "ServerDef",
    "Variable",
    "__version__",
    "errors",
]
