//! The HTTP/2 push of one tensor, both ends: the sender streams the tensor's frames and waits for
//! the acknowledgement; the receiver parses the stream as it arrives into the inbox and answers
//! only once it holds the whole tensor, so an acknowledged tensor is never lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use super::peers::Peers;
use super::tls::check_identity;
use super::{stall, unary};
use crate::base::cluster::TaskId;
use crate::base::errors::{Error, Result};
use crate::inbox::Inbox;
use crate::proto;
use crate::wire::{self, ChunkParser};

/// gRPC path of the tensor push, served by hand (see `node::service`) so payload bytes are
/// copied once.
pub const SEND_TENSOR_PATH: &str = "/distsrv.v1.Worker/SendTensor";

/// A header message is a few hundred bytes; this bounds what an off-protocol peer can make the
/// server buffer before the header is checked.
const MAX_HEADER_BYTES: usize = 64 << 10;
/// The acknowledgement is one small message.
const MAX_ANSWER_BYTES: usize = 1 << 10;

/// Streams the frames of one tensor to `to` and waits for its acknowledgement.
pub async fn push(peers: &Peers, to: &TaskId, frames: Vec<Bytes>, total: u64) -> Result<()> {
    let answer = unary::post(peers, to, SEND_TENSOR_PATH, frames, None, MAX_ANSWER_BYTES).await?;
    let reply = proto::SendTensorResponse::decode(answer.bytes())?;
    if reply.received_bytes != total {
        return Err(Error::data_loss(format!(
            "the receiver kept {} of {total} bytes",
            reply.received_bytes
        )));
    }
    Ok(())
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
    while let Some(data) = stall::next_data(&mut body, idle).await? {
        parser.feed(data, &mut admit)?;
    }
    let (key, tensor) = parser.finish()?;
    let size = tensor.data.len() as u64;
    let reservation = reservation.expect("a finished stream was admitted");
    inbox.deliver(key, tensor, reservation)?;
    Ok(size)
}
