//! `distsrv._native.Server`: a task's server as Python sees it.

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyString, PyTuple};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::devices::{DeviceTuple, device_tuple};
use super::errors::{IntoPyResult, to_py};
use super::handlers::PyHandler;
use super::tensor::{HeldBuffer, array_in, array_out};
use super::values;
use crate::cluster::{Cluster, Jobs, ServerDef, TaskId, format_address};
use crate::codec::{Tensor, TensorMeta};
use crate::collectives::{Collective, Group};
use crate::config::ServerConfig;
use crate::errors::{Error, Result};
use crate::peers::Peers;
use crate::proto;
use crate::reduce::ReduceOp;
use crate::registry;
use crate::server::Server;
use crate::service::Task;
use crate::variables;

/// How long a blocking call waits between checks for signals, so Ctrl-C interrupts it promptly.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// Threads inside a blocking wait (`join`, `send`, `recv`, `call`, `wait`) or running a handler.
/// At interpreter exit, a thread that takes the GIL back after finalization has begun is ended by
/// CPython with a forced unwind, which must not cross Rust frames; so the exit handler stops every
/// server (waking the waiting threads) and waits for this count to reach zero first.
static BLOCKED_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Counts the current thread as blocked in Rust while alive.
pub(super) struct Blocked;

impl Blocked {
    pub(super) fn enter() -> Self {
        BLOCKED_THREADS.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        BLOCKED_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many threads are inside a blocking distsrv call right now.
#[pyfunction]
pub fn blocked_threads() -> usize {
    BLOCKED_THREADS.load(Ordering::SeqCst)
}

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
    fn into_config(self) -> PyResult<ServerConfig> {
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

/// This process's id, kept current across `fork()` by a child handler: every operation checks it,
/// and asking the kernel each time is a system call on the path of every small tensor.
fn current_pid() -> u32 {
    static WATCHED: std::sync::Once = std::sync::Once::new();
    WATCHED.call_once(|| {
        PID.store(std::process::id(), Ordering::Relaxed);
        // SAFETY: registers a handler that only stores the child's id.
        unsafe { libc::pthread_atfork(None, None, Some(forked)) };
    });
    PID.load(Ordering::Relaxed)
}

static PID: AtomicU32 = AtomicU32::new(0);

extern "C" fn forked() {
    PID.store(std::process::id(), Ordering::Relaxed);
}

fn seconds(value: Option<f64>) -> PyResult<Option<Duration>> {
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

#[pyclass(frozen, name = "Server", module = "distsrv._native")]
pub struct NativeServer {
    server: ManuallyDrop<Server>,
    /// The process that made the server: its runtime's threads exist only there.
    pid: u32,
}

#[pymethods]
impl NativeServer {
    /// Binds the task's address (port 0 picks a free port); serving starts with `start()`.
    #[new]
    fn new(
        py: Python<'_>,
        jobs: Jobs,
        job_name: String,
        task_index: u32,
        protocol: String,
        port: u16,
        config: ConfigArgs,
    ) -> PyResult<Self> {
        let config = config.into_config()?;
        let def = ServerDef {
            cluster: Cluster::new(jobs).into_py()?,
            task: TaskId::new(job_name, task_index),
            protocol,
            port,
        };
        let server = py.detach(|| Server::bind(def, config)).into_py()?;
        Ok(Self {
            server: ManuallyDrop::new(server),
            pid: current_pid(),
        })
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let server = self.server()?;
        py.detach(|| server.start()).into_py()
    }

    #[pyo3(signature = (grace=None))]
    fn stop(&self, py: Python<'_>, grace: Option<f64>) -> PyResult<()> {
        let grace = seconds(grace)?;
        let server = self.server()?;
        py.detach(|| server.stop(grace));
        Ok(())
    }

    /// Blocks until the server has stopped or `timeout` seconds passed; whether it stopped.
    #[pyo3(signature = (timeout=None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let server = self.server()?;
        let deadline = seconds(timeout)?.map(|t| std::time::Instant::now() + t);
        let _blocked = Blocked::enter();
        loop {
            let slice = match deadline {
                Some(deadline) => deadline
                    .saturating_duration_since(std::time::Instant::now())
                    .min(SIGNAL_CHECK),
                None => SIGNAL_CHECK,
            };
            if py.detach(|| server.wait(Some(slice))) {
                return Ok(true);
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(false);
            }
            py.check_signals()?;
        }
    }

    #[getter]
    fn status(&self) -> &'static str {
        self.server.status().as_str()
    }

    /// This task's address as the cluster knows it, with the real port.
    #[getter]
    fn address(&self) -> String {
        // `Server::bind` put the bound port into the cluster's entry for this task.
        let server = &self.server;
        server
            .cluster()
            .address(server.task_id())
            .unwrap_or_default()
            .to_owned()
    }

    /// The socket address actually listened on.
    #[getter]
    fn listen_address(&self) -> String {
        let local = self.server.local_addr();
        format_address(&local.ip().to_string(), local.port())
    }

    #[getter]
    fn port(&self) -> u16 {
        self.server.local_addr().port()
    }

    #[getter]
    fn incarnation(&self) -> u64 {
        self.server.task().incarnation
    }

    fn server_def_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.server.server_def().encode())
    }

