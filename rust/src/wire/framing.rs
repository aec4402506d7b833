//! gRPC's framing by hand, so payload slices go to the socket straight from the caller's memory,
//! and a message that arrives is copied once, into a buffer its arrays can stay in.
//!
//! A tensor travels as a stream of `TensorChunk` messages: the first carries only the
//! [`proto::TensorHeader`], the rest carry consecutive payload slices. A unary call's message
//! travels whole ([`frame_scattered`], [`Assembler`]).

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::base::errors::{Error, Result};
use crate::proto;
use crate::tensor::TensorBuf;
use crate::tensor::buf::{ALIGNMENT, Arrived};

/// `bytes` fields at least this large are sent from their own buffer and, arrived aligned, stay
/// where they arrived: below it a copy costs less than the bookkeeping.
pub const IN_PLACE_BYTES: usize = 64 << 10;

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

/// `message` gRPC-framed as slices: each of its `bytes` fields of [`IN_PLACE_BYTES`] or more is
/// a slice of that field's own buffer, not a copy. Where `padding` names a `bytes` field (number
/// 15 at most) that the receiver ignores, that field goes first, as long as puts the first large
/// field on an [`ALIGNMENT`] boundary of the message.
pub fn frame_scattered(message: &impl Message, padding: Option<u32>) -> Vec<Bytes> {
    let mut scatter = Scatter::default();
    message
        .encode(&mut scatter)
        .expect("a scatter has room for any message");
    let mut head = BytesMut::with_capacity(5 + 2 + ALIGNMENT);
    let pad = match (padding, scatter.first_large) {
        (Some(field), Some(offset)) => {
            debug_assert!(field <= 15, "a one-byte key");
            // A key and a one-byte length, then as many bytes as the boundary needs.
            let fill = (ALIGNMENT - (offset + 2) % ALIGNMENT) % ALIGNMENT;
            Some((field, fill))
        }
        _ => None,
    };
    let pad_len = pad.map_or(0, |(_, fill)| 2 + fill);
    grpc_prefix(&mut head, pad_len + scatter.len);
    if let Some((field, fill)) = pad {
        prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut head);
        prost::encoding::encode_varint(fill as u64, &mut head);
        head.put_bytes(0, fill);
    }
    let mut frames = scatter.finish();
    frames.insert(0, head.freeze());
    frames
}

/// A `BufMut` that prost encodes into: small fields are copied into buffers of its own, and a
/// large `bytes` field (which prost hands over with `put`, as its `Bytes`) is kept as a slice.
#[derive(Default)]
struct Scatter {
    frames: Vec<Bytes>,
    current: BytesMut,
    len: usize,
    /// Where the first large field starts in the message.
    first_large: Option<usize>,
}

impl Scatter {
    fn finish(mut self) -> Vec<Bytes> {
        self.flush();
        self.frames
    }

    fn flush(&mut self) {
        if !self.current.is_empty() {
            self.frames.push(self.current.split().freeze());
        }
    }
}

// SAFETY: every method defers to `current`, counting what it writes.
unsafe impl BufMut for Scatter {
    fn remaining_mut(&self) -> usize {
        usize::MAX - self.len
    }

    unsafe fn advance_mut(&mut self, count: usize) {
        // SAFETY: the caller initialised `count` bytes of `current`'s chunk.
        unsafe { self.current.advance_mut(count) };
        self.len += count;
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        if self.current.len() == self.current.capacity() {
            self.current.reserve(4096);
        }
        self.current.chunk_mut()
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        if src.remaining() < IN_PLACE_BYTES {
            while src.has_remaining() {
                let chunk = src.chunk();
                let count = chunk.len();
                self.put_slice(chunk);
                src.advance(count);
            }
            return;
        }
        self.flush();
        // A `Bytes` gives its bytes without copying them.
        let large = src.copy_to_bytes(src.remaining());
        self.first_large.get_or_insert(self.len);
        self.len += large.len();
        self.frames.push(large);
    }

    fn put_slice(&mut self, src: &[u8]) {
        self.current.extend_from_slice(src);
        self.len += src.len();
    }
}

/// The one message of a unary call, gathered from its frames as they arrive into one aligned
/// buffer: the only copy its bytes take on this side.
pub struct Assembler {
    max: usize,
    prefix: [u8; 5],
    prefix_len: usize,
    message: Option<(TensorBuf, usize)>,
}

