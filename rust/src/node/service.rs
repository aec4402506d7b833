//! The gRPC services a task serves: health, reflection, distsrv's Worker and TensorFlow's.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::transport::server::Router;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tower::Service;
use tower::layer::util::{Identity, Stack};

use super::task::Task;
use super::tfcompat;
use crate::base::budget::Peer;
use crate::base::cluster::TaskId;
use crate::base::errors::{Error, Result};
use crate::proto;
use crate::proto::worker_server::{Worker, WorkerServer};
use crate::tensor::TensorKey;
use crate::transport::auth::TokenCheckLayer;
use crate::transport::push::{self, SEND_TENSOR_PATH};
use crate::transport::stall::IdleLimited;
use crate::transport::tls::{calling_peer, certified_task, check_identity};
use crate::transport::{peers, unary};
use crate::wire;
use crate::wire::values::{self, CALL_PATH};

pub const WORKER_SERVICE_NAME: &str = "distsrv.v1.Worker";
/// The encoded descriptors of `protos/`, for server reflection.
const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("distsrv_descriptor");

/// Health, reflection, the Worker service and TensorFlow's services, ready to serve.
pub fn router(
    task: &Arc<Task>,
) -> Result<(HealthReporter, Router<Stack<TokenCheckLayer, Identity>>)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let max_message = task.config.max_message_bytes;
    let worker = WorkerServer::from_arc(Arc::clone(task))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &task.tls {
        builder = builder
            .tls_config(tls.server().timeout(task.config.peer_timeout))
            .map_err(|e| Error::invalid_argument(format!("unusable TLS settings: {e}")))?;
    }
    let router = builder
        .initial_stream_window_size(peers::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(peers::CONNECTION_WINDOW_BYTES)
        .max_frame_size(peers::MAX_FRAME_BYTES)
        // A caller that stops answering pings is cut off, so its calls end and free their slots.
        .http2_keepalive_interval(Some(task.config.peer_timeout))
        .http2_keepalive_timeout(Some(task.config.peer_timeout))
        .tcp_keepalive(Some(task.config.peer_timeout))
        .layer(TokenCheckLayer(task.security.clone()))
        .add_service(health_service)
        .add_service(reflection().build_v1().expect("descriptors are valid"))
        .add_service(reflection().build_v1alpha().expect("descriptors are valid"))
        .add_service(WorkerRoutes {
            task: Arc::clone(task),
            generated: worker,
        })
        .add_service(tfcompat::WorkerService::new(task))
        .add_service(tfcompat::MasterService::new(task));
    Ok((health, router))
}

/// Reflection over our protos and the health service, so generic gRPC tools can list them.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

#[tonic::async_trait]
impl Worker for Task {
    async fn get_status(
        &self,
        _request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        Ok(Response::new(proto::GetStatusResponse {
            device_attributes: self.devices.clone(),
            task: Some(self.def.task.to_proto()),
            incarnation: self.incarnation,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            abandoned_collectives: self.collectives.abandoned(),
        }))
    }

