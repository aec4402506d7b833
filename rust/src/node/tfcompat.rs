//! TensorFlow's own RPCs, at the paths its runtime calls: `/tensorflow.WorkerService/...` and
//! `/tensorflow.MasterService/...`, which TensorFlow registers by hand (no `.grpc`, unlike its
//! protos' service names). So stock TensorFlow can list a distsrv cluster's devices:
//! `tf.compat.v1.Session("grpc://<task>").list_devices()` creates a session with an empty graph,
//! lists the devices, and closes the session. distsrv runs no graphs: a session is only a handle.
//! (Asking a stock TensorFlow server for its devices is `transport::status`'s.)

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::Service;

use super::status;
use super::task::Task;
use crate::base::errors::{Code, Error, Result};
use crate::tfproto;
use crate::transport::status::TF_GET_STATUS_PATH;
use crate::transport::tls::calling_peer;
const CREATE_SESSION_PATH: &str = "/tensorflow.MasterService/CreateSession";
const LIST_DEVICES_PATH: &str = "/tensorflow.MasterService/ListDevices";
const CLOSE_SESSION_PATH: &str = "/tensorflow.MasterService/CloseSession";
/// Open sessions a task keeps; a client that never closes its sessions cannot grow it further.
const MAX_SESSIONS: usize = 4096;

/// `tensorflow.WorkerService`: GetStatus, answered with this task's devices.
#[derive(Clone)]
pub struct WorkerService {
    task: Arc<Task>,
}

impl WorkerService {
    pub fn new(task: &Arc<Task>) -> Self {
        Self {
            task: Arc::clone(task),
        }
    }
}

impl NamedService for WorkerService {
    const NAME: &'static str = "tensorflow.WorkerService";
}

impl Service<http::Request<Body>> for WorkerService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match request.uri().path() {
            TF_GET_STATUS_PATH => unary(&self.task, request, Arc::clone(&self.task), get_status),
            _ => unimplemented(&request),
        }
    }
}

async fn get_status(
    task: Arc<Task>,
    _request: tfproto::GetStatusRequest,
) -> Result<tfproto::GetStatusResponse> {
    Ok(tfproto::GetStatusResponse {
        device_attributes: task.devices.clone(),
    })
}

/// `tensorflow.MasterService`: sessions with empty graphs, and the cluster's devices.
#[derive(Clone)]
pub struct MasterService {
    task: Arc<Task>,
    sessions: Arc<Mutex<HashSet<String>>>,
}

impl MasterService {
    pub fn new(task: &Arc<Task>) -> Self {
        Self {
            task: Arc::clone(task),
            sessions: Arc::default(),
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashSet<String>> {
        // Every update is one insert or remove, so a poisoned set is still consistent.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl NamedService for MasterService {
    const NAME: &'static str = "tensorflow.MasterService";
}

impl Service<http::Request<Body>> for MasterService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let task = &self.task;
        match request.uri().path() {
            CREATE_SESSION_PATH => unary(task, request, self.clone(), create_session),
            LIST_DEVICES_PATH => unary(task, request, self.clone(), list_devices),
            CLOSE_SESSION_PATH => unary(task, request, self.clone(), close_session),
            _ => unimplemented(&request),
        }
    }
}

async fn create_session(
    master: MasterService,
    request: tfproto::CreateSessionRequest,
) -> Result<tfproto::CreateSessionResponse> {
    let nodes = request.graph_def.map_or(0, |graph| graph.node.len());
    if nodes > 0 {
        return Err(Error::new(
            Code::Unimplemented,
            format!(
                "distsrv does not execute TensorFlow graphs (this one has {nodes} nodes); a \
                 session with an empty graph can list the cluster's devices"
            ),
        ));
    }
    let mut sessions = master.sessions();
    if sessions.len() >= MAX_SESSIONS {
        return Err(Error::resource_exhausted(format!(
            "task {} has {MAX_SESSIONS} open sessions; close some first",
            master.task.def.task
        )));
    }
    let handle = format!("{:016x}", rand::random::<u64>());
    sessions.insert(handle.clone());
    Ok(tfproto::CreateSessionResponse {
        session_handle: handle,
        graph_version: 0,
    })
}

async fn list_devices(
    master: MasterService,
    request: tfproto::ListDevicesRequest,
) -> Result<tfproto::ListDevicesResponse> {
    let handle = request.session_handle;
    if !handle.is_empty() && !master.sessions().contains(&handle) {
        // TensorFlow's code and words for a handle it does not know.
        return Err(Error::invalid_argument(format!(
            "Session {handle} is not found. Possibly, this master has restarted."
        )));
    }
    let task = &master.task;
    let statuses = status::statuses(task, task.config.connect_timeout).await?;
    let remote_device = statuses
        .into_iter()
        .filter(|(other, _)| *other != task.def.task)
        .flat_map(|(_, status)| status.devices)
        .collect();
    Ok(tfproto::ListDevicesResponse {
        local_device: task.devices.clone(),
        remote_device,
    })
}

async fn close_session(
    master: MasterService,
    request: tfproto::CloseSessionRequest,
) -> Result<tfproto::CloseSessionResponse> {
    let handle = request.session_handle;
    if master.sessions().remove(&handle) {
        Ok(tfproto::CloseSessionResponse {})
    } else {
        Err(Error::new(
            Code::Aborted,
            format!("Session {handle} is not found. Possibly, this master has restarted."),
        ))
    }
}

/// Serves one unary call: prost decodes the request, `handler` answers it with `state`, prost
/// encodes the reply. It counts against the task's call limit, like every Worker call.
fn unary<S, H, Req, Resp, Fut>(
    task: &Task,
    request: http::Request<Body>,
    state: S,
    handler: H,
) -> BoxFuture<'static, Result<http::Response<Body>, Infallible>>
where
    S: Clone + Send + 'static,
    H: Fn(S, Req) -> Fut + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    Fut: Future<Output = Result<Resp>> + Send + 'static,
{
    let permit = match task.admit(&calling_peer(&request)) {
        Ok(permit) => permit,
        Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
    };
    let max_message = task.config.max_message_bytes;
    Box::pin(async move {
        let mut grpc = Grpc::new(ProstCodec::default())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let response = grpc.unary(Handler { state, handler }, request).await;
        Ok(Task::until_sent(response, permit))
    })
}

/// A method's handler in the shape tonic's server calls.
struct Handler<S, H> {
    state: S,
    handler: H,
}

impl<S, H, Req, Resp, Fut> UnaryService<Req> for Handler<S, H>
where
    S: Clone,
    H: Fn(S, Req) -> Fut,
    Fut: Future<Output = Result<Resp>> + Send + 'static,
{
    type Response = Resp;
    type Future = BoxFuture<'static, Result<Response<Resp>, Status>>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let reply = (self.handler)(self.state.clone(), request.into_inner());
        Box::pin(async move { reply.await.map(Response::new).map_err(Status::from) })
    }
}

fn unimplemented(
    request: &http::Request<Body>,
) -> BoxFuture<'static, Result<http::Response<Body>, Infallible>> {
    let status = Status::unimplemented(format!("distsrv does not serve {}", request.uri().path()));
    Box::pin(std::future::ready(Ok(status.into_http())))
}