impl Assembler {
    /// An assembler that refuses a message past `max` bytes before taking any of it.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            prefix: [0; 5],
            prefix_len: 0,
            message: None,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let Some((buffer, filled)) = &mut self.message else {
                let count = (5 - self.prefix_len).min(data.len());
                self.prefix[self.prefix_len..][..count].copy_from_slice(&data[..count]);
                self.prefix_len += count;
                data = &data[count..];
                if self.prefix_len == 5 {
                    self.message = Some((TensorBuf::new(self.declared()?), 0));
                }
                continue;
            };
            let room = buffer.len() - *filled;
            if room == 0 {
                return Err(Error::invalid_argument(
                    "more than one message where one was due",
                ));
            }
            let count = room.min(data.len());
            buffer.as_mut_slice()[*filled..][..count].copy_from_slice(&data[..count]);
            *filled += count;
            data = &data[count..];
        }
        Ok(())
    }

    /// The length the prefix declares, once checked.
    fn declared(&self) -> Result<usize> {
        let [compressed, length @ ..] = self.prefix;
        let len = u32::from_be_bytes(length) as usize;
        match compressed {
            0 => {}
            1 => {
                return Err(Error::unimplemented(
                    "compressed messages are not supported",
                ));
            }
            flag => {
                return Err(Error::invalid_argument(format!(
                    "a gRPC message with flag {flag}"
                )));
            }
        }
        if len > self.max {
            return Err(Error::resource_exhausted(format!(
                "a message of {len} bytes is past the limit of {} (max_message_bytes)",
                self.max
            )));
        }
        Ok(len)
    }

    /// The message, once the stream ended; `None` if it brought none.
    pub fn finish(self) -> Result<Option<Arrived>> {
        match self.message {
            None if self.prefix_len == 0 => Ok(None),
            Some((buffer, filled)) if filled == buffer.len() => Ok(Some(Arrived::new(buffer))),
            _ => Err(Error::invalid_argument(
                "the stream ended in the middle of a message",
            )),
        }
    }
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

    fn assembled(frames: &[&[u8]], max: usize) -> Result<Option<Arrived>> {
        let mut assembler = Assembler::new(max);
        for frame in frames {
            assembler.feed(frame)?;
        }
        assembler.finish()
    }

    #[test]
    fn a_framed_message_is_assembled_from_any_split_and_anything_else_is_refused() {
        let reply = proto::SendTensorResponse {
            received_bytes: 4096,
        };
        let framed = frame_message(&reply);
        for split in 0..framed.len() {
            let (head, tail) = framed.split_at(split);
            let arrived = assembled(&[head, tail], 64).unwrap().unwrap();
            let back = proto::SendTensorResponse::decode(arrived.bytes()).unwrap();
            assert_eq!(back, reply);
        }
        assert!(assembled(&[], 64).unwrap().is_none());
        let code = |frames: &[&[u8]], max| assembled(frames, max).unwrap_err().code;
        assert_eq!(code(&[&framed[..4]], 64), Code::InvalidArgument);
        assert_eq!(
            code(&[&framed[..framed.len() - 1]], 64),
            Code::InvalidArgument
        );
        assert_eq!(code(&[&framed, &framed], 64), Code::InvalidArgument);
        assert_eq!(code(&[&framed], 2), Code::ResourceExhausted);
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert_eq!(code(&[&compressed], 64), Code::Unimplemented);
    }

    #[test]
    fn a_scattered_message_borrows_its_large_fields_and_pads_the_first_to_a_boundary() {
        let large = Bytes::from(vec![7u8; IN_PLACE_BYTES + 3]);
        for op in ["", "o", "op", "a longer name of an operation"] {
            let request = proto::CallRequest {
                op: op.into(),
                kwargs: Some(proto::DictValue {
                    entries: vec![proto::DictEntry {
                        key: "x".into(),
                        value: Some(proto::Value {
                            kind: Some(proto::value::Kind::BytesValue(large.clone())),
                        }),
                    }],
                }),
                ..Default::default()
            };
            let frames = frame_scattered(&request, Some(15));
            assert!(
                frames.iter().any(|frame| frame.as_ptr() == large.as_ptr()),
                "the large field is sent from its own buffer"
            );
            let joined: Vec<u8> = frames.concat();
            let arrived = assembled(&[&joined], usize::MAX).unwrap().unwrap();
            let back = proto::CallRequest::decode(arrived.bytes()).unwrap();
            let value = back.kwargs.unwrap().entries[0].value.clone().unwrap();
            let Some(proto::value::Kind::BytesValue(data)) = value.kind else {
                panic!("the value is bytes");
            };
            assert_eq!(data, large);
            assert_eq!(data.as_ptr() as usize % ALIGNMENT, 0, "op {op:?}");
            assert_eq!(back.op, op);
        }
        // Nothing large: nothing to pad, and the message is prost's own.
        let small = proto::SendTensorResponse { received_bytes: 3 };
        assert_eq!(
            frame_scattered(&small, Some(15)).concat(),
            frame_message(&small)
        );
    }
}
