//! Device records and task status as Python receives them: plain tuples, which
//! `distsrv.devices` turns into its classes.

use pyo3::prelude::*;

use super::args::{SecurityArgs, seconds};
use super::errors::IntoPyResult;
use super::wait::wait;
use crate::base::security::Security;
use crate::node::calls;
use crate::proto::DeviceAttributes;
use crate::transport::status::TaskStatus;

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
#[pyo3(signature = (address, timeout, security=None))]
pub fn query_status(
    py: Python<'_>,
    address: String,
    timeout: f64,
    security: Option<SecurityArgs>,
) -> PyResult<StatusTuple> {
    let timeout = seconds(Some(timeout))?.expect("given");
    let security = security.map_or_else(Security::open, |security| security.0);
    let querying = calls::query_status(address, timeout, security).into_py()?;
    let (health, status) = wait(py, querying)?.into_py()?;
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
