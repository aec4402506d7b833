//! One task's same-host link to another: a unix socket that carries control messages and small
//! tensors, and segments of the receiver's shared memory that carry large ones.
//!
//! The sender's half ([`Link`]) may carry many tensors at once, each under its own id. The sends
//! waiting for answers read them themselves, one at a time, each handing on the answers that
//! are not its own: a lone blocking send writes its tensor and reads its acknowledgement on its
//! own thread, with no other thread woken on its side. The receiver's half ([`serve`]) handles
//! one message at a time and answers in order. A tensor is acknowledged only once it is in the
//! receiver's inbox, as over gRPC.
//!
//! Longer than most files, on purpose: both halves of one protocol, so that each message kind's
//! two ends, and the cancel-safety rules they share, read side by side.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;

use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, Interest, ReadBuf};
use tokio::sync::oneshot;

use crate::base::cluster::TaskId;
use crate::base::errors::{Code, Error, Result};
use crate::inbox::{Inbox, Reservation};
use crate::proto::{self, ShmMessage, shm_message::Kind};
use crate::tensor::recycle::Recycler;
use crate::tensor::segment::{Mapping, POOL_SEGMENTS, Segment, SegmentPool};
use crate::tensor::{POOL_BYTES, Tensor, TensorBuf, TensorKey, TensorMeta};
use crate::wire;

/// Tensors up to this size travel inline on the socket: one small write beats a segment's extra
/// round trip.
pub const INLINE_BYTES: usize = 64 << 10;
/// Bound on one control message (a tensor header is a few hundred bytes).
const MAX_MESSAGE_BYTES: usize = 64 << 10;
/// Read buffer of either side: a whole inline tensor and its message in one read.
const READ_BUFFER_BYTES: usize = INLINE_BYTES + 4096;

/// A link's socket, watched by the runtime for reading only. A unix socket signals write space
/// each time its peer reads, so watching for writing too would wake the waiting thread once for
/// every message the peer takes in, for nothing. Writes rarely wait; one that must watches a
/// duplicate of the socket until it can go on.
pub struct Socket {
    watched: AsyncFd<UnixStream>,
    /// Held while a message is written, so that messages never interleave.
    writing: tokio::sync::Mutex<()>,
}

impl Socket {
    pub fn new(stream: UnixStream) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            watched: watch(stream, Interest::READABLE)?,
            writing: tokio::sync::Mutex::new(()),
        }))
    }

    /// The socket's incoming bytes, read through a buffer that holds a whole inline tensor.
    pub fn reader(self: &Arc<Self>) -> BufReader<SocketReader> {
        BufReader::with_capacity(READ_BUFFER_BYTES, SocketReader(Arc::clone(self)))
    }

    async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        let mut space = None;
        while !bytes.is_empty() {
            match (&mut self.watched.get_ref()).write(bytes) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(written) => bytes = &bytes[written..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let space = match &mut space {
                        Some(space) => space,
                        None => space.insert(watch(
                            self.watched.get_ref().try_clone()?,
                            Interest::WRITABLE,
                        )?),
                    };
                    space.writable().await?.clear_ready();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes one message, followed by `payload` (an inline tensor's bytes).
    /// A small payload is written with its message, in one write; a large one after it, from
    /// where it is.
    async fn write_message(&self, message: &ShmMessage, payload: &[u8]) -> std::io::Result<()> {
        let len = message.encoded_len();
        let joined = payload.len() <= INLINE_BYTES;
        let mut buffer = Vec::with_capacity(4 + len + if joined { payload.len() } else { 0 });
        buffer.extend_from_slice(&(len as u32).to_le_bytes());
        message.encode(&mut buffer).expect("capacity reserved");
        if joined {
            buffer.extend_from_slice(payload);
        }
        let _writing = self.writing.lock().await;
        self.write_all(&buffer).await?;
        if !joined {
            self.write_all(payload).await?;
        }
        Ok(())
    }

    /// Whether the peer hung up, asked of the socket itself (nobody may be reading it).
    fn hung_up(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.watched.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd over a socket that lives as long as `self`.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Ends this side's stream: the peer reads its end.
    fn shut_down(&self) {
        let _ = self.watched.get_ref().shutdown(std::net::Shutdown::Write);
    }
}

/// `stream`, made non-blocking and watched by the current runtime for `interest`.
fn watch(stream: UnixStream, interest: Interest) -> std::io::Result<AsyncFd<UnixStream>> {
    stream.set_nonblocking(true)?;
    // SAFETY: the stream owns its descriptor, which nothing closes or replaces while the
    // `AsyncFd` holds it.
    Ok(unsafe { AsyncFd::register_with_interest(stream, interest) }?)
}

/// The reading side of a [`Socket`].
pub struct SocketReader(Arc<Socket>);

impl AsyncRead for SocketReader {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut ready = ready!(self.0.watched.poll_read_ready(context))?;
            let unfilled = buf.initialize_unfilled();
            match ready.try_io(|stream| (&mut stream.get_ref()).read(unfilled)) {
                Ok(read) => {
                    buf.advance(read?);
                    return Poll::Ready(Ok(()));
                }
                Err(_would_block) => continue,
            }
        }
    }
}

/// Reads one message; `None` at a clean end of stream.
async fn read_message<R: AsyncRead + Unpin>(input: &mut R) -> Result<Option<ShmMessage>> {
    let mut prefix = [0u8; 4];
    match input.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::unavailable(format!("the link broke: {e}"))),
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(Error::invalid_argument(format!(
            "a {len}-byte link message is off-protocol"
        )));
    }
    let mut body = vec![0u8; len];
    input
        .read_exact(&mut body)
        .await
        .map_err(|e| Error::unavailable(format!("the link broke mid-message: {e}")))?;
    ShmMessage::decode(body.as_slice())
        .map(Some)
        .map_err(|e| Error::invalid_argument(format!("an undecodable link message: {e}")))
}

