//! The tensor-exchange loop: tasks hand each other tensors by name.
//!
//! Rendezvous semantics: every tensor sent is received exactly once, in order per (source, name),
//! and a receive may come before or after its send. Sends push: the sender streams the tensor to
//! the receiving task's server, which answers only once it holds the whole tensor in its inbox, so
//! an acknowledged tensor is never lost. The inbox holds at most `max_pending_bytes` of tensors
//! nobody has received yet; a send beyond that is refused rather than buffered without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::future::Either;
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use crate::cluster::TaskId;
use crate::codec::{self, ChunkParser, Tensor, TensorBuf, TensorKey, TensorMeta};
use crate::config::ServerConfig;
use crate::errors::{Code, Error, Result};
use crate::peers::Peers;
use crate::proto;
use crate::shm::Shm;

/// gRPC path of the tensor push, served by hand (see `service`) so payload bytes are copied once.
pub const SEND_TENSOR_PATH: &str = "/distsrv.v1.Worker/SendTensor";

/// A header message is a few hundred bytes; this bounds what an off-protocol peer can make the
/// server buffer before the header is checked.
const MAX_HEADER_BYTES: usize = 64 << 10;

pub struct Exchange {
    me: TaskId,
    peers: Arc<Peers>,
    chunk_bytes: usize,
    inbox: Arc<Inbox>,
    order: Arc<SendOrder>,
    shm: Arc<Shm>,
}

impl Exchange {
    pub fn new(me: TaskId, peers: Arc<Peers>, config: &ServerConfig) -> Self {
        Self {
            peers,
            chunk_bytes: config.chunk_bytes,
            inbox: Arc::new(Inbox::new(config.max_pending_bytes)),
            order: Arc::default(),
            shm: Arc::new(Shm::new(
                me.clone(),
                config.shared_memory,
                config.max_message_bytes,
            )),
            me,
        }
    }

    /// Starts sending `payload` (row-major bytes of a `meta` tensor) to `to` under `name`, over
    /// the server runtime's connections.
    ///
    /// The send's place in the order of sends to the same (task, name) is taken now, so the
    /// returned future may run on any thread and still deliver in call order. It resolves once the
    /// receiving server holds the whole tensor. A send to this task itself copies into the inbox
    /// at once.
    pub fn send(
        &self,
        to: TaskId,
        name: String,
        meta: TensorMeta,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<()>> + Send + 'static> {
        self.send_via(&self.peers, to, name, meta, payload)
    }

    /// Like [`Exchange::send`], over `connections`: those of the runtime that will drive the
    /// future (a blocking send drives its own, on the caller runtime).
    pub fn send_via(
        &self,
        connections: &Arc<Peers>,
        to: TaskId,
        name: String,
        meta: TensorMeta,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<()>> + Send + 'static> {
        self.peers.cluster().require(&to)?;
        if meta.byte_len() != Some(payload.len() as u64) {
            return Err(Error::invalid_argument(format!(
                "{} bytes given for a {:?} tensor of shape {:?}",
                payload.len(),
                meta.dtype,
                meta.shape
            )));
        }
        let key = TensorKey {
            source: self.me.clone(),
            name,
        };
        if to == self.me {
            let reservation = Reservation::new(&self.inbox, payload.len() as u64)?;
            let tensor = Tensor {
                meta,
                data: TensorBuf::from_slice(&payload),
            };
            self.inbox.deliver(key, tensor, reservation)?;
            return Ok(Either::Left(std::future::ready(Ok(()))));
        }
        let turn = self.order.take_turn(&to, &key.name);
        let connections = Arc::clone(connections);
        let shm = Arc::clone(&self.shm);
        let chunk = self.chunk_bytes;
        Ok(Either::Right(async move {
            let _turn = turn.wait().await;
            let total = payload.len() as u64;
            let header = codec::header(&key, &meta);
            let sent = match shm.route(&connections, &to).await {
                Some(link) => link.send(&header, &payload).await,
                None => {
                    push(
                        &connections,
                        &to,
                        codec::tensor_frames(&header, payload, chunk),
                        total,
                    )
                    .await
                }
            };
            sent.map_err(|e| e.context(format!("send of {:?} to {to}", key.name)))
        }))
    }

