//! A server's tunables: the one place of their defaults and bounds. Python's
//! `distsrv.ServerConfig` takes its defaults from here and is checked here.

use std::time::Duration;

use crate::base::errors::{Error, Result};
use crate::base::memory;

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// How long to keep trying to reach a peer before a call fails with `Unavailable`.
    pub connect_timeout: Duration,
    /// How long a peer that was up may stay silent (no answer to its heartbeat: frozen, cut
    /// off, gone) before every wait on it fails with `Unavailable`.
    pub peer_timeout: Duration,
    /// How long `stop()` lets in-flight calls finish before cutting them off.
    pub shutdown_grace: Duration,
    /// How long a collective called without a timeout may take (torch.distributed's default):
    /// a member that never joins fails the others in bounded time.
    pub collective_timeout: Duration,
    /// Largest single gRPC message accepted (tensors are chunked, so this bounds a chunk).
    pub max_message_bytes: usize,
    /// Payload bytes per message of a tensor stream.
    pub chunk_bytes: usize,
    /// Bytes of received tensors not yet claimed by `recv` that the server will hold; a send
    /// beyond it is refused with `ResourceExhausted` instead of growing without bound. The
    /// variables the task hosts have a budget of the same size, their own.
    pub max_pending_bytes: u64,
    /// Calls served at once; more are refused.
    pub connection_limit: usize,
    /// The most of `max_pending_bytes` and of `connection_limit` calls in flight that one peer
    /// may hold, as a fraction in `(0, 1]` (see [`budget`](super::budget)).
    pub peer_share: f64,
    /// Connections one address may keep open; more are closed as they come. HTTP/2 carries
    /// every call of a peer on one or two, so only many peers behind one address need more.
    pub max_connections_per_address: usize,
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
            peer_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            collective_timeout: Duration::from_secs(30 * 60),
            max_message_bytes: 64 << 20,
            chunk_bytes: 1 << 20,
            max_pending_bytes: DEFAULT_PENDING_BYTES.min(memory_limit() / 2),
            connection_limit: 512,
            peer_share: 0.5,
            max_connections_per_address: 1024,
            worker_threads: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(4),
            shared_memory: true,
        }
    }
}

/// What the inbox may hold by default, or half the memory this process may use where that is
/// less.
const DEFAULT_PENDING_BYTES: u64 = 4 << 30;

/// The memory this process may use (see [`memory`]); `u64::MAX` where the system does not say.
pub fn memory_limit() -> u64 {
    match memory::process_memory_limit() {
        0 => u64::MAX,
        bytes => bytes,
    }
}

/// Upper bounds: gRPC frames a message length in 32 bits, a semaphore counts the calls, and
/// durations and byte counts must be representable on both sides of the binding.
pub const MAX_MESSAGE_BYTES: usize = (1 << 31) - 1;
pub const MAX_CONNECTION_LIMIT: usize = 1 << 20;
pub const MAX_WORKER_THREADS: usize = 1024;
pub const MAX_PENDING_BYTES: u64 = i64::MAX as u64;
pub const MAX_SECONDS: f64 = 1e9;
/// Shorter, and a heartbeat's round trip over a loaded host could count as silence.
pub const MIN_PEER_TIMEOUT: Duration = Duration::from_millis(100);

/// Every integer field with its upper bound; each must also be at least 1. The one table of
/// them: Python's `distsrv.ServerConfig` is checked against it too.
pub const INT_BOUNDS: [(&str, u64); 6] = [
    ("max_message_bytes", MAX_MESSAGE_BYTES as u64),
    ("chunk_bytes", MAX_MESSAGE_BYTES as u64),
    ("max_pending_bytes", MAX_PENDING_BYTES),
    ("connection_limit", MAX_CONNECTION_LIMIT as u64),
    ("max_connections_per_address", MAX_CONNECTION_LIMIT as u64),
    ("worker_threads", MAX_WORKER_THREADS as u64),
];