fn message(id: u64, kind: Kind) -> ShmMessage {
    ShmMessage {
        id,
        kind: Some(kind),
    }
}

fn error_message(id: u64, error: &Error) -> ShmMessage {
    message(
        id,
        Kind::Error(proto::ShmError {
            code: error.code as i32,
            message: error.message.clone(),
            task: error.task.clone().unwrap_or_default(),
            exception_type: error.exception_type.clone().unwrap_or_default(),
        }),
    )
}

fn remote_error(error: proto::ShmError) -> Error {
    let given = |text: String| (!text.is_empty()).then_some(text);
    Error {
        task: given(error.task),
        exception_type: given(error.exception_type),
        ..Error::new(Code::from(error.code), error.message)
    }
}

// -- the sender's half ----------------------------------------------------------------------------

type Waiters = HashMap<u64, oneshot::Sender<Answer>>;

/// One answer on a link: its message and, for a call's result, the encoded response.
struct Answer {
    message: ShmMessage,
    payload: Bytes,
}

/// The answers coming back on a link, parsed out of a buffer that keeps whatever has been read:
/// a wait given up in the middle of an answer leaves the next reader where it stopped.
struct Answers {
    socket: SocketReader,
    pending: BytesMut,
    /// A large answer being read straight into a buffer of its own: its message, the buffer,
    /// and how much of it has come.
    partial: Option<(ShmMessage, TensorBuf, usize)>,
    /// Bound on a result's payload.
    max_payload: usize,
}

impl Answers {
    /// The next answer; `None` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<Answer>> {
        loop {
            if let Some((_, payload, filled)) = &mut self.partial {
                if *filled < payload.len() {
                    let read = self
                        .socket
                        .read(&mut payload.as_mut_slice()[*filled..])
                        .await
                        .map_err(|e| Error::unavailable(format!("the link broke: {e}")))?;
                    if read == 0 {
                        return Err(Error::unavailable("the link broke mid-message"));
                    }
                    *filled += read;
                    continue;
                }
                let (message, payload, _) = self.partial.take().expect("matched above");
                let payload = Bytes::from_owner(payload);
                return Ok(Some(Answer { message, payload }));
            }
            if let Some(answer) = self.parse()? {
                return Ok(Some(answer));
            }
            if self.partial.is_some() {
                continue;
            }
            if self.pending.capacity() - self.pending.len() < READ_BUFFER_BYTES {
                self.pending.reserve(READ_BUFFER_BYTES);
            }
            let read = self
                .socket
                .read_buf(&mut self.pending)
                .await
                .map_err(|e| Error::unavailable(format!("the link broke: {e}")))?;
            if read == 0 {
                if self.pending.is_empty() {
                    return Ok(None);
                }
                return Err(Error::unavailable("the link broke mid-message"));
            }
        }
    }

    /// The first whole answer in the buffer, taken out of it.
    fn parse(&mut self) -> Result<Option<Answer>> {
        let Some(prefix) = self.pending.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(*prefix) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(Error::invalid_argument(format!(
                "a {len}-byte link message is off-protocol"
            )));
        }
        let Some(body) = self.pending.get(4..4 + len) else {
            return Ok(None);
        };
        let message = ShmMessage::decode(body)
            .map_err(|e| Error::invalid_argument(format!("an undecodable link message: {e}")))?;
        let payload = match message.kind {
            Some(Kind::Result(bytes)) => bytes as usize,
            _ => 0,
        };
        if payload > self.max_payload {
            return Err(Error::invalid_argument(format!(
                "a {payload}-byte result is past the limit of {} (max_message_bytes)",
                self.max_payload
            )));
        }
        let whole = 4 + len + payload;
        if payload > INLINE_BYTES {
            // Read the rest in place rather than through the buffer.
            self.pending.advance(4 + len);
            let mut buffer = TensorBuf::new(payload);
            let filled = payload.min(self.pending.len());
            buffer.as_mut_slice()[..filled].copy_from_slice(&self.pending[..filled]);
            self.pending.advance(filled);
            self.partial = Some((message, buffer, filled));
            return Ok(None);
        }
        if self.pending.len() < whole {
            self.pending.reserve(whole - self.pending.len());
            return Ok(None);
        }
        let mut frame = self.pending.split_to(whole).freeze();
        let payload = frame.split_off(4 + len);
        Ok(Some(Answer { message, payload }))
    }
}