    /// Sends `array` to task `to`; returns once the receiving server holds all of it.
    fn send(
        &self,
        py: Python<'_>,
        to: TaskArg,
        name: String,
        array: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let server = self.server()?;
        let runtime = server.caller_runtime().into_py()?;
        let (held, future) = start_send(server, &server.task().caller_peers, to, name, array)?;
        let sent = drive_interruptibly(py, &runtime, future);
        held.release(py);
        py.detach(|| drop(runtime));
        sent?.into_py()
    }

    /// Like `send`, but returns at once with a handle to wait on.
    fn isend(&self, to: TaskArg, name: String, array: &Bound<'_, PyAny>) -> PyResult<Pending> {
        let server = self.server()?;
        let runtime = server.runtime().into_py()?;
        let (held, future) = start_send(server, &server.task().peers, to, name, array)?;
        let (done, finished) = completion_pipe()?;
        let task = runtime.spawn(async move {
            let _done = finished;
            future.await.map(|()| Completed::Sent)
        });
        Ok(Pending::new(
            runtime,
            task,
            done,
            vec![held],
            OnDrop::RunToEnd,
        ))
    }

    /// Receives the next tensor `name` from `source`, as a numpy array.
    #[pyo3(signature = (source, name, timeout=None))]
    fn recv<'py>(
        &self,
        py: Python<'py>,
        source: TaskArg,
        name: String,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let timeout = seconds(timeout)?;
        let server = self.server()?;
        let runtime = server.runtime().into_py()?;
        let received = wait_interruptibly(
            py,
            &runtime,
            server.task().exchange.recv(source.0, name, timeout),
        )?;
        array_out(py, received.into_py()?)
    }

    /// Like `recv`, but returns at once with a handle to wait on.
    #[pyo3(signature = (source, name, timeout=None))]
    fn irecv(&self, source: TaskArg, name: String, timeout: Option<f64>) -> PyResult<Pending> {
        let timeout = seconds(timeout)?;
        let server = self.server()?;
        let runtime = server.runtime().into_py()?;
        let task = server.task().clone();
        let source = source.0;
        let (done, finished) = completion_pipe()?;
        let join = runtime.spawn(async move {
            let _done = finished;
            task.exchange
                .recv(source, name, timeout)
                .await
                .map(Completed::Received)
        });
        Ok(Pending::new(
            runtime,
            join,
            done,
            Vec::new(),
            OnDrop::Cancel,
        ))
    }

    /// The element-wise `op` ("sum", "mean", "max", "min", "prod") of every member's tensor;
    /// `group` lists the members (every task when None).
    #[pyo3(signature = (group, op, array, timeout=None))]
    fn all_reduce<'py>(
        &self,
        py: Python<'py>,
        group: Option<Vec<TaskArg>>,
        op: &str,
        array: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let op = ReduceOp::parse(op).into_py()?;
        let given = Some(array);
        let check = |_: &Group, meta: Option<&TensorMeta>| op.check(meta.expect("given").dtype);
        self.collective(py, group, timeout, given, check, |run, given| {
            let (meta, data) = given.expect("given above");
            run.all_reduce(op, meta, data)
        })
    }

    /// Rows `r*m .. (r+1)*m` of the reduction of every member's tensor, for the member of rank r.
    #[pyo3(signature = (group, op, array, timeout=None))]
    fn reduce_scatter<'py>(
        &self,
        py: Python<'py>,
        group: Option<Vec<TaskArg>>,
        op: &str,
        array: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let op = ReduceOp::parse(op).into_py()?;
        let given = Some(array);
        let check = |_: &Group, meta: Option<&TensorMeta>| op.check(meta.expect("given").dtype);
        self.collective(py, group, timeout, given, check, |run, given| {
            let (meta, data) = given.expect("given above");
            run.reduce_scatter(op, meta, data)
        })
    }

    /// Every member's tensor, stacked in rank order.
    #[pyo3(signature = (group, array, timeout=None))]
    fn all_gather<'py>(
        &self,
        py: Python<'py>,
        group: Option<Vec<TaskArg>>,
        array: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let given = Some(array);
        let check = |_: &Group, _: Option<&TensorMeta>| Ok(());
        self.collective(py, group, timeout, given, check, |run, given| {
            let (meta, data) = given.expect("given above");
            run.all_gather(meta, data)
        })
    }

    /// `root`'s tensor on every member; members other than the root may give None.
    #[pyo3(signature = (group, root, array, timeout=None))]
    fn broadcast<'py>(
        &self,
        py: Python<'py>,
        group: Option<Vec<TaskArg>>,
        root: TaskArg,
        array: Option<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let root = root.0;
        let given = array.as_ref();
        let check = |group: &Group, _: Option<&TensorMeta>| group.rank_of(&root).map(drop);
        let root_of_run = root.clone();
        self.collective(py, group, timeout, given, check, |run, given| async move {
            run.broadcast(&root_of_run, given).await
        })
    }

    /// Returns once every member has called it.
    #[pyo3(signature = (group, timeout=None))]
    fn barrier(
        &self,
        py: Python<'_>,
        group: Option<Vec<TaskArg>>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let server = self.server()?;
        let runtime = server.caller_runtime().into_py()?;
        let task = server.task();
        let group = collective_group(task, group)?;
        let run =
            task.collectives
                .begin(&task.exchange, &task.caller_peers, group, seconds(timeout)?);
        let done = drive_interruptibly(py, &runtime, run.barrier());
        py.detach(|| drop(runtime));
        done?.into_py()
    }

    /// Applies `op` ("read", "create", "assign", "assign_add", "sgd_step") to variable `name`
    /// hosted on `host`; a read gives the value.
    #[pyo3(signature = (host, name, op, value=None, learning_rate=0.0))]
    fn variable_op<'py>(
        &self,
        py: Python<'py>,
        host: TaskArg,
        name: String,
        op: &str,
        value: Option<Bound<'_, PyAny>>,
        learning_rate: f64,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        use crate::proto::variable_request::Op;
        let op = Op::from_str_name(&op.to_uppercase()).ok_or_else(|| {
            to_py(Error::invalid_argument(format!(
                "unknown variable op {op:?}"
            )))
        })?;
        let server = self.server()?;
        let runtime = server.runtime().into_py()?;
        let task = Arc::clone(server.task());
        let (held, value) = match value {
            Some(array) => {
                let (meta, held, bytes) = array_in(&array)?;
                (Some(held), Some(crate::codec::tensor_proto(&meta, bytes)))
            }
            None => (None, None),
        };
        let request = crate::proto::VariableRequest {
            name,
            op: op as i32,
            value,
            learning_rate,
        };
        let host = host.0;
        let response = wait_interruptibly(py, &runtime, async move {
            variables::call(
                &host,
                request,
                &task.variables,
                &task.def.task,
                &task.peers,
                task.config.max_message_bytes,
            )
            .await
        });
        if let Some(held) = held {
            held.release(py);
        }
        response?
            .into_py()?
            .map(|tensor| array_out(py, tensor))
            .transpose()
    }

    /// Tensors this task sent through shared memory and over gRPC, and received through shared
    /// memory, and remote operations it served through same-host links:
    /// `{"shm_sent": n, "grpc_sent": n, "shm_received": n, "shm_calls_served": n}`.
    fn transport_counts(&self) -> PyResult<BTreeMap<&'static str, u64>> {
        let counts = self.server()?.task().exchange.shm().counts();
        Ok(BTreeMap::from([
            ("shm_sent", counts.shm_sent),
            ("grpc_sent", counts.grpc_sent),
            ("shm_received", counts.shm_received),
            ("shm_calls_served", counts.shm_calls_served),
        ]))
    }

    /// This task's devices.
    fn local_devices(&self) -> PyResult<Vec<DeviceTuple>> {
        let devices = self.server()?.task().devices.clone();
        Ok(devices.into_iter().map(device_tuple).collect())
    }

    /// Every task's devices in cluster order, all tasks asked at once, each for up to `timeout`
    /// seconds (the config's connect_timeout when None).
    #[pyo3(signature = (timeout=None))]
    fn list_devices(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<DeviceTuple>> {
        let server = self.server()?;
        let task = server.task();
        let timeout = seconds(timeout)?.unwrap_or(task.config.connect_timeout);
        let runtime = server.runtime().into_py()?;
        let statuses = wait_interruptibly(py, &runtime, registry::statuses(task, timeout))?;
        let devices = statuses.into_py()?.into_iter().flat_map(|(_, s)| s.devices);
        Ok(devices.map(device_tuple).collect())
    }

    /// Waits until every task answers; task name -> incarnation.
    #[pyo3(signature = (timeout=None))]
    fn wait_for_cluster(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<BTreeMap<String, u64>> {
        let timeout = seconds(timeout)?;
        let server = self.server()?;
        let runtime = server.runtime().into_py()?;
        let waited = registry::wait_for_cluster(server.task(), timeout);
        let incarnations = wait_interruptibly(py, &runtime, waited)?.into_py()?;
        Ok(incarnations
            .into_iter()
            .map(|(task, incarnation)| (task.to_string(), incarnation))
            .collect())
    }

    /// Serves operation `op` with `function`, called with the call's keyword arguments (and
    /// `context` when `wants_context`). With `scheduled`, `function` returns a
    /// `concurrent.futures.Future` of the result instead of the result.
    fn add_handler(
        &self,
        op: String,
        function: Py<PyAny>,
        scheduled: bool,
        wants_context: bool,
    ) -> PyResult<()> {
        let handler = PyHandler::new(function, scheduled, wants_context);
        self.server()?.task().operations.add(op, Arc::new(handler));
        Ok(())
    }

    /// Stops serving `op`; whether it was served.
    fn remove_handler(&self, op: &str) -> PyResult<bool> {
        Ok(self.server()?.task().operations.remove(op))
    }

    /// Refuses calls of `ops` with PermissionDeniedError.
    fn block_handlers(&self, ops: Vec<String>) -> PyResult<()> {
        self.server()?.task().operations.block(ops);
        Ok(())
    }

    /// Runs operation `op` on task `to` with `kwargs` and returns its result. TypeError, before
    /// anything is sent, for arguments that cannot be encoded.
    #[pyo3(signature = (to, op, kwargs, timeout=None))]
    fn call(
        &self,
        py: Python<'_>,
        to: TaskArg,
        op: String,
        kwargs: &Bound<'_, PyDict>,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let timeout = seconds(timeout)?;
        let server = self.server()?;
        let runtime = server.caller_runtime().into_py()?;
        let (kwargs, lent) = values::encode_kwargs(kwargs)?;
        let task = server.task();
        let called = task
            .operations
            .call(&task.caller_peers, to.0, op, kwargs, timeout);
        let result = drive_interruptibly(py, &runtime, called);
        py.detach(|| drop(runtime));
        for held in lent {
            held.release(py);
        }
        Ok(values::decode(py, result?.into_py()?)?.unbind())
    }

    /// Like `call`, but returns at once with a handle to wait on.
    #[pyo3(signature = (to, op, kwargs, timeout=None))]
    fn icall(
        &self,
        to: TaskArg,
        op: String,
        kwargs: &Bound<'_, PyDict>,
        timeout: Option<f64>,
    ) -> PyResult<Pending> {
        let timeout = seconds(timeout)?;
        let server = self.server()?;
        let runtime = server.runtime().into_py()?;
        let (kwargs, lent) = values::encode_kwargs(kwargs)?;
        let task = server.task().clone();
        let (done, finished) = completion_pipe()?;
        let join = runtime.spawn(async move {
            let _done = finished;
            task.operations
                .call(&task.peers, to.0, op, kwargs, timeout)
                .await
                .map(Completed::Called)
        });
        Ok(Pending::new(runtime, join, done, lent, OnDrop::Cancel))
    }
}

type SendFuture = std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>;

impl NativeServer {
    /// The server, unless this is a forked child of the process that made it.
    fn server(&self) -> PyResult<&Server> {
        if current_pid() != self.pid {
            return Err(to_py(Error::failed_precondition(format!(
                "this server was created in process {} and cannot be used after fork(); create \
                 servers in the process that uses them (or use the 'spawn' start method)",
                self.pid
            ))));
        }
        Ok(&self.server)
    }

    /// Runs one collective over `group` with the `given` array lent to it, once `check` has found
    /// nothing to refuse.
    fn collective<'py, C, F, Fut>(
        &self,
        py: Python<'py>,
        group: Option<Vec<TaskArg>>,
        timeout: Option<f64>,
        given: Option<&Bound<'_, PyAny>>,
        check: C,
        run: F,
    ) -> PyResult<Bound<'py, PyAny>>
    where
        C: FnOnce(&Group, Option<&TensorMeta>) -> Result<()>,
        F: FnOnce(Collective, Option<(TensorMeta, Bytes)>) -> Fut,
        Fut: Future<Output = Result<Tensor>> + Send,
    {
        let server = self.server()?;
        let runtime = server.caller_runtime().into_py()?;
        let (held, given) = match given {
            Some(array) => {
                let (meta, held, bytes) = array_in(array)?;
                (Some(held), Some((meta, bytes)))
            }
            None => (None, None),
        };
        let task = server.task();
        let group = collective_group(task, group)?;
        check(&group, given.as_ref().map(|(meta, _)| meta)).into_py()?;
        let collective =
            task.collectives
                .begin(&task.exchange, &task.caller_peers, group, seconds(timeout)?);
        let done = drive_interruptibly(py, &runtime, run(collective, given));
        py.detach(|| drop(runtime));
        if let Some(held) = held {
            held.release(py);
        }
        array_out(py, done?.into_py()?)
    }
}

