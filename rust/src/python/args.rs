//! Arguments as Python gives them: tasks, seconds, a server's config.

use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyString, PyTuple};

use super::errors::to_py;
use crate::base::cluster::TaskId;
use crate::base::config::ServerConfig;
use crate::base::errors::Error;

/// `distsrv.ServerConfig`'s fields, read by attribute name.
#[derive(FromPyObject)]
pub struct ConfigArgs {
    connect_timeout: f64,
    shutdown_grace: f64,
    max_message_bytes: usize,
    chunk_bytes: usize,
    max_pending_bytes: u64,
    connection_limit: usize,
    worker_threads: usize,
    shared_memory: bool,
}

impl ConfigArgs {
    pub fn into_config(self) -> PyResult<ServerConfig> {
        let seconds = |name: &str, value: f64| {
            Duration::try_from_secs_f64(value)
                .map_err(|_| to_py(Error::invalid_argument(format!("{name} must be >= 0"))))
        };
        Ok(ServerConfig {
            connect_timeout: seconds("connect_timeout", self.connect_timeout)?,
            shutdown_grace: seconds("shutdown_grace", self.shutdown_grace)?,
            max_message_bytes: self.max_message_bytes,
            chunk_bytes: self.chunk_bytes,
            max_pending_bytes: self.max_pending_bytes,
            connection_limit: self.connection_limit,
            worker_threads: self.worker_threads,
            shared_memory: self.shared_memory,
        })
    }
}

pub fn seconds(value: Option<f64>) -> PyResult<Option<Duration>> {
    value
        .map(|v| {
            Duration::try_from_secs_f64(v).map_err(|_| {
                to_py(Error::invalid_argument(format!(
                    "a timeout of {v} s is invalid"
                )))
            })
        })
        .transpose()
}

/// A task as Python names it: `"/job:ps/task:0"` or `("ps", 0)`.
pub struct TaskArg(pub TaskId);

impl<'a, 'py> FromPyObject<'a, 'py> for TaskArg {
    type Error = PyErr;

    fn extract(task: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(name) = task.cast::<PyString>() {
            return TaskId::parse(&name.to_cow()?)
                .map(Self)
                .map_err(|e| PyValueError::new_err(e.message));
        }
        if let Ok(pair) = task.cast::<PyTuple>()
            && pair.len() == 2
            && let (Ok(job), Ok(index)) = (pair.get_item(0), pair.get_item(1))
            && let Ok(job) = job.cast::<PyString>()
            && !index.is_instance_of::<PyBool>()
            && let Ok(index) = index.extract::<u32>()
        {
            return Ok(Self(TaskId::new(job.to_cow()?, index)));
        }
        Err(PyTypeError::new_err(format!(
            "a task is \"/job:<job>/task:<index>\" or (job, index), not {}",
            task.repr()?
        )))
    }
}