/// The sending side of a link to one peer task.
pub struct Link {
    peer: TaskId,
    /// The receiving process, whose segments are opened through `/proc/<pid>/fd`.
    pid: u32,
    socket: Arc<Socket>,
    /// The answers, read by whichever waiting send holds this.
    answers: tokio::sync::Mutex<Answers>,
    waiters: Mutex<Waiters>,
    broken: AtomicBool,
    next_id: AtomicU64,
    /// The receiver's segments this side has mapped, newest last, bounded like its pool.
    mappings: Mutex<Recycler<(u64, Arc<Mapping>)>>,
}

impl Link {
    /// Opens the link over a connected socket: presents the handshake's ticket and waits to be
    /// welcomed. `max_result_bytes` bounds the results of calls made on it.
    pub async fn open(
        stream: UnixStream,
        peer: TaskId,
        pid: u32,
        ticket: Vec<u8>,
        max_result_bytes: usize,
    ) -> Result<Arc<Self>> {
        let socket = Socket::new(stream)
            .map_err(|e| Error::unavailable(format!("cannot watch the link to {peer}: {e}")))?;
        let mut answers = Answers {
            socket: SocketReader(Arc::clone(&socket)),
            pending: BytesMut::new(),
            partial: None,
            max_payload: max_result_bytes,
        };
        socket
            .write_message(&message(0, Kind::Hello(ticket)), &[])
            .await
            .map_err(|e| Error::unavailable(format!("cannot greet {peer}: {e}")))?;
        match answers.next().await? {
            Some(Answer {
                message:
                    ShmMessage {
                        kind: Some(Kind::Welcome(_)),
                        ..
                    },
                ..
            }) => {}
            _ => {
                return Err(Error::unavailable(format!(
                    "{peer} refused the same-host link"
                )));
            }
        }
        Ok(Arc::new(Self {
            peer,
            pid,
            socket,
            answers: tokio::sync::Mutex::new(answers),
            waiters: Mutex::new(HashMap::new()),
            broken: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            mappings: Mutex::new(Recycler::new(POOL_SEGMENTS, POOL_BYTES, |(_, mapping)| {
                mapping.len()
            })),
        }))
    }

    /// Whether the link can carry no more tensors: closed, or the peer went away. Nobody reads an
    /// idle link, so the socket itself is asked whether the peer hung up.
    pub fn is_broken(&self) -> bool {
        if self.broken.load(Ordering::Acquire) {
            return true;
        }
        if self.socket.hung_up() {
            self.break_off();
            return true;
        }
        false
    }

    /// Sends one tensor and returns once the receiver holds it. A send abandoned half-way closes
    /// the link, so the receiver never waits on a tensor that will not come.
    pub async fn send(&self, header: &proto::TensorHeader, payload: &[u8]) -> Result<()> {
        let mut abandoned = Abandoned(Some(self));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let total = payload.len() as u64;
        let answer = if payload.len() <= INLINE_BYTES {
            self.request(message(id, Kind::Inline(header.clone())), payload)
                .await?
        } else {
            let grant = match self
                .request(message(id, Kind::Alloc(header.clone())), &[])
                .await?
            {
                Kind::Grant(grant) => grant,
                _ => return Err(Error::internal("the receiver answered alloc off-protocol")),
            };
            let mapping = self.mapping(&grant)?;
            if (mapping.len() as u64) < total {
                return Err(Error::internal("the granted segment is too small"));
            }
            mapping.copy_in(payload);
            self.request(message(id, Kind::Commit(true)), &[]).await?
        };
        abandoned.0 = None;
        match answer {
            Kind::Ack(kept) if kept == total => Ok(()),
            Kind::Ack(kept) => Err(Error::data_loss(format!(
                "the receiver kept {kept} of {total} bytes"
            ))),
            _ => Err(Error::internal("the receiver answered off-protocol")),
        }
    }

