//! distsrv: an in-process server for distributed training.
//!
//! Every task of a cluster runs one [`server::Server`]: it serves gRPC to its peers, knows the
//! cluster ([`cluster`]), its own devices ([`devices`]) and every task's ([`registry`]), and
//! exchanges tensors with the other tasks ([`exchange`], same-host ones through shared memory,
//! [`shm`]), reduces them together ([`collectives`]), hosts parameter-server variables
//! ([`variables`]), and serves and calls named operations ([`handlers`]). Stock TensorFlow can list the
//! cluster's devices through it ([`tfcompat`]). Only [`python`] knows about Python.

pub mod cluster;
pub mod codec;
pub mod collectives;
pub mod config;
pub mod devices;
pub mod errors;
pub mod exchange;
pub mod handlers;
pub mod peers;
pub mod reduce;
pub mod registry;
pub mod server;
pub mod service;
pub mod shm;
pub mod tfcompat;
pub mod variables;

mod python;

/// Code generated from `protos/`, in modules named after the proto packages (prost refers from
/// one package to another by relative paths).
#[allow(clippy::all)]
mod generated {
    pub mod distsrv {
        pub mod v1 {
            tonic::include_proto!("distsrv.v1");
        }
        pub mod tfcompat {
            pub mod v1 {
                tonic::include_proto!("distsrv.tfcompat.v1");
            }
        }
    }
}

/// Mirrors of TensorFlow's master and worker messages, from `protos/tensorflow_compat.proto`.
pub use generated::distsrv::tfcompat::v1 as tfproto;
/// Messages and services of `protos/distsrv.proto`.
pub use generated::distsrv::v1 as proto;
