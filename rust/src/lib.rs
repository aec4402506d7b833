//! distsrv: an in-process server for distributed training.
//!
//! Every task of a cluster runs one [`server::Server`]: it serves gRPC to its peers, knows the
//! cluster ([`cluster`]), and exchanges tensors with the other tasks ([`exchange`]). Only
//! [`python`] knows about Python.

pub mod cluster;
pub mod codec;
pub mod config;
pub mod errors;
pub mod exchange;
pub mod peers;
pub mod server;
pub mod service;

mod python;

pub mod proto {
    //! Messages and services generated from `protos/distsrv.proto`.
    #![allow(clippy::all)]
    tonic::include_proto!("distsrv.v1");
}
