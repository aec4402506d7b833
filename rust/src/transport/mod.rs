//! Moving bytes to peers: connections to every other task ([`peers`]), the HTTP/2 push of a
//! tensor, both ends ([`push`]), unary calls by hand for messages that carry arrays
//! ([`unary`]), the GetStatus client ([`status`]), each peer's heartbeat
//! ([`liveness`]), the limits on accepted connections ([`inbound`]) and on callers that stall
//! ([`stall`]), the same-host fast path through shared memory ([`shm`]), and the choice between
//! the two for each peer ([`route`]).

pub mod auth;
pub mod inbound;
pub mod liveness;
pub mod peers;
pub mod push;
pub mod route;
pub mod shm;
pub mod stall;
pub mod status;
pub mod tls;
pub mod unary;

pub use liveness::Liveness;
pub use peers::Peers;
pub use shm::{Link, Shm};
