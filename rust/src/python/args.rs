//! Arguments as Python gives them: tasks, seconds, a server's config.

use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString, PyTuple};

use super::errors::to_py;
use crate::base::cluster::TaskId;
use crate::base::config::{self, ServerConfig};
use crate::base::errors::Error;
use crate::base::security::{Security, TlsPem};

/// `distsrv.ServerConfig` as the core's config: its fields read by name, each checked against
/// the core's bounds (an ill-typed field is an InvalidArgumentError naming it too).
pub struct ConfigArgs(pub ServerConfig);

impl<'a, 'py> FromPyObject<'a, 'py> for ConfigArgs {
    type Error = PyErr;

    fn extract(config: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let seconds = |name: &str| -> PyResult<Duration> {
            let value = config.getattr(name)?;
            let number = (value.is_instance_of::<PyFloat>() || value.is_instance_of::<PyInt>())
                && !value.is_instance_of::<PyBool>();
            let given = if number {
                value.extract::<f64>().ok()
            } else {
                None
            };
            let given = given.unwrap_or(f64::NAN);
            config::seconds(name, given).map_err(|e| {
                to_py(Error::invalid_argument(
                    e.message.replace("NaN", &repr(&value)),
                ))
            })
        };
        let int = |name: &str| -> PyResult<u64> {
            let value = config.getattr(name)?;
            let given = (value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>())
                .then(|| value.extract::<u64>().ok())
                .flatten();
            match given {
                Some(given) => config::bounded(name, given).map_err(to_py),
                None => Err(to_py(config::out_of_bounds(name, &repr(&value)))),
            }
        };
        let fraction = |name: &str| -> PyResult<f64> {
            let value = config.getattr(name)?;
            let number = (value.is_instance_of::<PyFloat>() || value.is_instance_of::<PyInt>())
                && !value.is_instance_of::<PyBool>();
            match number.then(|| value.extract::<f64>().ok()).flatten() {
                Some(given) => Ok(given),
                None => Err(to_py(Error::invalid_argument(format!(
                    "ServerConfig.{name} must be a fraction in (0, 1], not {}",
                    repr(&value)
                )))),
            }
        };
        let shared_memory = config.getattr("shared_memory")?;
        if !shared_memory.is_instance_of::<PyBool>() {
            return Err(to_py(Error::invalid_argument(format!(
                "ServerConfig.shared_memory must be a bool, not {}",
                repr(&shared_memory)
            ))));
        }
        let config = ServerConfig {
            connect_timeout: seconds("connect_timeout")?,
            peer_timeout: seconds("peer_timeout")?,
            shutdown_grace: seconds("shutdown_grace")?,
            collective_timeout: seconds("collective_timeout")?,
            max_message_bytes: int("max_message_bytes")? as usize,
            chunk_bytes: int("chunk_bytes")? as usize,
            max_pending_bytes: int("max_pending_bytes")?,
            connection_limit: int("connection_limit")? as usize,
            peer_share: fraction("peer_share")?,
            max_connections_per_address: int("max_connections_per_address")? as usize,
            worker_threads: int("worker_threads")? as usize,
            shared_memory: shared_memory.extract()?,
        };
        config.validate().map_err(to_py)?;
        Ok(Self(config))
    }
}

/// `distsrv.Security` as the core's (`None`, where a caller may leave it out: admits every
/// caller and presents nothing).
pub struct SecurityArgs(pub Security);

impl<'a, 'py> FromPyObject<'a, 'py> for SecurityArgs {
    type Error = PyErr;

    fn extract(security: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let token: Option<String> = security.getattr("token")?.extract()?;
        let open_health: bool = security.getattr("open_health")?.extract()?;
        let tls: Option<PemTriple> = security.getattr("tls_pem")?.extract()?;
        let mut core = match token {
            Some(token) => Security::with_token(token.as_bytes(), open_health).map_err(to_py)?,
            None => Security::without_token(open_health),
        };
        if let Some((ca, cert, key)) = tls {
            core = core.with_tls(TlsPem { ca, cert, key });
        }
        Ok(Self(core))
    }
}

fn repr(value: &Bound<'_, PyAny>) -> String {
    value
        .repr()
        .map_or_else(|_| "?".to_owned(), |text| text.to_string())
}

/// The core's default config, as `distsrv.ServerConfig`'s field defaults: times in seconds.
#[pyfunction]
pub fn config_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let config = ServerConfig::default();
    let defaults = PyDict::new(py);
    defaults.set_item("connect_timeout", config.connect_timeout.as_secs_f64())?;
    defaults.set_item("peer_timeout", config.peer_timeout.as_secs_f64())?;
    defaults.set_item("shutdown_grace", config.shutdown_grace.as_secs_f64())?;
    defaults.set_item(
        "collective_timeout",
        config.collective_timeout.as_secs_f64(),
    )?;
    defaults.set_item("max_message_bytes", config.max_message_bytes)?;
    defaults.set_item("chunk_bytes", config.chunk_bytes)?;
    defaults.set_item("max_pending_bytes", config.max_pending_bytes)?;
    defaults.set_item("connection_limit", config.connection_limit)?;
    defaults.set_item("peer_share", config.peer_share)?;
    defaults.set_item(
        "max_connections_per_address",
        config.max_connections_per_address,
    )?;
    defaults.set_item("worker_threads", config.worker_threads)?;
    defaults.set_item("shared_memory", config.shared_memory)?;
    Ok(defaults)
}

/// Checks a `distsrv.ServerConfig` against the core's bounds; InvalidArgumentError naming the
/// first field out of them.
#[pyfunction]
pub fn check_config(config: ConfigArgs) {
    let ConfigArgs(_checked) = config;
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
            return TaskId::parse(&name.to_cow()?).map(Self).map_err(to_py);
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

/// TLS material as Python holds it: (CA, certificate, key), PEM-encoded.
type PemTriple = (Vec<u8>, Vec<u8>, Vec<u8>);

/// A fresh CA and, per entry of `tasks`, a certificate of it for `hosts`, bound to that task
/// (a task's name) or to none (None): each as PEM (CA, certificate, key).
#[pyfunction]
pub fn temporary_tls(hosts: Vec<String>, tasks: Vec<Option<TaskArg>>) -> PyResult<Vec<PemTriple>> {
    let tasks: Vec<Option<TaskId>> = tasks.into_iter().map(|task| task.map(|t| t.0)).collect();
    let issued = crate::transport::tls::temporary(&hosts, &tasks).map_err(to_py)?;
    Ok(issued
        .into_iter()
        .map(|pem| (pem.ca, pem.cert, pem.key))
        .collect())
}
