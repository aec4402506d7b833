//! The sender's half of a same-host link ([`Link`]): it may carry many tensors and calls at
//! once, each under its own id. The sends waiting for answers read them themselves, one at a
//! time, each handing on the answers that are not its own: a lone blocking send writes its
//! tensor and reads its acknowledgement on its own thread, with no other thread woken on its
//! side. A tensor is acknowledged only once it is in the receiver's inbox, as over gRPC.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};

use prost::Message;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use super::socket::{
    INLINE_BYTES, MAX_MESSAGE_BYTES, READ_BUFFER_BYTES, Socket, SocketReader, message, remote_error,
};
use crate::base::cluster::TaskId;
use crate::base::errors::{Error, Result};
use crate::proto::{self, ShmMessage, shm_message::Kind};
use crate::tensor::recycle::Recycler;
use crate::tensor::segment::{Mapping, POOL_SEGMENTS};
use crate::tensor::{POOL_BYTES, TensorBuf};
use crate::wire::values;

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
            Some(Kind::Result(_)) => values::decode_checked::<proto::CallResponse>(answer.payload)?
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