    /// Runs operation `request.op` of the peer and returns its result. Unlike a send, a call may
    /// be given up once its request is out (a timeout, Ctrl-C): its answer is dropped on arrival.
    /// The peer holds the call to `timeout` too.
    pub async fn call(
        &self,
        request: &proto::CallRequest,
        timeout: Option<std::time::Duration>,
    ) -> Result<proto::Value> {
        let len = request.encoded_len();
        let mut call = proto::ShmCall {
            request_bytes: len as u64,
            timeout_seconds: timeout.map_or(0.0, |limit| limit.as_secs_f64()),
            in_segment: false,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let answer = if len <= INLINE_BYTES {
            let encoded = request.encode_to_vec();
            self.round_trip(message(id, Kind::Call(call)), &encoded)
                .await?
        } else {
            // Written once, into the receiver's memory; a call given up before its request is
            // out closes the link, which frees the segment.
            let mut lent = Abandoned(Some(self));
            let grant = match self
                .request(message(id, Kind::Lend(len as u64)), &[])
                .await?
            {
                Kind::Grant(grant) => grant,
                _ => return Err(Error::internal("the receiver answered lend off-protocol")),
            };
            let mapping = self.mapping(&grant)?;
            if mapping.len() < len {
                return Err(Error::internal("the lent segment is too small"));
            }
            mapping.encode_in(request)?;
            call.in_segment = true;
            let call = self.round_trip(message(id, Kind::Call(call)), &[]);
            lent.0 = None;
            call.await?
        };
        match answer.message.kind {
            Some(Kind::Result(_)) => proto::CallResponse::decode(answer.payload)?
                .result
                .ok_or_else(|| Error::invalid_argument("the response carries no result")),
            _ => Err(Error::internal("the receiver answered a call off-protocol")),
        }
    }

    /// Sends `request` and waits for the answer under its id; an error answer becomes `Err`.
    async fn request(&self, request: ShmMessage, payload: &[u8]) -> Result<Kind> {
        self.round_trip(request, payload)
            .await?
            .message
            .kind
            .ok_or_else(|| Error::internal("an empty answer on the link"))
    }

    /// Writes `request` and its payload, then waits for the answer under its id; an error answer
    /// becomes `Err`. A message cut off half-way (this future dropped, or a failed write) closes
    /// the link, whose stream can no longer be read.
    async fn round_trip(&self, request: ShmMessage, payload: &[u8]) -> Result<Answer> {
        let (sender, answer) = oneshot::channel();
        self.lock_waiters().insert(request.id, sender);
        let _waiting = Waiting(self, request.id);
        if self.broken.load(Ordering::Acquire) {
            return Err(self.gone());
        }
        let mut cut_off = Abandoned(Some(self));
        self.socket
            .write_message(&request, payload)
            .await
            .map_err(|e| Error::unavailable(format!("the link to {} broke: {e}", self.peer)))?;
        cut_off.0 = None;
        let answer = self.answer(answer).await?;
        match answer.message.kind {
            Some(Kind::Error(error)) => Err(remote_error(error)),
            _ => Ok(answer),
        }
    }

    /// Waits for the answer `answer` will carry: reads the link itself once no other send is
    /// reading it, handing every other answer to its send, until this one has come.
    async fn answer(&self, mut answer: oneshot::Receiver<Answer>) -> Result<Answer> {
        let mut answers = tokio::select! {
            biased;
            answered = &mut answer => return answered.map_err(|_| self.gone()),
            answers = self.answers.lock() => answers,
        };
        loop {
            match answer.try_recv() {
                Ok(answered) => return Ok(answered),
                Err(oneshot::error::TryRecvError::Closed) => return Err(self.gone()),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            match answers.next().await {
                Ok(Some(answered)) => {
                    let waiter = self.lock_waiters().remove(&answered.message.id);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(answered);
                    }
                }
                Ok(None) | Err(_) => {
                    self.break_off();
                    return Err(self.gone());
                }
            }
        }
    }

    /// The sender's mapping of a granted segment, reusing an earlier one of the same segment.
    fn mapping(&self, grant: &proto::ShmGrant) -> Result<Arc<Mapping>> {
        let mut mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, mapping)) = mappings.find(|(id, _)| *id == grant.segment) {
            return Ok(Arc::clone(mapping));
        }
        let mapping = Arc::new(Mapping::open_remote(
            self.pid,
            grant.fd,
            grant.capacity as usize,
        )?);
        // As many as the receiver pools: a mapping of a segment it has since freed keeps that
        // memory alive until evicted here.
        let evicted = mappings.keep((grant.segment, Arc::clone(&mapping)));
        drop(mappings);
        drop(evicted);
        Ok(mapping)
    }

    /// Ends the link: the receiver sees the stream end and frees what it lent.
    pub fn close(&self) {
        self.broken.store(true, Ordering::Release);
        self.socket.shut_down();
        self.unmap_all();
    }

    /// The peer went away: every waiting send fails.
    fn break_off(&self) {
        self.broken.store(true, Ordering::Release);
        // Dropping the waiters' senders wakes them with an error.
        let waiters = std::mem::take(&mut *self.lock_waiters());
        drop(waiters);
        self.unmap_all();
    }

    /// Lets go of every mapping of the peer's segments (unmapped outside the lock).
    fn unmap_all(&self) {
        let mappings = self
            .mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain();
        drop(mappings);
    }

    fn gone(&self) -> Error {
        Error::unavailable(format!("the same-host link to {} is closed", self.peer))
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Forgets a request's waiter when its wait ends, answered or not.
struct Waiting<'a>(&'a Link, u64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock_waiters().remove(&self.1);
    }
}

