//! The HTTP/2 push of one tensor, both ends: the sender streams the tensor's frames and waits for
//! the acknowledgement; the receiver parses the stream as it arrives into the inbox and answers
//! only once it holds the whole tensor, so an acknowledged tensor is never lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;

use super::peers::Peers;
use super::tls::check_identity;
use crate::base::cluster::TaskId;
use crate::base::errors::{Code, Error, Result};
use crate::base::security::AUTHORIZATION;
use crate::inbox::Inbox;
use crate::proto;
use crate::wire::{self, ChunkParser};

/// gRPC path of the tensor push, served by hand (see `node::service`) so payload bytes are
/// copied once.
pub const SEND_TENSOR_PATH: &str = "/distsrv.v1.Worker/SendTensor";

/// A header message is a few hundred bytes; this bounds what an off-protocol peer can make the
/// server buffer before the header is checked.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// Streams the frames of one tensor to `to` and waits for its acknowledgement.
pub async fn push(peers: &Peers, to: &TaskId, frames: Vec<Bytes>, total: u64) -> Result<()> {
    let (connection, uri) = peers.push_connection(to, SEND_TENSOR_PATH).await?;
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Some(authorization) = peers.security().authorization() {
        request = request.header(AUTHORIZATION, authorization.clone());
    }
    let request = request
        .body(())
        .map_err(|e| Error::internal(format!("cannot build the request: {e}")))?;
    let mut requests = connection.requests.ready().await.map_err(broken)?;
    let (response, body) = requests.send_request(request, false).map_err(broken)?;
    let mut body = Outgoing(Some(body));
    // Every frame is queued before the connection next writes, so a small tensor's headers and
    // payload leave in one write. HTTP/2 holds what flow control does not let out yet: the
    // frames are slices of the caller's buffer, so holding them costs no memory.
    let last = frames.len().saturating_sub(1);
    let mut cut_short = None;
    for (index, frame) in frames.into_iter().enumerate() {
        if let Err(error) = body.stream().send_data(frame, index == last) {
            cut_short = Some(broken(error));
            break;
        }
    }
    // A receiver that refuses the tensor (say, its caller is not authenticated) answers and
    // ends the stream before taking it all: its answer says why, better than the cut stream.
    let response = match (response.await, cut_short) {
        (Ok(response), _) => response,
        (Err(error), None) => return Err(broken(error)),
        (Err(_), Some(cut_short)) => return Err(cut_short),
    };
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
    body.answered();
    let reply: proto::SendTensorResponse = wire::unframe_message(&reply)?;
    if reply.received_bytes != total {
        return Err(Error::data_loss(format!(
            "the receiver kept {} of {total} bytes",
            reply.received_bytes
        )));
    }
    Ok(())
}

/// The body of a push, reset if the push is dropped before the receiver answered (cut short by
/// a timeout, a lost peer, Ctrl-C): the reset drops the frames HTTP/2 still queues, slices of the
/// caller's array, at once, where a dropped stream would go on sending them.
struct Outgoing(Option<h2::SendStream<Bytes>>);

impl Outgoing {
    fn stream(&mut self) -> &mut h2::SendStream<Bytes> {
        self.0.as_mut().expect("a push's body until it is answered")
    }

    fn answered(&mut self) {
        self.0 = None;
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Some(stream) = self.0.as_mut() {
            stream.send_reset(h2::Reason::CANCEL);
        }
    }
}

/// A push cut short by the connection or the peer.
fn broken(error: h2::Error) -> Error {
    Error::unavailable(match error.get_io() {
        Some(io) => format!("the connection broke: {io}"),
        None => error.to_string(),
    })
}

/// Serves one pushed tensor: parses the stream as it arrives into a buffer reserved in `inbox`,
/// delivers it, and returns the number of bytes kept. Nothing is delivered unless the whole
/// tensor arrived intact, nor a tensor whose source is not `certified`, the task the sender's
/// certificate names (where it names one). A stream that brings nothing for `idle` (a stalled or
/// frozen sender) is given up, and its reservation and call slot freed.
pub async fn accept(
    inbox: &Arc<Inbox>,
    mut body: tonic::body::Body,
    certified: Option<&TaskId>,
    idle: Duration,
) -> Result<u64> {
    let mut parser = ChunkParser::new(MAX_HEADER_BYTES);
    let mut reservation = None;
    let mut admit = |announced: wire::Announced<'_>| {
        check_identity(certified, &announced.key.source, "send")?;
        let size = announced.meta.byte_len().unwrap_or(0);
        reservation = Some(inbox.reserve(announced.key, size)?);
        Ok(())
    };
    loop {
        let Ok(next) = tokio::time::timeout(idle, body.frame()).await else {
            return Err(Error::deadline_exceeded(format!(
                "the tensor stream sent nothing for {idle:.1?}"
            )));
        };
        let Some(frame) = next else {
            break;
        };
        let frame = frame.map_err(|e| Error::cancelled(format!("the sender went away: {e}")))?;
        if let Ok(data) = frame.into_data() {
            parser.feed(data, &mut admit)?;
        }
    }
    let (key, tensor) = parser.finish()?;
    let size = tensor.data.len() as u64;
    let reservation = reservation.expect("a finished stream was admitted");
    inbox.deliver(key, tensor, reservation)?;
    Ok(size)
}
