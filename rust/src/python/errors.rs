//! The one place Rust errors become Python exceptions: the `distsrv.errors` class of the same
//! gRPC code, so Python code catches them as it would TensorFlow's. An error from a peer also
//! names the task it happened on, and a remote handler's exception its type.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::base::errors::Error;

static EXCEPTION_TYPE_FROM_CODE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static FROM_PEER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

pub fn to_py(error: Error) -> PyErr {
    Python::attach(|py| {
        let build = || -> PyResult<PyErr> {
            if error.task.is_some() || error.exception_type.is_some() {
                let from_peer = FROM_PEER.import(py, "distsrv.errors", "from_peer")?;
                let arguments = (
                    error.code as i32,
                    &error.message,
                    &error.task,
                    &error.exception_type,
                );
                return Ok(PyErr::from_value(from_peer.call1(arguments)?));
            }
            let from_code = EXCEPTION_TYPE_FROM_CODE.get_or_try_init(py, || {
                py.import("distsrv.errors")?
                    .getattr("exception_type_from_error_code")
                    .map(Bound::unbind)
            })?;
            let class = from_code.bind(py).call1((error.code as i32,))?;
            Ok(PyErr::from_value(class.call1((error.message.clone(),))?))
        };
        build().unwrap_or_else(|e| e)
    })
}

/// `?`-friendly conversion for results crossing into Python.
pub trait IntoPyResult<T> {
    fn into_py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn into_py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
