//! Handles of operations started in the background (`isend`, `irecv`, `icall`, `icollective`).

use std::sync::Mutex;

use pyo3::prelude::*;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::args::seconds;
use super::errors::{IntoPyResult, to_py};
use super::tensor::{HeldBuffer, array_out};
use super::values;
use super::wait::wait_interruptibly;
use crate::base::errors::{Error, Result};
use crate::ops::remote::Returned;
use crate::tensor::Tensor;

pub enum Completed {
    Sent,
    Received(Tensor),
    Called(Returned),
    /// A collective's result, where this member gets one.
    Collected(Option<Tensor>),
}

enum Stage {
    Running(JoinHandle<Result<Completed>>),
    /// A thread is waiting on it.
    Claimed,
    /// Its result was handed out.
    Finished,
}

/// A pipe whose write end the operation's task owns: when the task ends, for any reason, the
/// write end closes and the read end becomes readable, which an event loop can watch.
pub fn completion_pipe() -> PyResult<(std::io::PipeReader, std::io::PipeWriter)> {
    std::io::pipe().map_err(|e| to_py(Error::internal(format!("cannot create a pipe: {e}"))))
}

/// A send, receive, call or collective in flight (`isend` / `irecv` / `icall` / `icollective`).
/// Dropping an unfinished receive or call cancels it; an unfinished send or collective runs to
/// its end.
#[pyclass(frozen, module = "distsrv._native")]
pub struct Pending {
    runtime: Handle,
    stage: Mutex<Stage>,
    done: std::io::PipeReader,
    /// The arrays the operation reads (a send's, a call's arguments), held until it ends.
    held: Mutex<Vec<HeldBuffer>>,
    on_drop: OnDrop,
}

/// What dropping an unfinished operation's handle does.
#[derive(PartialEq)]
pub enum OnDrop {
    /// A send runs to its end: its acknowledgement is what makes it safe.
    RunToEnd,
    /// A receive or a call nobody waits for any more is cancelled.
    Cancel,
}

impl Pending {
    pub fn new(
        runtime: Handle,
        task: JoinHandle<Result<Completed>>,
        done: std::io::PipeReader,
        held: Vec<HeldBuffer>,
        on_drop: OnDrop,
    ) -> Self {
        Self {
            runtime,
            stage: Mutex::new(Stage::Running(task)),
            done,
            held: Mutex::new(held),
            on_drop,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stage> {
        self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl Pending {
    /// A file descriptor that becomes readable when the operation has finished, for event loops
    /// (asyncio's `add_reader`).
    fn fileno(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.done.as_raw_fd()
    }

    /// Whether the operation has finished (successfully or not).
    fn done(&self) -> bool {
        match &*self.lock() {
            Stage::Running(task) => task.is_finished(),
            Stage::Claimed => false,
            Stage::Finished => true,
        }
    }

    /// Waits for the result: None for a send, (dtype code, shape, bytes) for a receive, the
    /// result for a call. With a timeout, raises DeadlineExceededError if it has not finished by
    /// then (it keeps running).
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let timeout = seconds(timeout)?;
        let stage = std::mem::replace(&mut *self.lock(), Stage::Claimed);
        let mut task = match stage {
            Stage::Running(task) => task,
            Stage::Claimed => {
                return Err(to_py(Error::failed_precondition(
                    "another thread is already waiting on this operation",
                )));
            }
            Stage::Finished => {
                *self.lock() = Stage::Finished;
                return Err(to_py(Error::failed_precondition(
                    "the result of this operation was already taken",
                )));
            }
        };
        let waited = wait_interruptibly(py, &self.runtime, async {
            match timeout {
                None => Some((&mut task).await),
                Some(limit) => tokio::time::timeout(limit, &mut task).await.ok(),
            }
        });
        let outcome = match waited {
            Ok(Some(joined)) => joined,
            Ok(None) | Err(_) => {
                *self.lock() = Stage::Running(task);
                waited?;
                return Err(to_py(Error::deadline_exceeded(
                    "the operation did not finish within the timeout",
                )));
            }
        };
        *self.lock() = Stage::Finished;
        let result =
            outcome.unwrap_or_else(|e| Err(Error::internal(format!("the operation failed: {e}"))));
        self.deliver(py, result)
    }
}

impl Pending {
    fn deliver(&self, py: Python<'_>, result: Result<Completed>) -> PyResult<Py<PyAny>> {
        let held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        for held in held {
            held.release(py);
        }
        Ok(match result.into_py()? {
            Completed::Sent => py.None(),
            Completed::Received(tensor) => array_out(py, tensor)?.unbind(),
            Completed::Called(returned) => values::decode_returned(py, returned)?.unbind(),
            Completed::Collected(Some(tensor)) => array_out(py, tensor)?.unbind(),
            Completed::Collected(None) => py.None(),
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Stage::Running(task) = &*self.lock()
            && self.on_drop == OnDrop::Cancel
        {
            task.abort();
        }
    }
}
