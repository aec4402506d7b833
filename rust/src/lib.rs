//! distsrv: an in-process server for distributed training.
//!
//! Every task of a cluster runs one [`node::Server`]: it serves gRPC to its peers, knows the
//! cluster and its own devices, and exchanges tensors with the other tasks (same-host ones
//! through shared memory), reduces them together, hosts parameter-server variables, and serves
//! and calls named operations. Only [`python`] knows about Python.
//!
//! # Layers
//!
//! Each folder is a layer. A module imports only from its own layer and the layers listed
//! before it, never from one after it (`make lint` checks this list, and that no two files
//! import each other in a circle; a child module may use its parent's items):
//!
//! 1. `proto` — code generated from `protos/` (`proto`, `tfproto`)
//! 2. `base` — errors, the cluster model, config, the retry loop
//! 3. `tensor` — tensor metadata, payload buffers and their pools, shared-memory segments, reductions
//! 4. `wire` — tensors in protobuf messages, gRPC framing, the parser of a tensor stream
//! 5. `inbox` — arrived tensors, their reservations and hand-off to waiting receives
//! 6. `transport` — connections to peers, the HTTP/2 push, GetStatus, the same-host link, the route choice
//! 7. `exchange` — send and receive by name, over a transport into an inbox, in call order
//! 8. `ops` — collectives, parameter-server variables, remote operations
//! 9. `node` — a task's state, devices, cluster status, gRPC services, server lifecycle
//! 10. `python` — the binding: converts types, releases the GIL, waits

pub mod base;
pub mod exchange;
pub mod inbox;
pub mod node;
pub mod ops;
pub mod tensor;
pub mod transport;
pub mod wire;

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

/// Every allocation of this crate and its dependencies (h2's read buffers above all) goes to
/// mimalloc, which keeps freed memory for reuse. Under glibc's malloc, a megabyte read buffer
/// freed by one thread was often handed back to the kernel and faulted in afresh by the next
/// frame, which halved a large transfer's speed in some runs and not others. Fuzzing keeps the
/// sanitizer's allocator.
#[cfg(not(fuzzing))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
