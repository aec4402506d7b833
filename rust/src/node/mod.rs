//! One task of the cluster: its state ([`task`]), devices ([`devices`]), the status of the whole
//! cluster ([`status`]), the gRPC services it serves ([`service`], TensorFlow's in
//! [`tfcompat`]), its server's lifecycle ([`server`]), and what a calling thread asks of it
//! ([`calls`]).

pub mod calls;
pub mod devices;
pub mod server;
pub mod service;
pub mod status;
pub mod task;
pub mod tfcompat;

pub use server::{Server, Status};
pub use task::Task;
