//! `distsrv._native.PeerEvents`: the other tasks' comings and goings, one at a time.

use std::sync::Mutex;
use std::time::Instant;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::Handle;

use super::args::seconds;
use super::wait::wait_until;
use crate::node::status::PeerWatch;
use crate::transport::liveness::{PeerEvent, Presence};

/// (task, "up" | "restarted" | "lost", incarnation or None, the reason a task was lost or None)
pub type EventTuple = (String, &'static str, Option<u64>, Option<String>);

#[pyclass(frozen, module = "distsrv._native")]
pub struct PeerEvents {
    runtime: Handle,
    watch: Mutex<PeerWatch>,
}

impl PeerEvents {
    pub fn new(runtime: Handle, watch: PeerWatch) -> Self {
        Self {
            runtime,
            watch: Mutex::new(watch),
        }
    }
}

#[pymethods]
impl PeerEvents {
    /// The next event, waiting up to `timeout` seconds (`None`: without limit); `None` past it
    /// or once the server has stopped.
    #[pyo3(signature = (timeout=None))]
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<EventTuple>> {
        let deadline = seconds(timeout)?.map(|limit| Instant::now() + limit);
        // Waiting with the GIL released, a second reader must not block on the lock holding it.
        let Ok(mut watch) = self.watch.try_lock() else {
            return Err(PyRuntimeError::new_err(
                "another thread is already waiting on these events",
            ));
        };
        let event = wait_until(py, &self.runtime, deadline, watch.next())?;
        Ok(event.flatten().map(event_tuple))
    }
}

fn event_tuple(event: PeerEvent) -> EventTuple {
    let task = event.task.to_string();
    match event.presence {
        Presence::Up(incarnation) if event.previous.is_some() => {
            (task, "restarted", Some(incarnation), None)
        }
        Presence::Up(incarnation) => (task, "up", Some(incarnation), None),
        Presence::Lost { incarnation, why } => (task, "lost", incarnation, Some(why)),
        Presence::Unknown => (task, "unknown", None, None),
    }
}
