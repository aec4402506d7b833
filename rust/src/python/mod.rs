//! The Python binding, `distsrv._native`: converts types, releases the GIL around Rust work, and
//! nothing else. The Pythonic API lives in `python/distsrv/`.

mod args;
mod devices;
mod errors;
mod handlers;
mod peers;
mod pending;
mod server;
mod tensor;
mod values;
mod wait;

use pyo3::prelude::*;

#[pymodule(name = "_native")]
mod native {
    use std::collections::BTreeMap;

    use pyo3::exceptions::PyValueError;
    use pyo3::prelude::*;
    use pyo3::types::PyBytes;

    use crate::base::cluster::{self, Cluster, Jobs, ServerDef, TaskId};

    #[pymodule_export]
    use super::args::{check_config, config_defaults, temporary_tls};
    #[pymodule_export]
    use super::devices::query_status;
    #[pymodule_export]
    use super::peers::PeerEvents;
    #[pymodule_export]
    use super::pending::Pending;
    #[pymodule_export]
    use super::server::NativeServer;
    #[pymodule_export]
    use super::tensor::TensorBytes;
    #[pymodule_export]
    use super::wait::blocked_threads;

    /// Clears what the bridge to Python's logging cached of its loggers and levels.
    static LOGGING: std::sync::OnceLock<pyo3_log::ResetHandle> = std::sync::OnceLock::new();

    #[pymodule_init]
    fn init(module: &Bound<'_, PyModule>) -> PyResult<()> {
        module.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // The core's log records go to Python's logging, as loggers "distsrv.<module>" (quiet
        // until the application shows INFO). Levels are cached, so that a record nobody shows
        // costs no GIL on a runtime thread.
        let logger = pyo3_log::Logger::new(module.py(), pyo3_log::Caching::LoggersAndLevels)?;
        if let Ok(reset) = logger.install() {
            let _ = LOGGING.set(reset);
        }
        // Benchmarks refuse to time a debug build.
        module.add(
            "BUILD_PROFILE",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        )?;
        Ok(())
    }

    /// Rereads Python's logging configuration, as each new server does.
    #[pyfunction]
    fn reset_logging() {
        if let Some(reset) = LOGGING.get() {
            reset.reset();
        }
    }

    /// Splits "host:port" (IPv6 in brackets) into host and port; ValueError if it is not one.
    #[pyfunction]
    fn parse_address(address: &str) -> PyResult<(String, u16)> {
        cluster::parse_address(address).map_err(|e| PyValueError::new_err(e.message))
    }

    /// A task as (job, index), from "/job:ps/task:0" (or "/job:ps/replica:0/task:0"; ValueError
    /// if malformed) or from such a pair (TypeError for anything else).
    #[pyfunction]
    fn parse_task(task: super::args::TaskArg) -> (String, u32) {
        (task.0.job, task.0.index)
    }

    /// `value` (what a remote operation may take or return) encoded for sending as bytes;
    /// TypeError for anything else.
    #[pyfunction]
    fn encode_object<'py>(
        py: Python<'py>,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &super::values::to_bytes(value)?))
    }

    /// The value `encoded` holds; InvalidArgumentError if it holds none.
    #[pyfunction]
    fn decode_object<'py>(py: Python<'py>, encoded: &[u8]) -> PyResult<Bound<'py, PyAny>> {
        super::values::from_bytes(py, encoded)
    }

    /// Encodes jobs as a ClusterDef (TensorFlow's field numbers).
    #[pyfunction]
    fn cluster_def_to_bytes<'py>(py: Python<'py>, jobs: Jobs) -> PyResult<Bound<'py, PyBytes>> {
        let cluster = Cluster::new(jobs).map_err(|e| PyValueError::new_err(e.message))?;
        Ok(PyBytes::new(
            py,
            &prost::Message::encode_to_vec(&cluster.to_proto()),
        ))
    }

    /// Decodes a ClusterDef into jobs; ValueError if the bytes are not one.
    #[pyfunction]
    fn cluster_def_from_bytes(data: &[u8]) -> PyResult<Jobs> {
        let def: crate::proto::ClusterDef = prost::Message::decode(data)
            .map_err(|e| PyValueError::new_err(format!("not a ClusterDef: {e}")))?;
        Cluster::from_proto(&def)
            .map(|cluster| cluster.jobs().clone())
            .map_err(|e| PyValueError::new_err(e.message))
    }

    /// Encodes a ServerDef (TensorFlow's field numbers).
    #[pyfunction]
    fn server_def_to_bytes<'py>(
        py: Python<'py>,
        jobs: Jobs,
        job_name: String,
        task_index: u32,
        protocol: String,
        port: u16,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let def = ServerDef {
            cluster: Cluster::new(jobs).map_err(|e| PyValueError::new_err(e.message))?,
            task: TaskId::new(job_name, task_index),
            protocol,
            port,
        };
        Ok(PyBytes::new(py, &def.encode()))
    }

    /// Decodes a ServerDef into (jobs, job_name, task_index, protocol, port).
    #[pyfunction]
    fn server_def_from_bytes(data: &[u8]) -> PyResult<(Jobs, String, u32, String, u16)> {
        let def = ServerDef::decode(data).map_err(|e| PyValueError::new_err(e.message))?;
        let jobs: BTreeMap<_, _> = def.cluster.jobs().clone();
        Ok((jobs, def.task.job, def.task.index, def.protocol, def.port))
    }
}
