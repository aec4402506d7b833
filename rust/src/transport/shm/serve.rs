//! The receiver's half of a same-host link ([`serve`]): it handles one message at a time and
//! answers in order, lending segments of this task's shared memory for large tensors and
//! delivering each tensor into the inbox once it is whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use prost::Message;
use tokio::io::{AsyncReadExt, BufReader};

use super::socket::{INLINE_BYTES, Socket, SocketReader, error_message, message, read_message};
use crate::base::cluster::TaskId;
use crate::base::errors::{Code, Error, Result};
use crate::inbox::{Inbox, Reservation};
use crate::proto::{self, shm_message::Kind};
use crate::tensor::segment::{Segment, SegmentPool};
use crate::tensor::{Tensor, TensorBuf, TensorKey, TensorMeta};
use crate::wire;
use crate::wire::values;

/// Runs a remote operation that came on a link: the calling task, its request, its time limit.
pub type CallServer = Arc<
    dyn Fn(TaskId, proto::CallRequest, Option<Duration>) -> BoxFuture<'static, Result<proto::Value>>
        + Send
        + Sync,
>;

/// What a task's links are served with.
pub struct Serving {
    pub inbox: Arc<Inbox>,
    pub pool: Arc<SegmentPool>,
    /// Tensors received through links, in all.
    pub received: Arc<AtomicU64>,
    /// Calls served through links, in all.
    pub calls_served: Arc<AtomicU64>,
    pub calls: CallServer,
    /// Bound on a call's request and on its result.
    pub max_message_bytes: usize,
}

impl Serving {
    fn check_call_size(&self, len: usize) -> Result<()> {
        if len > self.max_message_bytes {
            return Err(Error::resource_exhausted(format!(
                "a {len}-byte call is past the limit of {} (max_message_bytes)",
                self.max_message_bytes
            )));
        }
        Ok(())
    }
}

/// A segment lent for a tensor announced but not yet committed.
struct Grant {
    key: TensorKey,
    meta: TensorMeta,
    data: TensorBuf,
    reservation: Reservation,
}

/// Serves a link from `source` until it ends. Whatever was lent and not committed goes back when
/// it does: a sender that dies mid-transfer delivers nothing.
pub async fn serve(
    socket: Arc<Socket>,
    mut reader: BufReader<SocketReader>,
    source: TaskId,
    serving: Arc<Serving>,
) -> Result<()> {
    let Serving { inbox, pool, .. } = &*serving;
    socket
        .write_message(&message(0, Kind::Welcome(true)), &[])
        .await
        .map_err(|e| Error::unavailable(e.to_string()))?;
    let mut grants: HashMap<u64, Grant> = HashMap::new();
    // Segments lent for calls' requests, by the id of the call to come.
    let mut lent: HashMap<u64, Segment> = HashMap::new();
    while let Some(request) = read_message(&mut reader).await? {
        let id = request.id;
        // A receive waiting for the tensor wakes once its sender has the acknowledgement.
        let mut handoff = None;
        let answer = match request.kind {
            Some(Kind::Inline(header)) => {
                let announced = wire::parse_header(&header);
                let total = header.total_bytes as usize;
                if total > INLINE_BYTES {
                    return Err(Error::invalid_argument("an inline tensor too large"));
                }
                let mut data = TensorBuf::new(total);
                reader
                    .read_exact(data.as_mut_slice())
                    .await
                    .map_err(|e| Error::unavailable(format!("the link broke mid-tensor: {e}")))?;
                let delivered = announced.and_then(|(key, meta)| {
                    check_source(&key, &source)?;
                    let reservation = inbox.reserve(&key, total as u64)?;
                    inbox.deliver(key, Tensor { meta, data }, reservation)
                });
                match delivered {
                    Ok(delivered) => {
                        handoff = Some(delivered);
                        Kind::Ack(total as u64)
                    }
                    Err(error) => return_error(id, &error),
                }
            }
            Some(Kind::Alloc(header)) => {
                let granted = wire::parse_header(&header).and_then(|(key, meta)| {
                    check_source(&key, &source)?;
                    let total = header.total_bytes as usize;
                    let reservation = inbox.reserve(&key, total as u64)?;
                    let segment = pool.take(total)?;
                    let grant = proto::ShmGrant {
                        segment: segment.region().id(),
                        fd: segment.region().fd(),
                        capacity: segment.region().capacity() as u64,
                    };
                    let data = TensorBuf::shared(segment);
                    grants.insert(
                        id,
                        Grant {
                            key,
                            meta,
                            data,
                            reservation,
                        },
                    );
                    Ok(grant)
                });
                match granted {
                    Ok(grant) => Kind::Grant(grant),
                    Err(error) => return_error(id, &error),
                }
            }
            Some(Kind::Commit(_)) => {
                let grant = grants
                    .remove(&id)
                    .ok_or_else(|| Error::invalid_argument("commit of a tensor never granted"))?;
                let total = grant.data.len() as u64;
                // With the segments' budget half spent, the tensor moves to plain memory and its
                // segment goes back: an application that keeps many arrays holds no descriptors.
                let data = if pool.crowded() {
                    TensorBuf::from_slice(grant.data.as_slice())
                } else {
                    grant.data
                };
                let tensor = Tensor {
                    meta: grant.meta,
                    data,
                };
                match inbox.deliver(grant.key, tensor, grant.reservation) {
                    Ok(delivered) => {
                        handoff = Some(delivered);
                        Kind::Ack(total)
                    }
                    Err(error) => return_error(id, &error),
                }
            }
            Some(Kind::Lend(bytes)) => {
                let len = bytes as usize;
                let granted = serving.check_call_size(len).and_then(|()| {
                    let segment = pool.take(len)?;
                    let grant = proto::ShmGrant {
                        segment: segment.region().id(),
                        fd: segment.region().fd(),
                        capacity: segment.region().capacity() as u64,
                    };
                    lent.insert(id, segment);
                    Ok(grant)
                });
                match granted {
                    Ok(grant) => Kind::Grant(grant),
                    Err(error) => return_error(id, &error),
                }
            }
            Some(Kind::Call(call)) => {
                let len = call.request_bytes as usize;
                let request = if call.in_segment {
                    let segment = lent
                        .remove(&id)
                        .ok_or_else(|| Error::invalid_argument("a call in a segment never lent"))?;
                    if segment.len() < len {
                        return Err(Error::invalid_argument("a call larger than its segment"));
                    }
                    Bytes::from_owner(TensorBuf::shared(segment)).slice(..len)
                } else {
                    serving.check_call_size(len)?;
                    let mut request = TensorBuf::new(len);
                    reader
                        .read_exact(request.as_mut_slice())
                        .await
                        .map_err(|e| Error::unavailable(format!("the link broke mid-call: {e}")))?;
                    Bytes::from_owner(request)
                };
                let timeout = Duration::try_from_secs_f64(call.timeout_seconds)
                    .ok()
                    .filter(|limit| !limit.is_zero());
                tokio::spawn(answer_call(
                    Arc::clone(&socket),
                    Arc::clone(&serving),
                    source.clone(),
                    id,
                    request,
                    timeout,
                ));
                continue;
            }
            _ => return Err(Error::invalid_argument("an off-protocol link message")),
        };
        if matches!(answer, Kind::Ack(_)) {
            serving.received.fetch_add(1, Ordering::Relaxed);
        }
        socket
            .write_message(&message(id, answer), &[])
            .await
            .map_err(|e| Error::unavailable(format!("cannot answer on the link: {e}")))?;
        drop(handoff);
    }
    Ok(())
}