    /// Receives the next tensor `name` from `source`, waiting up to `timeout` (`None`: no limit)
    /// for it to arrive. While waiting, the source is checked now and then: if it cannot be reached
    /// for the connect timeout, the receive fails with `Unavailable` instead of waiting forever.
    pub async fn recv(
        &self,
        source: TaskId,
        name: String,
        timeout: Option<Duration>,
    ) -> Result<Tensor> {
        self.recv_via(&self.peers, source, name, timeout).await
    }

    /// Like [`Exchange::recv`], watching the source over `connections`: those of the runtime
    /// that drives the receive.
    pub async fn recv_via(
        &self,
        connections: &Peers,
        source: TaskId,
        name: String,
        timeout: Option<Duration>,
    ) -> Result<Tensor> {
        self.peers.cluster().require(&source)?;
        let key = TensorKey { source, name };
        let take = self.inbox.take(key.clone());
        let timed = crate::errors::within(timeout, format!("no {key}"), take);
        if key.source == self.me {
            return timed.await;
        }
        tokio::select! {
            // The receive first: once a stop has closed the inbox it is done, and the watchdog,
            // which makes a new timer each round, is not polled on a runtime shutting down.
            biased;
            received = timed => received,
            lost = connections.unreachable(&key.source) => Err(lost.context(format!("recv of {key}"))),
        }
    }

    /// Serves one pushed tensor: parses the stream as it arrives, holds the tensor, and returns the
    /// number of bytes kept. Nothing is delivered unless the whole tensor arrived intact.
    pub async fn receive(&self, mut body: tonic::body::Body) -> Result<u64> {
        let mut parser = ChunkParser::new(MAX_HEADER_BYTES);
        let mut reservation = None;
        let cluster = self.peers.cluster();
        let mut admit = |announced: codec::Announced<'_>| {
            cluster.require(&announced.key.source)?;
            let size = announced.meta.byte_len().unwrap_or(0);
            reservation = Some(Reservation::new(&self.inbox, size)?);
            Ok(())
        };
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| Error::cancelled(format!("the sender went away: {e}")))?;
            if let Ok(data) = frame.into_data() {
                parser.feed(data, &mut admit)?;
            }
        }
        let (key, tensor) = parser.finish()?;
        let size = tensor.data.len() as u64;
        let reservation = reservation.expect("a finished stream was admitted");
        self.inbox.deliver(key, tensor, reservation)?;
        Ok(size)
    }

    pub fn me(&self) -> &TaskId {
        &self.me
    }

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// The same-host fast path.
    pub fn shm(&self) -> &Arc<Shm> {
        &self.shm
    }

    /// Counts `bytes` of an arriving tensor against the inbox's limit, refusing it past the limit
    /// or from a task outside the cluster.
    pub(crate) fn reserve(&self, key: &TensorKey, bytes: u64) -> Result<Reservation> {
        self.peers.cluster().require(&key.source)?;
        Reservation::new(&self.inbox, bytes)
    }

    /// Hands a whole arrived tensor to its receive, or keeps it for one. A receive waiting for it
    /// gets it, and wakes, when the [`Handoff`] is dropped: keep that until the sender has been
    /// answered, so the wake-up is not on the answer's way.
    pub(crate) fn deliver(
        &self,
        key: TensorKey,
        tensor: Tensor,
        reservation: Reservation,
    ) -> Result<Handoff> {
        self.inbox.deliver(key, tensor, reservation)
    }

    /// Ends every waiting receive and refuses new tensors; unreceived tensors are dropped. The
    /// same-host links close and idle shared memory is freed.
    pub fn close(&self) {
        self.inbox.close();
        self.shm.close();
    }
}