/// Starts a send of `array` over `connections`, those of the runtime that will drive it.
fn start_send(
    server: &Server,
    connections: &Arc<Peers>,
    to: TaskArg,
    name: String,
    array: &Bound<'_, PyAny>,
) -> PyResult<(HeldBuffer, SendFuture)> {
    let (meta, held, payload) = array_in(array)?;
    let future = server
        .task()
        .exchange
        .send_via(connections, to.0, name, meta, payload)
        .into_py()?;
    Ok((held, Box::pin(future)))
}

impl Drop for NativeServer {
    fn drop(&mut self) {
        if current_pid() == self.pid {
            // SAFETY: dropped exactly once, here.
            let server = unsafe { ManuallyDrop::take(&mut self.server) };
            Python::attach(|py| py.detach(|| drop(server)));
        }
        // In a forked child the runtime's threads do not exist: stopping it would hang, so the
        // copy is left alone.
    }
}

fn collective_group(task: &Task, members: Option<Vec<TaskArg>>) -> PyResult<Group> {
    let members = members.map(|tasks| tasks.into_iter().map(|task| task.0).collect());
    Group::new(&task.exchange, members).into_py()
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

/// Drives `future` without the GIL, checking for signals in between so Ctrl-C raises
/// KeyboardInterrupt (dropping the future, which abandons the operation cleanly).
///
/// The future is polled on this thread inside the runtime's context, and the thread parks until
/// the future's waker or the next signal check. No timer is made for the wait itself: a stop that
/// shuts the runtime down mid-wait must not find a new one being registered.
pub(super) fn wait_interruptibly<F>(
    py: Python<'_>,
    runtime: &Handle,
    future: F,
) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let _blocked = Blocked::enter();
    loop {
        let polled = py.detach(|| {
            let _entered = runtime.enter();
            let mut context = Context::from_waker(&waker);
            let check_signals_at = Instant::now() + SIGNAL_CHECK;
            loop {
                if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                    return Some(output);
                }
                let left = check_signals_at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                std::thread::park_timeout(left);
            }
        });
        match polled {
            Some(output) => return Ok(output),
            None => py.check_signals()?,
        }
    }
}

