//! A same-host link's socket and its messages: each a length-prefixed `ShmMessage`, perhaps
//! followed by payload bytes (an inline tensor, a call's encoded request or result).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, Interest, ReadBuf};

use crate::base::errors::{Code, Error, Result};
use crate::proto::{self, ShmMessage, shm_message::Kind};

/// Tensors up to this size travel inline on the socket: one small write beats a segment's extra
/// round trip.
pub const INLINE_BYTES: usize = 64 << 10;
/// Bound on one control message (a tensor header is a few hundred bytes).
pub(super) const MAX_MESSAGE_BYTES: usize = 64 << 10;
/// Read buffer of either side: a whole inline tensor and its message in one read.
pub(super) const READ_BUFFER_BYTES: usize = INLINE_BYTES + 4096;

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

    pub(super) async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
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
    pub(super) async fn write_message(
        &self,
        message: &ShmMessage,
        payload: &[u8],
    ) -> std::io::Result<()> {
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
    pub(super) fn hung_up(&self) -> bool {
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
    pub(super) fn shut_down(&self) {
        let _ = self.watched.get_ref().shutdown(std::net::Shutdown::Write);
    }
}

/// `stream`, made non-blocking and watched by the current runtime for `interest`.
pub(super) fn watch(
    stream: UnixStream,
    interest: Interest,
) -> std::io::Result<AsyncFd<UnixStream>> {
    stream.set_nonblocking(true)?;
    // SAFETY: the stream owns its descriptor, which nothing closes or replaces while the
    // `AsyncFd` holds it.
    Ok(unsafe { AsyncFd::register_with_interest(stream, interest) }?)
}

/// The reading side of a [`Socket`].
pub struct SocketReader(pub(super) Arc<Socket>);

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
pub(super) async fn read_message<R: AsyncRead + Unpin>(
    input: &mut R,
) -> Result<Option<ShmMessage>> {
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

pub(super) fn message(id: u64, kind: Kind) -> ShmMessage {
    ShmMessage {
        id,
        kind: Some(kind),
    }
}

pub(super) fn error_message(id: u64, error: &Error) -> ShmMessage {
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

pub(super) fn remote_error(error: proto::ShmError) -> Error {
    let given = |text: String| (!text.is_empty()).then_some(text);
    Error {
        task: given(error.task),
        exception_type: given(error.exception_type),
        ..Error::new(Code::from(error.code), error.message)
    }
}

// -- the sender's half ----------------------------------------------------------------------------

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
}