/// A field of seconds, which must be finite and in `[0, MAX_SECONDS]`.
pub fn seconds(name: &str, value: f64) -> Result<Duration> {
    if !(0.0..=MAX_SECONDS).contains(&value) {
        return Err(Error::invalid_argument(format!(
            "ServerConfig.{name} must be a finite number of seconds in [0, {MAX_SECONDS:e}], \
             not {value}"
        )));
    }
    Ok(Duration::from_secs_f64(value))
}

/// An integer field, which must be in `[1, bound]` (see [`INT_BOUNDS`]).
pub fn bounded(name: &str, value: u64) -> Result<u64> {
    if !(1..=bound_of(name)).contains(&value) {
        return Err(out_of_bounds(name, &value.to_string()));
    }
    Ok(value)
}

/// The error for an integer field given `value` (as Python wrote it).
pub fn out_of_bounds(name: &str, value: &str) -> Error {
    Error::invalid_argument(format!(
        "ServerConfig.{name} must be an int in [1, {}], not {value}",
        bound_of(name)
    ))
}

fn bound_of(name: &str) -> u64 {
    INT_BOUNDS
        .iter()
        .find(|(field, _)| *field == name)
        .map_or(u64::MAX, |(_, bound)| *bound)
}

impl ServerConfig {
    pub fn validate(&self) -> Result<()> {
        seconds("connect_timeout", self.connect_timeout.as_secs_f64())?;
        seconds("shutdown_grace", self.shutdown_grace.as_secs_f64())?;
        seconds("collective_timeout", self.collective_timeout.as_secs_f64())?;
        seconds("peer_timeout", self.peer_timeout.as_secs_f64())?;
        if self.peer_timeout < MIN_PEER_TIMEOUT {
            return Err(Error::invalid_argument(format!(
                "ServerConfig.peer_timeout must be at least {:.2} s: a heartbeat takes a round \
                 trip, not {:.3} s",
                MIN_PEER_TIMEOUT.as_secs_f64(),
                self.peer_timeout.as_secs_f64()
            )));
        }
        if !(self.peer_share > 0.0 && self.peer_share <= 1.0) {
            return Err(Error::invalid_argument(format!(
                "ServerConfig.peer_share must be a fraction in (0, 1], not {}",
                self.peer_share
            )));
        }
        let fields = [
            ("max_message_bytes", self.max_message_bytes as u64),
            ("chunk_bytes", self.chunk_bytes as u64),
            ("max_pending_bytes", self.max_pending_bytes),
            ("connection_limit", self.connection_limit as u64),
            (
                "max_connections_per_address",
                self.max_connections_per_address as u64,
            ),
            ("worker_threads", self.worker_threads as u64),
        ];
        for (name, value) in fields {
            bounded(name, value)?;
        }
        // A budget past the memory this process may use bounds nothing: a sender could make the
        // server allocate more than exists, which aborts the process (or gets it killed).
        let memory = memory_limit();
        if self.max_pending_bytes > memory {
            return Err(Error::invalid_argument(format!(
                "ServerConfig.max_pending_bytes ({}) exceeds the memory this process may use ({memory} bytes)",
                self.max_pending_bytes
            )));
        }
        if self.chunk_bytes > self.max_message_bytes {
            return Err(Error::invalid_argument(format!(
                "ServerConfig.chunk_bytes ({}) cannot exceed max_message_bytes ({})",
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
        for peer_share in [0.0, -0.5, 1.5, f64::NAN] {
            let config = ServerConfig {
                peer_share,
                ..ServerConfig::default()
            };
            let refused = config.validate().unwrap_err();
            assert!(
                refused.message.contains("peer_share"),
                "{}",
                refused.message
            );
        }
    }

    #[test]
    fn a_budget_past_the_machines_memory_is_refused() {
        let memory = memory_limit();
        assert!(ServerConfig::default().max_pending_bytes <= memory / 2);
        let config = ServerConfig {
            max_pending_bytes: memory.saturating_add(1).min(MAX_PENDING_BYTES),
            ..ServerConfig::default()
        };
        let refused = config.validate().unwrap_err();
        assert!(refused.message.contains("memory"), "{}", refused.message);
    }
}
