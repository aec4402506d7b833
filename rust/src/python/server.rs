//! `distsrv._native.Server`: a task's server as Python sees it. Each method converts its
//! arguments, asks the core for the work (which also says where it runs), and waits for it.

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use super::args::{ConfigArgs, SecurityArgs, TaskArg, seconds};
use super::devices::{DeviceTuple, device_tuple};
use super::errors::{IntoPyResult, to_py};
use super::handlers::PyHandler;
use super::peers::PeerEvents;
use super::pending::{Completed, OnDrop, Pending, completion_pipe};
use super::tensor::{HeldBuffer, array_in, array_in_place, array_out, numpy_dtype};
use super::values;
use super::wait::{current_pid, in_slices, wait, wait_lending};
use crate::base::cluster::{Cluster, Jobs, ServerDef, TaskId, format_address};
use crate::base::errors::Error;
use crate::base::security::Security;
use crate::node::Server;
use crate::ops::collectives::{Group, Kind};
use crate::ops::variables::{Reply, Step};
use crate::tensor::reduce::ReduceOp;
use crate::tensor::{ResultMemory, TensorMeta};

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
    #[pyo3(signature = (jobs, job_name, task_index, protocol, port, config, security=None))]
    #[allow(clippy::too_many_arguments)] // `distsrv.Server`'s own, one by one
    fn new(
        py: Python<'_>,
        jobs: Jobs,
        job_name: String,
        task_index: u32,
        protocol: String,
        port: u16,
        config: ConfigArgs,
        security: Option<SecurityArgs>,
    ) -> PyResult<Self> {
        let security = security.map_or_else(Security::open, |security| security.0);
        let config = config.0;
        let def = ServerDef {
            cluster: Cluster::new(jobs).into_py()?,
            task: TaskId::new(job_name, task_index),
            protocol,
            port,
        };
        let server = py
            .detach(|| Server::bind(def, config, security))
            .into_py()?;
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
        let stopped = in_slices(py, deadline, |slice| server.wait(Some(slice)).then_some(()))?;
        Ok(stopped.is_some())
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
    #[pyo3(signature = (to, name, array, timeout=None))]
    fn send(
        &self,
        py: Python<'_>,
        to: TaskArg,
        name: String,
        array: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let server = self.server()?;
        let timeout = seconds(timeout)?;
        let (meta, held, payload) = array_in(array)?;
        let sending = server.send(to.0, name, meta, payload, timeout).into_py()?;
        wait_lending(py, sending, vec![held])?.into_py()
    }

    /// Like `send`, but returns at once with a handle to wait on.
    fn isend(&self, to: TaskArg, name: String, array: &Bound<'_, PyAny>) -> PyResult<Pending> {
        let server = self.server()?;
        let (meta, held, payload) = array_in(array)?;
        let sending = server.isend(to.0, name, meta, payload).into_py()?;
        let (done, finished) = completion_pipe()?;
        let (runtime, task) = sending
            .map(|send| async move { send.await.map(|()| Completed::Sent) })
            .spawn(finished);
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
        let receiving = server.recv(source.0, name, timeout).into_py()?;
        array_out(py, wait(py, receiving)?.into_py()?)
    }

    /// The next tensor `name` from whichever of `sources` sends one first: (its source, the
    /// array).
    #[pyo3(signature = (sources, name, timeout=None))]
    fn recv_any<'py>(
        &self,
        py: Python<'py>,
        sources: Vec<TaskArg>,
        name: String,
        timeout: Option<f64>,
    ) -> PyResult<(String, Bound<'py, PyAny>)> {
        let timeout = seconds(timeout)?;
        let sources = sources.into_iter().map(|source| source.0).collect();
        let receiving = self.server()?.recv_any(sources, name, timeout).into_py()?;
        let (source, tensor) = wait(py, receiving)?.into_py()?;
        Ok((source.to_string(), array_out(py, tensor)?))
    }

    /// Like `recv`, but returns at once with a handle to wait on.
    #[pyo3(signature = (source, name, timeout=None))]
    fn irecv(&self, source: TaskArg, name: String, timeout: Option<f64>) -> PyResult<Pending> {
        let timeout = seconds(timeout)?;
        let receiving = self.server()?.irecv(source.0, name, timeout).into_py()?;
        let (done, finished) = completion_pipe()?;
        let (runtime, task) = receiving
            .map(|recv| async move { recv.await.map(Completed::Received) })
            .spawn(finished);
        Ok(Pending::new(
            runtime,
            task,
            done,
            Vec::new(),
            OnDrop::Cancel,
        ))
    }

    /// This member's part in collective `kind` ("all_reduce", "reduce_scatter", "all_gather",
    /// "broadcast", "barrier", "reduce", "gather", "scatter", "all_to_all") over `group` (its
    /// members in rank order; every task when None), giving `array`, with `op` for those that
    /// reduce and `root` for those that have one: the result, or None where this member gets
    /// none. With `inplace`, an all_reduce may write its result into `array` itself (a writable
    /// C-contiguous ndarray) and give None.
    #[pyo3(signature = (kind, group, array=None, op=None, root=None, timeout=None, inplace=false))]
    #[allow(clippy::too_many_arguments)] // one per argument of the Python call
    fn collective<'py>(
        &self,
        py: Python<'py>,
        kind: &str,
        group: Option<Vec<TaskArg>>,
        array: Option<Bound<'_, PyAny>>,
        op: Option<&str>,
        root: Option<TaskArg>,
        timeout: Option<f64>,
        inplace: bool,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let server = self.server()?;
        let (kind, group, held, given, into) =
            prepare(server, kind, group, array, op, root, inplace)?;
        let collective = server.collective(group, seconds(timeout)?).into_py()?;
        let running = collective.map(|collective| collective.run(kind, given, into));
        wait_lending(py, running, held.into_iter().collect())?
            .into_py()?
            .map(|tensor| array_out(py, tensor))
            .transpose()
    }

    /// Like `collective`, but returns at once with a handle to wait on.
    #[pyo3(signature = (kind, group, array=None, op=None, root=None, timeout=None, inplace=false))]
    #[allow(clippy::too_many_arguments)] // one per argument of the Python call
    fn icollective(
        &self,
        kind: &str,
        group: Option<Vec<TaskArg>>,
        array: Option<Bound<'_, PyAny>>,
        op: Option<&str>,
        root: Option<TaskArg>,
        timeout: Option<f64>,
        inplace: bool,
    ) -> PyResult<Pending> {
        let server = self.server()?;
        let (kind, group, held, given, into) =
            prepare(server, kind, group, array, op, root, inplace)?;
        let collective = server.icollective(group, seconds(timeout)?).into_py()?;
        let (done, finished) = completion_pipe()?;
        let (runtime, task) = collective
            .map(|collective| async move {
                collective
                    .run(kind, given, into)
                    .await
                    .map(Completed::Collected)
            })
            .spawn(finished);
        // A collective left unwaited still runs: the group's members count on its messages.
        Ok(Pending::new(
            runtime,
            task,
            done,
            held.into_iter().collect(),
            OnDrop::RunToEnd,
        ))
    }

    /// Applies `op` ("read", "create", "assign", "assign_add", "sgd_step", "momentum_step",
    /// "adam_step", "delete", "describe", "list") to variable `name` hosted on `host`, with
    /// `value` and the step's hyperparameters where it takes them. A read gives the value, a
    /// describe (dtype, shape), a list [(name, dtype, shape)], the rest None.
    #[pyo3(signature = (
        host, name, op, value=None, *, learning_rate=0.0, momentum=0.0, nesterov=false,
        beta1=0.0, beta2=0.0, epsilon=0.0, timeout=None,
    ))]
    #[allow(clippy::too_many_arguments)] // one per argument of the Python call
    fn variable_op<'py>(
        &self,
        py: Python<'py>,
        host: TaskArg,
        name: String,
        op: &str,
        value: Option<Bound<'_, PyAny>>,
        learning_rate: f64,
        momentum: f64,
        nesterov: bool,
        beta1: f64,
        beta2: f64,
        epsilon: f64,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let server = self.server()?;
        let timeout = seconds(timeout)?;
        let (held, value) = match value {
            Some(array) => {
                let (meta, held, bytes) = array_in(&array)?;
                (Some(held), Some((meta, bytes)))
            }
            None => (None, None),
        };
        let step = Step {
            learning_rate,
            momentum,
            nesterov,
            beta1,
            beta2,
            epsilon,
        };
        let applying = server
            .variable(host.0, name, op, value, step, timeout)
            .into_py()?;
        let described = |meta: TensorMeta| (numpy_dtype(py, meta.dtype), meta.shape);
        let reply = wait_lending(py, applying, held.into_iter().collect())?.into_py()?;
        Ok(match reply {
            Reply::Done => py.None().into_bound(py),
            Reply::Value(tensor) => array_out(py, tensor)?,
            Reply::Described(meta) => {
                let (dtype, shape) = described(meta);
                (dtype?, PyTuple::new(py, shape)?)
                    .into_pyobject(py)?
                    .into_any()
            }
            Reply::Listed(variables) => {
                let listed = variables
                    .into_iter()
                    .map(|(name, meta)| {
                        let (dtype, shape) = described(meta);
                        Ok((name, dtype?, PyTuple::new(py, shape)?))
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                listed.into_pyobject(py)?.into_any()
            }
        })
    }

    /// Tensors this task sent through shared memory and over gRPC, and received through shared
    /// memory, and remote operations it served through same-host links:
    /// `{"shm_sent": n, "grpc_sent": n, "shm_received": n, "shm_calls_served": n}`.
    fn transport_counts(&self) -> PyResult<BTreeMap<&'static str, u64>> {
        let counts = self.server()?.task().shm.counts();
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

    /// The other tasks' comings and goings, starting with how each is now.
    fn watch_peers(&self) -> PyResult<PeerEvents> {
        let (runtime, watch) = self.server()?.watch_peers().into_py()?;
        Ok(PeerEvents::new(runtime, watch))
    }

    /// Every task's devices in cluster order, all tasks asked at once, each for up to `timeout`
    /// seconds (the config's connect_timeout when None).
    #[pyo3(signature = (timeout=None))]
    fn list_devices(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<DeviceTuple>> {
        let server = self.server()?;
        let timeout = seconds(timeout)?.unwrap_or(server.task().config.connect_timeout);
        let statuses = wait(py, server.statuses(timeout).into_py()?)?;
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
        let waiting = server.wait_for_cluster(timeout).into_py()?;
        let incarnations = wait(py, waiting)?.into_py()?;
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
        let (kwargs, lent) = values::encode_kwargs(kwargs)?;
        let calling = server.call(to.0, op, kwargs, timeout).into_py()?;
        let result = wait_lending(py, calling, lent)?;
        Ok(values::decode_returned(py, result.into_py()?)?.unbind())
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
        let (kwargs, lent) = values::encode_kwargs(kwargs)?;
        let calling = server.icall(to.0, op, kwargs, timeout).into_py()?;
        let (done, finished) = completion_pipe()?;
        let (runtime, task) = calling
            .map(|call| async move { call.await.map(Completed::Called) })
            .spawn(finished);
        Ok(Pending::new(runtime, task, done, lent, OnDrop::Cancel))
    }
}

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

/// A collective call's arguments as the core takes them, checked for what this member can refuse
/// alone.
type Prepared = (
    Kind,
    Group,
    Option<HeldBuffer>,
    Option<(TensorMeta, Bytes)>,
    Option<ResultMemory>,
);

fn prepare(
    server: &Server,
    kind: &str,
    group: Option<Vec<TaskArg>>,
    array: Option<Bound<'_, PyAny>>,
    op: Option<&str>,
    root: Option<TaskArg>,
    inplace: bool,
) -> PyResult<Prepared> {
    let op = op.map(ReduceOp::parse).transpose().into_py()?;
    let kind = Kind::new(kind, op, root.map(|root| root.0)).into_py()?;
    let members = group.map(|tasks| tasks.into_iter().map(|task| task.0).collect());
    let group = server.group(members).into_py()?;
    // Only a ring writes its result in place: an all-to-all's result is small, and copied.
    let in_place = match &array {
        Some(array) if inplace && matches!(kind, Kind::AllReduce(_)) => {
            array_in_place(array, |bytes| group.rings(bytes))?
        }
        _ => None,
    };
    let (held, given, into) = match (array, in_place) {
        (_, Some((meta, bytes, into))) => (None, Some((meta, bytes)), Some(into)),
        (Some(array), None) => {
            let (meta, held, bytes) = array_in(&array)?;
            (Some(held), Some((meta, bytes)), None)
        }
        (None, None) => (None, None, None),
    };
    group
        .check(&kind, given.as_ref().map(|(meta, _)| meta))
        .into_py()?;
    Ok((kind, group, held, given, into))
}
