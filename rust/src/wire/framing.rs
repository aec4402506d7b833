//! gRPC's framing by hand, so payload slices go to the socket straight from the caller's memory.
//!
//! A tensor travels as a stream of `TensorChunk` messages: the first carries only the
//! [`proto::TensorHeader`], the rest carry consecutive payload slices.

use bytes::{Bytes, BytesMut};
use prost::Message;

use crate::base::errors::{Error, Result};
use crate::proto;

/// gRPC's length prefix: an uncompressed flag and the message length, big-endian.
fn grpc_prefix(out: &mut BytesMut, message_len: usize) {
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(message_len as u32).to_be_bytes());
}

/// A whole gRPC-framed message.
pub fn frame_message(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    grpc_prefix(&mut out, len);
    message.encode(&mut out).expect("capacity reserved");
    out.freeze()
}

/// The one gRPC-framed message that is the whole of `framed`.
pub fn unframe_message<M: Message + Default>(framed: &[u8]) -> Result<M> {
    let Some((&[compressed, a, b, c, d], message)) = framed.split_first_chunk::<5>() else {
        return Err(Error::data_loss(format!(
            "{} bytes are not a gRPC message",
            framed.len()
        )));
    };
    let declared = u32::from_be_bytes([a, b, c, d]) as usize;
    if compressed != 0 || message.len() != declared {
        return Err(Error::data_loss(format!(
            "not one uncompressed {declared}-byte gRPC message"
        )));
    }
    M::decode(message).map_err(|e| Error::invalid_argument(format!("an undecodable message: {e}")))
}

/// Tensors up to this size travel as one frame: copying them costs less than the transport's
/// per-frame work.
const COALESCE_BYTES: usize = 64 << 10;

/// The frames of a tensor stream: the framed header, then for every chunk a small prefix
/// (gRPC length prefix, `data` tag and length) followed by a slice of `payload` itself. A small
/// tensor's frames are joined into one.
pub fn tensor_frames(header: &proto::TensorHeader, payload: Bytes, chunk: usize) -> Vec<Bytes> {
    let frames = split_frames(header, payload, chunk);
    let total: usize = frames.iter().map(Bytes::len).sum();
    if total > COALESCE_BYTES {
        return frames;
    }
    let mut joined = BytesMut::with_capacity(total);
    for frame in &frames {
        joined.extend_from_slice(frame);
    }
    vec![joined.freeze()]
}

/// A tensor stream's messages, unframed: the header, then `payload` in slices of `chunk` bytes
/// (views of it, not copies). What a generated gRPC server sends, such as RecvTensor's.
pub fn tensor_chunks(
    header: &proto::TensorHeader,
    payload: Bytes,
    chunk: usize,
) -> impl Iterator<Item = proto::TensorChunk> + use<> {
    let first = proto::TensorChunk {
        header: Some(header.clone()),
        data: Bytes::new(),
    };
    let data = slices(payload, chunk).map(|data| proto::TensorChunk { header: None, data });
    std::iter::once(first).chain(data)
}

/// `payload` in consecutive slices of at most `chunk` bytes.
fn slices(payload: Bytes, chunk: usize) -> impl Iterator<Item = Bytes> {
    let chunk = chunk.max(1);
    (0..payload.len().div_ceil(chunk))
        .map(move |i| payload.slice(i * chunk..((i + 1) * chunk).min(payload.len())))
}

pub(super) fn split_frames(
    header: &proto::TensorHeader,
    payload: Bytes,
    chunk: usize,
) -> Vec<Bytes> {
    let first = frame_message(&proto::TensorChunk {
        header: Some(header.clone()),
        data: Bytes::new(),
    });
    let mut frames = Vec::with_capacity(1 + 2 * payload.len().div_ceil(chunk.max(1)));
    frames.push(first);
    for slice in slices(payload, chunk) {
        let mut prefix = BytesMut::with_capacity(16);
        let slice_len = slice.len();
        let field =
            prost::encoding::key_len(2) + prost::encoding::encoded_len_varint(slice_len as u64);
        grpc_prefix(&mut prefix, field + slice_len);
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut prefix);
        prost::encoding::encode_varint(slice_len as u64, &mut prefix);
        frames.push(prefix.freeze());
        frames.push(slice);
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::errors::Code;

    #[test]
    fn a_framed_message_unframes_and_anything_else_is_refused() {
        let reply = proto::SendTensorResponse {
            received_bytes: 4096,
        };
        let framed = frame_message(&reply);
        let back: proto::SendTensorResponse = unframe_message(&framed).unwrap();
        assert_eq!(back, reply);
        for broken in [&framed[..4], &framed[..framed.len() - 1]] {
            let error = unframe_message::<proto::SendTensorResponse>(broken).unwrap_err();
            assert_eq!(error.code, Code::DataLoss);
        }
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        let error = unframe_message::<proto::SendTensorResponse>(&compressed).unwrap_err();
        assert_eq!(error.code, Code::DataLoss);
    }
}
