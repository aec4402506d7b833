//! Python functions as handlers of remote operations.
//!
//! A call runs its function on a thread of the runtime's blocking pool, which takes the GIL
//! there: a handler that blocks holds one pool thread, never the threads serving other calls.
//! An `async def` handler is started the same way and finishes on the server's event loop (see
//! `distsrv.handlers`); its result comes back through a done-callback.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyCFunction, PyDict, PyType};
use tokio::sync::oneshot;
use tonic::metadata::{KeyAndValueRef, MetadataMap};

use super::values;
use super::wait::Blocked;
use crate::base::errors::{Code, Error, Result};
use crate::ops::remote::{Call, Handler};
use crate::proto;

/// The parameter through which a handler asks for its call's context.
const CONTEXT: &str = "context";

static CALL_CONTEXT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static ERROR_CODE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

pub struct PyHandler(Arc<Function>);

struct Function {
    function: Py<PyAny>,
    /// `function` starts a coroutine on the event loop and returns its
    /// `concurrent.futures.Future` instead of the result.
    scheduled: bool,
    /// `function` takes the call's `distsrv.handlers.CallContext` as `context`.
    wants_context: bool,
}

impl PyHandler {
    pub fn new(function: Py<PyAny>, scheduled: bool, wants_context: bool) -> Self {
        Self(Arc::new(Function {
            function,
            scheduled,
            wants_context,
        }))
    }
}

enum Started {
    Finished(proto::Value),
    Scheduled(oneshot::Receiver<Result<proto::Value>>),
}

impl Handler for PyHandler {
    fn call(&self, call: Call) -> BoxFuture<'static, Result<proto::Value>> {
        let function = Arc::clone(&self.0);
        Box::pin(async move {
            let started = tokio::task::spawn_blocking(move || function.start(call))
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("the handler failed: {e}"))))?;
            match started {
                Started::Finished(value) => Ok(value),
                Started::Scheduled(finished) => finished.await.unwrap_or_else(|_| {
                    Err(Error::cancelled(
                        "the server's event loop stopped before the handler finished",
                    ))
                }),
            }
        })
    }
}

/// Python makes a thread state for a thread that attaches without one, with a frame stack that
/// it maps fresh, and frees both on detaching: an mmap and an munmap per call. A thread that
/// has run a handler keeps its thread state instead (not holding the GIL) until it ends.
struct KeptThreadState;

impl KeptThreadState {
    fn new() -> Self {
        // SAFETY: this thread holds no GIL (it is about to attach); the state made here stays
        // registered for the thread, so later attaches reuse it.
        unsafe {
            ffi::PyGILState_Ensure();
            ffi::PyEval_SaveThread();
        }
        Self
    }
}

impl Drop for KeptThreadState {
    fn drop(&mut self) {
        // SAFETY: the thread is ending and holds no GIL; the first release keeps the GIL taken
        // by the ensure, the second (of `new`'s ensure) deletes the thread state and drops it.
        unsafe {
            if ffi::Py_IsInitialized() != 0 {
                ffi::PyGILState_Ensure();
                ffi::PyGILState_Release(ffi::PyGILState_STATE::PyGILState_LOCKED);
                ffi::PyGILState_Release(ffi::PyGILState_STATE::PyGILState_UNLOCKED);
            }
        }
    }
}

thread_local! {
    static THREAD_STATE: KeptThreadState = KeptThreadState::new();
}