/// Like [`wait_interruptibly`], for a future on a current-thread runtime (the server's caller
/// runtime), which this thread drives itself while no other thread does.
fn drive_interruptibly<F>(
    py: Python<'_>,
    runtime: &tokio::runtime::Runtime,
    future: F,
) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let mut future = std::pin::pin!(future);
    let _blocked = Blocked::enter();
    loop {
        let slice = py.detach(|| {
            runtime.block_on(async { tokio::time::timeout(SIGNAL_CHECK, &mut future).await.ok() })
        });
        match slice {
            Some(output) => return Ok(output),
            None => py.check_signals()?,
        }
    }
}

/// Wakes a thread parked in [`wait_interruptibly`].
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

enum Completed {
    Sent,
    Received(Tensor),
    Called(proto::Value),
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
fn completion_pipe() -> PyResult<(std::io::PipeReader, std::io::PipeWriter)> {
    std::io::pipe().map_err(|e| to_py(Error::internal(format!("cannot create a pipe: {e}"))))
}

/// A send, receive or call in flight (`isend` / `irecv` / `icall`). Dropping an unfinished
/// receive or call cancels it; an unfinished send runs to its end.
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
enum OnDrop {
    /// A send runs to its end: its acknowledgement is what makes it safe.
    RunToEnd,
    /// A receive or a call nobody waits for any more is cancelled.
    Cancel,
}

impl Pending {
    fn new(
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
            Completed::Called(value) => values::decode(py, value)?.unbind(),
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