/// Closes the link if a send stops half-way (its future dropped, or an error mid-transfer).
struct Abandoned<'a>(Option<&'a Link>);

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(link) = self.0 {
            link.close();
            link.break_off();
        }
    }
}

// -- the receiver's half --------------------------------------------------------------------------

/// The ticket a new connection presents first.
pub async fn read_hello(reader: &mut BufReader<SocketReader>) -> Result<Vec<u8>> {
    match read_message(reader).await? {
        Some(ShmMessage {
            kind: Some(Kind::Hello(ticket)),
            ..
        }) => Ok(ticket),
        _ => Err(Error::invalid_argument("the link did not start with hello")),
    }
}

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
                    let reservation = inbox.reserve(&key.source, total as u64)?;
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
                    let reservation = inbox.reserve(&key.source, total as u64)?;
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
                let tensor = Tensor {
                    meta: grant.meta,
                    data: grant.data,
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
    let served = match proto::CallRequest::decode(request) {
        Ok(request) => (serving.calls)(caller, request, timeout).await,
        Err(e) => Err(Error::invalid_argument(format!("an undecodable call: {e}"))),
    };
    serving.calls_served.fetch_add(1, Ordering::Relaxed);
    let response = served.and_then(|result| {
        let response = proto::CallResponse {
            result: Some(result),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A write larger than the socket's buffer waits for the peer to drain it, although the
    /// socket is watched for reading only.
    #[tokio::test]
    async fn a_write_past_the_socket_buffer_waits_for_the_reader() {
        let (near, far) = UnixStream::pair().unwrap();
        let (near, far) = (Socket::new(near).unwrap(), Socket::new(far).unwrap());
        let sent: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut reader = far.reader();
            let mut received = vec![0u8; 8 << 20];
            // Slowly, so that the writer finds the buffer full many times.
            for chunk in received.chunks_mut(256 << 10) {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                reader.read_exact(chunk).await.unwrap();
            }
            received
        });
        near.write_all(&sent).await.unwrap();
        assert!(reader.await.unwrap() == sent);
    }

    /// A wait given up in the middle of a large answer leaves the next reader where it stopped.
    #[tokio::test]
    async fn an_answer_read_half_way_is_finished_by_the_next_reader() {
        let (near, far) = UnixStream::pair().unwrap();
        let (near, far) = (Socket::new(near).unwrap(), Socket::new(far).unwrap());
        let mut answers = Answers {
            socket: SocketReader(Arc::clone(&far)),
            pending: BytesMut::new(),
            partial: None,
            max_payload: 1 << 20,
        };
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let result = message(7, Kind::Result(payload.len() as u64));
        let mut frame = Vec::new();
        frame.extend_from_slice(&(result.encoded_len() as u32).to_le_bytes());
        result.encode(&mut frame).unwrap();
        frame.extend_from_slice(&payload);
        let rest = frame.split_off(100_000);
        near.write_all(&frame).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), answers.next()).await;
        assert!(waited.is_err(), "the answer cannot be whole yet");
        let writer = tokio::spawn(async move { near.write_all(&rest).await });
        let answer = answers.next().await.unwrap().unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(answer.message, result);
        assert!(answer.payload == payload);
    }
}