    async fn recv_tensor(
        &self,
        request: Request<proto::RecvTensorRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<proto::TensorChunk>>, Status> {
        // What was sent to this task is this task's to take: another task's certificate may
        // not drain its inbox (an operator's, bound to no task, may).
        if let Some(peer) = certified_task(request.peer_certs().as_deref())
            && peer != self.def.task
        {
            return Err(Error::permission_denied(format!(
                "{peer} (by its certificate) cannot take tensors sent to {}",
                self.def.task
            ))
            .into());
        }
        let request = request.into_inner();
        let source = request
            .source
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("RecvTensor needs a source task"))
            .and_then(TaskId::from_proto)?;
        let timeout = (request.timeout_millis > 0)
            .then(|| std::time::Duration::from_millis(request.timeout_millis));
        let tensor = self
            .exchange
            .recv(source.clone(), request.name.clone(), timeout)
            .await?;
        let key = TensorKey {
            source,
            name: request.name,
        };
        let header = wire::header(&key, &tensor.meta);
        let payload = bytes::Bytes::from_owner(tensor.data);
        let chunks = wire::tensor_chunks(&header, payload, self.config.chunk_bytes);
        let stream = futures::stream::iter(chunks.map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn shm_handshake(
        &self,
        request: Request<proto::ShmHandshakeRequest>,
    ) -> Result<Response<proto::ShmHandshakeResponse>, Status> {
        let peer = certified_task(request.peer_certs().as_deref());
        let request = request.into_inner();
        if let Some(source) = &request.source {
            check_identity(peer.as_ref(), &TaskId::from_proto(source)?, "shake hands")?;
        }
        Ok(Response::new(self.shm.handshake(request)?))
    }

    async fn variable_op(
        &self,
        request: Request<proto::VariableRequest>,
    ) -> Result<Response<proto::VariableResponse>, Status> {
        Ok(Response::new(self.variables.serve(request.into_inner())?))
    }

    // Call is served by `CallService`, with the codec that limits values before decoding them.
}

/// Serves a `Call` by hand: its message gathered into one buffer that its arrays stay in, checked
/// before it is decoded, and the result framed with its arrays uncopied. `certified` is the task
/// the caller's certificate names, which the call is made as.
async fn serve_call(
    task: &Task,
    request: http::Request<Body>,
    certified: Option<TaskId>,
) -> Result<Vec<bytes::Bytes>> {
    let (parts, body) = request.into_parts();
    let max_message = task.config.max_message_bytes;
    let arrived = unary::collect(body, max_message, task.config.peer_timeout).await?;
    let mut request: proto::CallRequest = values::decode_checked(arrived.bytes())?;
    if let Some(peer) = certified {
        // The certificate proves who calls, whatever the request says.
        if let Some(caller) = &request.caller {
            check_identity(Some(&peer), &TaskId::from_proto(caller)?, "call")?;
        }
        request.caller = Some(peer.to_proto());
    }
    let metadata = MetadataMap::from_headers(parts.headers);
    let result = task.operations.serve(request, metadata, Some(arrived));
    let response = proto::CallResponse {
        result: Some(result.await?),
        ..Default::default()
    };
    values::frame_call(&response, max_message)
}

/// The Worker service as served: SendTensor by hand (payload copied once, straight into the
/// tensor), Call by hand (arrays copied once, into the buffer they stay in), the other methods
/// by the generated server; all of it
/// behind the in-flight call limit, past which calls get RESOURCE_EXHAUSTED instead of queueing.
#[derive(Clone)]
struct WorkerRoutes {
    task: Arc<Task>,
    generated: WorkerServer<Task>,
}

impl NamedService for WorkerRoutes {
    const NAME: &'static str = WORKER_SERVICE_NAME;
}

impl Service<http::Request<Body>> for WorkerRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let peer = calling_peer(&request);
        let permit = match self.task.admit(&peer) {
            Ok(permit) => permit,
            Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
        };
        let certified = match &peer {
            Peer::Task(task) => Some(task.clone()),
            Peer::Address(_) | Peer::Unknown => None,
        };
        let path = request.uri().path();
        if path == SEND_TENSOR_PATH || path == CALL_PATH {
            let task = Arc::clone(&self.task);
            let tensor = path == SEND_TENSOR_PATH;
            return Box::pin(async move {
                let answered = if tensor {
                    let idle = task.config.peer_timeout;
                    let body = request.into_body();
                    push::accept(&task.inbox, body, certified.as_ref(), idle)
                        .await
                        .map(acknowledgement)
                } else {
                    serve_call(&task, request, certified).await
                };
                let response = match answered {
                    Ok(frames) => unary::respond(frames),
                    Err(error) => Status::from(error).into_http(),
                };
                Ok(Task::until_sent(response, permit))
            });
        }
        // Every other method's request is a message or two: a caller that stalls in the middle
        // of one gives up its slot rather than holding it (the methods served by hand hold their
        // requests to the same limit).
        let request = IdleLimited::request(request, self.task.config.peer_timeout);
        let mut generated = self.generated.clone();
        Box::pin(async move {
            let response = generated.call(request).await;
            response.map(|response| Task::until_sent(response, permit))
        })
    }
}

/// A SendTensor reply: how many bytes the receiver kept.
fn acknowledgement(received_bytes: u64) -> Vec<bytes::Bytes> {
    vec![wire::frame_message(&proto::SendTensorResponse {
        received_bytes,
    })]
}