/// Streams the frames of one tensor to `to` and waits for its acknowledgement.
async fn push(peers: &Peers, to: &TaskId, frames: Vec<Bytes>, total: u64) -> Result<()> {
    let (connection, uri) = peers.push_connection(to, SEND_TENSOR_PATH).await?;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .map_err(|e| Error::internal(format!("cannot build the request: {e}")))?;
    let mut requests = connection.requests.ready().await.map_err(broken)?;
    let (response, mut body) = requests.send_request(request, false).map_err(broken)?;
    // Every frame is queued before the connection next writes, so a small tensor's headers and
    // payload leave in one write. HTTP/2 holds what flow control does not let out yet: the
    // frames are slices of the caller's buffer, so holding them costs no memory.
    let last = frames.len().saturating_sub(1);
    for (index, frame) in frames.into_iter().enumerate() {
        body.send_data(frame, index == last).map_err(broken)?;
    }
    let response = response.await.map_err(broken)?;
    if let Some(status) = tonic::Status::from_header_map(response.headers())
        && status.code() != Code::Ok
    {
        return Err(status.into());
    }
    let mut answer = response.into_body();
    let mut reply = bytes::BytesMut::new();
    while let Some(data) = answer.data().await {
        let data = data.map_err(broken)?;
        let _ = answer.flow_control().release_capacity(data.len());
        reply.extend_from_slice(&data);
    }
    let trailers = answer.trailers().await.map_err(broken)?.unwrap_or_default();
    match tonic::Status::from_header_map(&trailers) {
        Some(status) if status.code() == Code::Ok => {}
        Some(status) => return Err(status.into()),
        None => return Err(Error::internal("the receiver's answer carries no status")),
    }
    let reply: proto::SendTensorResponse = codec::unframe_message(&reply)?;
    if reply.received_bytes != total {
        return Err(Error::data_loss(format!(
            "the receiver kept {} of {total} bytes",
            reply.received_bytes
        )));
    }
    Ok(())
}

/// A push cut short by the connection or the peer.
fn broken(error: h2::Error) -> Error {
    Error::unavailable(match error.get_io() {
        Some(io) => format!("the connection broke: {io}"),
        None => error.to_string(),
    })
}

/// Bytes counted against the inbox's limit until dropped.
pub(crate) struct Reservation {
    inbox: Arc<Inbox>,
    bytes: u64,
}