impl Function {
    fn start(&self, call: Call) -> Result<Started> {
        // Counted so that interpreter exit waits for the handler to give the GIL back.
        let _running = Blocked::enter();
        THREAD_STATE.with(|_| ());
        Python::attach(|py| {
            let kwargs = values::decode_entries(py, call.kwargs, call.arrived.as_ref())
                .map_err(|error| from_python(py, &error, false))?;
            if self.wants_context {
                if kwargs.contains(CONTEXT).unwrap_or(true) {
                    return Err(Error::invalid_argument(format!(
                        "operation {:?} takes its {CONTEXT:?} from the server, not from the caller",
                        call.op
                    )));
                }
                let context = context(
                    py,
                    call.op,
                    call.caller.map(|t| t.to_string()),
                    &call.metadata,
                )
                .map_err(|error| from_python(py, &error, false))?;
                kwargs
                    .set_item(CONTEXT, context)
                    .map_err(|error| from_python(py, &error, false))?;
            }
            let returned = self
                .function
                .bind(py)
                .call((), Some(&kwargs))
                .map_err(|error| from_python(py, &error, true))?;
            if self.scheduled {
                schedule_result(&returned).map_err(|error| from_python(py, &error, false))
            } else {
                values::encode(&returned)
                    .map(Started::Finished)
                    .map_err(|error| from_python(py, &error, true))
            }
        })
    }
}

/// Sends the outcome of a `concurrent.futures.Future` through a channel once it is done.
fn schedule_result(future: &Bound<'_, PyAny>) -> PyResult<Started> {
    let (sender, finished) = oneshot::channel();
    let sender = Mutex::new(Some(sender));
    let done = PyCFunction::new_closure(
        future.py(),
        None,
        None,
        move |args, _kwargs| -> PyResult<()> {
            let future = args.get_item(0)?;
            let py = future.py();
            let outcome = future
                .call_method0("result")
                .and_then(|result| values::encode(&result))
                .map_err(|error| from_python(py, &error, true));
            if let Some(sender) = sender.lock().unwrap_or_else(|e| e.into_inner()).take() {
                // The call may have been given up already; then nobody wants the outcome.
                let _ = sender.send(outcome);
            }
            Ok(())
        },
    )?;
    future.call_method1("add_done_callback", (done,))?;
    Ok(Started::Scheduled(finished))
}

/// `distsrv.handlers.CallContext(op, caller, metadata)`; metadata without gRPC's own entries.
fn context<'py>(
    py: Python<'py>,
    op: String,
    caller: Option<String>,
    metadata: &MetadataMap,
) -> PyResult<Bound<'py, PyAny>> {
    let entries = PyDict::new(py);
    for entry in metadata.iter() {
        match entry {
            KeyAndValueRef::Ascii(key, value) => {
                let key = key.as_str();
                if key.starts_with("grpc-") || matches!(key, "te" | "content-type") {
                    continue;
                }
                if let Ok(value) = value.to_str() {
                    entries.set_item(key, value)?;
                }
            }
            KeyAndValueRef::Binary(key, value) => {
                if let Ok(value) = value.to_bytes() {
                    entries.set_item(key.as_str(), PyBytes::new(py, &value))?;
                }
            }
        }
    }
    let class = CALL_CONTEXT.import(py, "distsrv.handlers", "CallContext")?;
    class.call1((op, caller, entries))
}

/// The error a caller gets for a Python exception: the code of its `distsrv.errors` class
/// (UNKNOWN for any other), its message, and, when the handler itself raised it, its type name.
fn from_python(py: Python<'_>, error: &PyErr, raised_by_handler: bool) -> Error {
    let value = error.value(py);
    let class = value.get_type();
    let code = ERROR_CODE
        .import(py, "distsrv.errors", "error_code_from_exception_type")
        .and_then(|code_of| code_of.call1((&class,))?.extract::<i32>())
        .map_or(Code::Unknown, Code::from_i32);
    let message = value
        .str()
        .map_or_else(|_| String::new(), |m| m.to_string());
    Error {
        exception_type: raised_by_handler.then(|| type_name(&class)),
        ..Error::new(code, message)
    }
}

/// "ValueError" for a builtin, "package.module.Name" for the rest.
fn type_name(class: &Bound<'_, PyType>) -> String {
    let name = class
        .qualname()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string());
    match class.module() {
        Ok(module) if module.to_str().is_ok_and(|m| m != "builtins") => format!("{module}.{name}"),
        _ => name,
    }
}
