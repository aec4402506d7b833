//! A server's tunables, with safe defaults. Python's `distsrv.ServerConfig` validates the same
//! fields and hands them over unchanged.

use std::time::Duration;

use crate::base::errors::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// How long to keep trying to reach a peer before a call fails with `Unavailable`.
    pub connect_timeout: Duration,
    /// How long `stop()` lets in-flight calls finish before cutting them off.
    pub shutdown_grace: Duration,
    /// Largest single gRPC message accepted (tensors are chunked, so this bounds a chunk).
    pub max_message_bytes: usize,
    /// Payload bytes per message of a tensor stream.
    pub chunk_bytes: usize,
    /// Bytes of received tensors not yet claimed by `recv` that the server will hold; a send
    /// beyond it is refused with `ResourceExhausted` instead of growing without bound.
    pub max_pending_bytes: u64,
    /// Inbound connections served at once; more are refused.
    pub connection_limit: usize,
    /// Threads of the server's runtime.
    pub worker_threads: usize,
    /// Tensors to tasks on the same host travel through shared memory; `false` keeps every
    /// tensor on gRPC, sent and received (for tests and benchmarks).
    pub shared_memory: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
            chunk_bytes: 1 << 20,
            max_pending_bytes: 4 << 30,
            connection_limit: 512,
            worker_threads: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(4),
            shared_memory: true,
        }
    }
}

/// Upper bounds: gRPC frames a message length in 32 bits, and a semaphore counts the calls.
pub const MAX_MESSAGE_BYTES: usize = (1 << 31) - 1;
pub const MAX_CONNECTION_LIMIT: usize = 1 << 20;
pub const MAX_WORKER_THREADS: usize = 1024;

impl ServerConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_message_bytes", self.max_message_bytes),
            ("chunk_bytes", self.chunk_bytes),
            ("connection_limit", self.connection_limit),
            ("worker_threads", self.worker_threads),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::invalid_argument(format!("{name} must be positive")));
            }
        }
        let bounded = [
            (
                "max_message_bytes",
                self.max_message_bytes,
                MAX_MESSAGE_BYTES,
            ),
            (
                "connection_limit",
                self.connection_limit,
                MAX_CONNECTION_LIMIT,
            ),
            ("worker_threads", self.worker_threads, MAX_WORKER_THREADS),
        ];
        for (name, value, max) in bounded {
            if value > max {
                return Err(Error::invalid_argument(format!(
                    "{name} must be at most {max}"
                )));
            }
        }
        if self.chunk_bytes > self.max_message_bytes {
            return Err(Error::invalid_argument(format!(
                "chunk_bytes ({}) cannot exceed max_message_bytes ({})",
                self.chunk_bytes, self.max_message_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zero_is_refused() {
        ServerConfig::default().validate().unwrap();
        let config = ServerConfig {
            worker_threads: 0,
            ..ServerConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .message
                .contains("worker_threads")
        );
        let config = ServerConfig {
            chunk_bytes: 2 << 20,
            max_message_bytes: 1 << 20,
            ..ServerConfig::default()
        };
        assert!(config.validate().is_err());
    }
}
