//! What every layer uses: errors ([`errors`]), the cluster model ([`cluster`]), a server's
//! tunables ([`config`]) and each peer's share of them ([`budget`]), the descriptors
//! ([`files`]) and memory ([`memory`]) this process may use, and small helpers for waiting and
//! bounded caches.

pub mod budget;
pub mod cluster;
pub mod config;
pub mod errors;
pub mod files;
pub mod memory;
pub mod retry;
pub mod security;