impl Reservation {
    fn new(inbox: &Arc<Inbox>, bytes: u64) -> Result<Self> {
        let limit = inbox.max_pending_bytes;
        inbox
            .pending_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                pending.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map_err(|pending| {
                Error::resource_exhausted(format!(
                    "the receiver holds {pending} bytes of unreceived tensors; {bytes} more would \
                     pass its limit of {limit} (max_pending_bytes)"
                ))
            })?;
        Ok(Self {
            inbox: Arc::clone(inbox),
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.inbox
            .pending_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A tensor that has arrived but not been received; its bytes count as pending until then.
struct Arrived {
    tensor: Tensor,
    _reservation: Reservation,
}

#[derive(Default)]
struct Slot {
    arrived: VecDeque<Arrived>,
    waiting: VecDeque<oneshot::Sender<Arrived>>,
}

struct InboxState {
    slots: HashMap<TensorKey, Slot>,
    closed: Option<Error>,
}

/// Tensors that arrived at this task, by (source, name), and the receives waiting for them.
struct Inbox {
    state: Mutex<InboxState>,
    /// Outside the lock, so a reservation can be dropped while it is held.
    pending_bytes: AtomicU64,
    max_pending_bytes: u64,
}

impl Inbox {
    fn new(max_pending_bytes: u64) -> Self {
        Self {
            state: Mutex::new(InboxState {
                slots: HashMap::new(),
                closed: None,
            }),
            pending_bytes: AtomicU64::new(0),
            max_pending_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the tensor for the longest-waiting receive (handed over when the [`Handoff`] is
    /// dropped), or keeps it in arrival order.
    fn deliver(
        self: &Arc<Self>,
        key: TensorKey,
        tensor: Tensor,
        reservation: Reservation,
    ) -> Result<Handoff> {
        let mut state = self.lock();
        if let Some(error) = &state.closed {
            return Err(error.clone());
        }
        let arrived = Arrived {
            tensor,
            _reservation: reservation,
        };
        if let Some(slot) = state.slots.get_mut(&key) {
            // Receives that gave up (timeout, Ctrl-C) are skipped.
            while let Some(waiter) = slot.waiting.pop_front() {
                if !waiter.is_closed() {
                    return Ok(Handoff {
                        inbox: Arc::clone(self),
                        pending: Some((key, waiter, arrived)),
                    });
                }
            }
        }
        state
            .slots
            .entry(key)
            .or_default()
            .arrived
            .push_back(arrived);
        Ok(Handoff {
            inbox: Arc::clone(self),
            pending: None,
        })
    }

    /// Gives a tensor whose receive gave up before taking it to the next receive waiting, or
    /// else puts it first in line: it came before any tensor now kept.
    fn hand_on(&self, key: TensorKey, mut arrived: Arrived) {
        let mut state = self.lock();
        if state.closed.is_some() {
            return;
        }
        let slot = state.slots.entry(key).or_default();
        while let Some(waiter) = slot.waiting.pop_front() {
            match waiter.send(arrived) {
                Ok(()) => return,
                Err(back) => arrived = back,
            }
        }
        slot.arrived.push_front(arrived);
    }

    /// The next tensor under `key`, as soon as there is one.
    async fn take(self: &Arc<Self>, key: TensorKey) -> Result<Tensor> {
        let receiver = {
            let mut state = self.lock();
            if let Some(error) = &state.closed {
                return Err(error.clone());
            }
            let slot = state.slots.entry(key.clone()).or_default();
            if let Some(arrived) = slot.arrived.pop_front() {
                if slot.arrived.is_empty() && slot.waiting.is_empty() {
                    state.slots.remove(&key);
                }
                return Ok(arrived.tensor);
            }
            let (sender, receiver) = oneshot::channel();
            slot.waiting.push_back(sender);
            receiver
        };
        let mut waiting = Waiting {
            inbox: Arc::clone(self),
            key,
            receiver: Some(receiver),
        };
        let receiver = waiting.receiver.as_mut().expect("set above");
        match receiver.await {
            Ok(arrived) => {
                waiting.receiver = None;
                Ok(arrived.tensor)
            }
            Err(_) => Err(self
                .lock()
                .closed
                .clone()
                .unwrap_or_else(|| Error::cancelled("the receive was abandoned"))),
        }
    }

    /// Puts back a tensor handed to a receive that gave up before taking it, first in line.
    fn put_back(&self, key: TensorKey, arrived: Arrived) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state
                .slots
                .entry(key)
                .or_default()
                .arrived
                .push_front(arrived);
        }
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closed = Some(Error::cancelled("the server is stopping"));
        // Dropping the waiters' senders wakes every waiting receive.
        let slots = std::mem::take(&mut state.slots);
        drop(state);
        drop(slots);
    }
}

/// A tensor delivered to a waiting receive, handed over (waking the receive) when dropped.
pub(crate) struct Handoff {
    inbox: Arc<Inbox>,
    pending: Option<(TensorKey, oneshot::Sender<Arrived>, Arrived)>,
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if let Some((key, waiter, arrived)) = self.pending.take()
            && let Err(arrived) = waiter.send(arrived)
        {
            self.inbox.hand_on(key, arrived);
        }
    }
}

/// A receive in progress; if it is dropped (timeout, Ctrl-C) after a tensor was handed to it,
/// the tensor goes back to the inbox instead of being lost.
struct Waiting {
    inbox: Arc<Inbox>,
    key: TensorKey,
    receiver: Option<oneshot::Receiver<Arrived>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut receiver) = self.receiver.take() {
            receiver.close();
            if let Ok(arrived) = receiver.try_recv() {
                self.inbox.put_back(self.key.clone(), arrived);
            }
        }
    }
}

/// Destination and name: sends sharing one are delivered in call order.
type Line = (TaskId, String);
/// Per line, the id of the newest send and what signals its end.
type LineEnds = HashMap<Line, (u64, oneshot::Receiver<()>)>;

/// Keeps sends to the same (task, name) in call order: each send waits for the previous one.
#[derive(Default)]
struct SendOrder {
    last: Mutex<LineEnds>,
    next_id: AtomicU64,
}

impl SendOrder {
    fn take_turn(self: &Arc<Self>, to: &TaskId, name: &str) -> Turn {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, finished) = oneshot::channel();
        let slot = (to.clone(), name.to_owned());
        let previous = self
            .lock()
            .insert(slot.clone(), (id, finished))
            .map(|(_, previous)| previous);
        Turn {
            order: Arc::clone(self),
            slot,
            id,
            previous,
            _done: done,
        }
    }

    fn lock(&self) -> MutexGuard<'_, LineEnds> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A send's place in line; dropping it (send finished or abandoned) lets the next one go.
struct Turn {
    order: Arc<SendOrder>,
    slot: Line,
    id: u64,
    previous: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
}

impl Turn {
    async fn wait(mut self) -> Self {
        if let Some(previous) = self.previous.take() {
            // An error means the previous send ended without signalling: it is over either way.
            let _ = previous.await;
        }
        self
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut last = self.order.lock();
        // The last send of a name leaves no entry behind, so names used once do not pile up.
        if last.get(&self.slot).is_some_and(|(id, _)| *id == self.id) {
            last.remove(&self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::DataType;

    fn tensor(byte: u8) -> Tensor {
        Tensor {
            meta: TensorMeta {
                dtype: DataType::DtUint8,
                shape: vec![1],
            },
            data: TensorBuf::from_slice(&[byte]),
        }
    }

    fn inbox_and_key() -> (Arc<Inbox>, TensorKey) {
        let key = TensorKey {
            source: TaskId::new("worker", 0),
            name: "t".to_owned(),
        };
        (Arc::new(Inbox::new(1 << 20)), key)
    }

    fn arrive(inbox: &Arc<Inbox>, key: &TensorKey, byte: u8) -> Handoff {
        let reservation = Reservation::new(inbox, 1).unwrap();
        inbox
            .deliver(key.clone(), tensor(byte), reservation)
            .unwrap()
    }

    #[tokio::test]
    async fn a_waiting_receive_gets_its_tensor_when_the_handoff_ends() {
        let (inbox, key) = inbox_and_key();
        let mut waiting = Box::pin(inbox.take(key.clone()));
        assert!(futures::poll!(&mut waiting).is_pending());
        let handoff = arrive(&inbox, &key, 1);
        assert!(futures::poll!(&mut waiting).is_pending());
        drop(handoff);
        assert_eq!(waiting.await.unwrap().data.as_slice(), [1]);
    }

    #[tokio::test]
    async fn a_tensor_whose_receive_gave_up_meanwhile_goes_to_the_next_in_order() {
        let (inbox, key) = inbox_and_key();
        let mut gave_up = Box::pin(inbox.take(key.clone()));
        assert!(futures::poll!(&mut gave_up).is_pending());
        let first = arrive(&inbox, &key, 1);
        drop(gave_up);
        drop(arrive(&inbox, &key, 2));
        drop(first);
        assert_eq!(inbox.take(key.clone()).await.unwrap().data.as_slice(), [1]);
        assert_eq!(inbox.take(key).await.unwrap().data.as_slice(), [2]);
    }
}