/// Runs a call that came on the link and answers it, beside the link's other traffic: a call
/// that takes long holds up nothing else.
async fn answer_call(
    socket: Arc<Socket>,
    serving: Arc<Serving>,
    caller: TaskId,
    id: u64,
    request: Bytes,
    timeout: Option<Duration>,
) {
    // Array arguments stay slices of `request`, which was read or written once.
    let served = match values::decode_checked::<proto::CallRequest>(request) {
        Ok(request) => (serving.calls)(caller, request, timeout).await,
        Err(error) => Err(error),
    };
    serving.calls_served.fetch_add(1, Ordering::Relaxed);
    let response = served.and_then(|result| {
        let response = proto::CallResponse {
            result: Some(result),
            ..Default::default()
        };
        let len = response.encoded_len();
        if len > serving.max_message_bytes {
            return Err(Error::resource_exhausted(format!(
                "the result is {len} bytes, past the limit of {} (max_message_bytes)",
                serving.max_message_bytes
            )));
        }
        let mut encoded = TensorBuf::new(len);
        response
            .encode(&mut encoded.as_mut_slice())
            .map_err(|e| Error::internal(format!("cannot encode the result: {e}")))?;
        Ok(encoded)
    });
    let (answer, payload) = match response {
        Ok(encoded) => (message(id, Kind::Result(encoded.len() as u64)), encoded),
        Err(error) => (error_message(id, &error), TensorBuf::new(0)),
    };
    // A link that broke meanwhile has nobody to answer.
    let _ = socket.write_message(&answer, payload.as_slice()).await;
}

/// The answer that carries `error` back to the sender.
fn return_error(id: u64, error: &Error) -> Kind {
    error_message(id, error).kind.expect("set")
}

/// A link carries tensors of the task that proved itself in the handshake, and no other's.
fn check_source(key: &TensorKey, source: &TaskId) -> Result<()> {
    if key.source != *source {
        return Err(Error::new(
            Code::PermissionDenied,
            format!(
                "the link of {source} cannot carry a tensor from {}",
                key.source
            ),
        ));
    }
    Ok(())
}
