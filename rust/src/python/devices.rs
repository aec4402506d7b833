//! Device records and task status as Python receives them: plain tuples, which
//! `distsrv.devices` turns into its classes.

use std::time::Duration;

use pyo3::prelude::*;

use super::errors::{IntoPyResult, to_py};
use super::server::wait_interruptibly;
use crate::errors::Error;
use crate::proto::DeviceAttributes;
use crate::registry::{self, TaskStatus};

/// (name, device_type, memory_limit, incarnation, physical_device_desc, bus_id)
pub type DeviceTuple = (String, String, i64, u64, String, i32);

/// (health or None, task name or None, incarnation, version or None, devices)
pub type StatusTuple = (
    Option<String>,
    Option<String>,
    u64,
    Option<String>,
    Vec<DeviceTuple>,
);

pub fn device_tuple(device: DeviceAttributes) -> DeviceTuple {
    let bus_id = device.locality.map_or(0, |locality| locality.bus_id);
    (
        device.name,
        device.device_type,
        device.memory_limit,
        device.incarnation,
        device.physical_device_desc,
        bus_id,
    )
}

/// Asks the server at `address` (which need not be in this process's cluster) for its status and
/// health, through distsrv's Worker or, failing that, TensorFlow's WorkerService: (health or
/// None, task or None, incarnation, version or None, devices). UnavailableError if it does not
/// answer within `timeout` seconds.
#[pyfunction]
pub fn query_status(py: Python<'_>, address: String, timeout: f64) -> PyResult<StatusTuple> {
    let timeout = Duration::try_from_secs_f64(timeout).map_err(|_| {
        to_py(Error::invalid_argument(format!(
            "a timeout of {timeout} s is invalid"
        )))
    })?;
    // A runtime of its own: the caller may have no server.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("distsrv-query")
        .enable_all()
        .build()
        .map_err(|e| to_py(Error::internal(format!("cannot start a runtime: {e}"))))?;
    let answered = wait_interruptibly(py, runtime.handle(), registry::query(&address, timeout));
    py.detach(|| drop(runtime));
    let (health, status) = answered?.into_py()?;
    Ok(status_tuple(health, status))
}

fn status_tuple(health: Option<String>, status: TaskStatus) -> StatusTuple {
    (
        health,
        status.task.map(|task| task.to_string()),
        status.incarnation,
        status.version,
        status.devices.into_iter().map(device_tuple).collect(),
    )
}
