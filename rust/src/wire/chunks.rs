//! Parses a tensor stream as it arrives, copying each payload byte once, into the tensor's final
//! buffer.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

use super::messages::parse_header;
use crate::base::errors::{Error, Result};
use crate::proto;
use crate::tensor::{Tensor, TensorBuf, TensorKey, TensorMeta};

/// Where the parser is within the stream.
enum State {
    /// Collecting the 5-byte gRPC prefix of the next message.
    Prefix,
    /// Collecting the whole (small) header message of this many bytes.
    Header(usize),
    /// Collecting the `data` field's tag and length at the start of a chunk message of this
    /// many bytes.
    ChunkField(usize),
    /// Copying this many payload bytes straight into the tensor.
    Payload(usize),
}

/// Parses a tensor stream as it arrives, whatever the frame boundaries, copying payload bytes
/// directly into the tensor's buffer. Rejects, rather than repairs, anything off-protocol.
pub struct ChunkParser {
    state: State,
    /// Bytes of a prefix, header or field key not yet complete.
    pending: BytesMut,
    max_header_bytes: usize,
    started: Option<Started>,
}

struct Started {
    key: TensorKey,
    tensor: Tensor,
    filled: usize,
}

/// What the parser learnt from the first message; the caller checks it (e.g. reserves memory)
/// before any payload is accepted.
pub struct Announced<'a> {
    pub key: &'a TensorKey,
    pub meta: &'a TensorMeta,
}

impl ChunkParser {
    pub fn new(max_header_bytes: usize) -> Self {
        Self {
            state: State::Prefix,
            pending: BytesMut::new(),
            max_header_bytes,
            started: None,
        }
    }

    /// Consumes one frame of the request body. `on_header` runs once, when the header is
    /// complete and before the buffer is allocated; its error aborts the stream.
    pub fn feed(
        &mut self,
        mut data: Bytes,
        on_header: &mut dyn FnMut(Announced<'_>) -> Result<()>,
    ) -> Result<()> {
        while data.has_remaining() {
            match self.state {
                State::Prefix => {
                    if !self.gather(&mut data, 5) {
                        return Ok(());
                    }
                    let mut prefix = self.pending.split().freeze();
                    if prefix.get_u8() != 0 {
                        return Err(Error::invalid_argument(
                            "compressed tensor messages are not supported",
                        ));
                    }
                    let len = prefix.get_u32() as usize;
                    self.state = match &self.started {
                        None if len > self.max_header_bytes => {
                            return Err(Error::invalid_argument(format!(
                                "the first message of a tensor stream is {len} bytes; \
                                 it must hold only the header"
                            )));
                        }
                        None => State::Header(len),
                        Some(_) => State::ChunkField(len),
                    };
                    if len == 0 {
                        self.finish_empty_message(on_header)?;
                    }
                }
                State::Header(len) => {
                    if !self.gather(&mut data, len) {
                        return Ok(());
                    }
                    let message = proto::TensorChunk::decode(self.pending.split().freeze())?;
                    self.start(message, on_header)?;
                    self.state = State::Prefix;
                }
                State::ChunkField(len) => {
                    // The field key and a length varint: at most 1 + 10 bytes.
                    let want = (self.pending.len() + 1).min(len);
                    if !self.gather(&mut data, want) {
                        return Ok(());
                    }
                    let mut field = &self.pending[..];
                    let parsed = prost::encoding::decode_key(&mut field)
                        .and_then(|key| Ok((key, prost::encoding::decode_varint(&mut field)?)));
                    match parsed {
                        Ok(((2, prost::encoding::WireType::LengthDelimited), slice_len)) => {
                            let used = self.pending.len() - field.len();
                            // A forged length may be near u64::MAX: compare without overflow.
                            if (used as u64).checked_add(slice_len) != Some(len as u64) {
                                return Err(Error::invalid_argument(
                                    "a chunk message must hold exactly one data field",
                                ));
                            }
                            self.pending.clear();
                            self.state = State::Payload(slice_len as usize);
                        }
                        Ok(_) => {
                            return Err(Error::invalid_argument(
                                "only the first message of a tensor stream may carry a header",
                            ));
                        }
                        Err(_) if self.pending.len() < len && self.pending.len() < 11 => {}
                        Err(error) => return Err(error.into()),
                    }
                }
                State::Payload(left) => {
                    let take = left.min(data.len());
                    let started = self.started.as_mut().expect("payload follows the header");
                    let end = started.filled + take;
                    let buffer = started.tensor.data.as_mut_slice();
                    if end > buffer.len() {
                        return Err(Error::invalid_argument(format!(
                            "{} carries more than the {} bytes its header announced",
                            started.key,
                            buffer.len()
                        )));
                    }
                    buffer[started.filled..end].copy_from_slice(&data[..take]);
                    started.filled = end;
                    data.advance(take);
                    self.state = if take == left {
                        State::Prefix
                    } else {
                        State::Payload(left - take)
                    };
                }
            }
        }
        Ok(())
    }

    /// Moves bytes from `data` into `pending` until it holds `want`; whether it does.
    fn gather(&mut self, data: &mut Bytes, want: usize) -> bool {
        let take = want.saturating_sub(self.pending.len()).min(data.len());
        self.pending.extend_from_slice(&data[..take]);
        data.advance(take);
        self.pending.len() >= want
    }

    fn finish_empty_message(
        &mut self,
        on_header: &mut dyn FnMut(Announced<'_>) -> Result<()>,
    ) -> Result<()> {
        if self.started.is_none() {
            self.start(proto::TensorChunk::default(), on_header)?;
        }
        self.state = State::Prefix;
        Ok(())
    }

    fn start(
        &mut self,
        message: proto::TensorChunk,
        on_header: &mut dyn FnMut(Announced<'_>) -> Result<()>,
    ) -> Result<()> {
        let header = message
            .header
            .ok_or_else(|| Error::invalid_argument("a tensor stream must begin with a header"))?;
        let (key, meta) = parse_header(&header)?;
        on_header(Announced {
            key: &key,
            meta: &meta,
        })?;
        let total = usize::try_from(header.total_bytes)
            .map_err(|_| Error::resource_exhausted("tensor too large for this machine"))?;
        let mut tensor = Tensor {
            meta,
            data: TensorBuf::new(total),
        };
        let filled = message.data.len().min(total);
        if message.data.len() > total {
            return Err(Error::invalid_argument(format!(
                "{key} carries more than the {total} bytes its header announced"
            )));
        }
        tensor.data.as_mut_slice()[..filled].copy_from_slice(&message.data);
        self.started = Some(Started {
            key,
            tensor,
            filled,
        });
        Ok(())
    }

    /// Ends the stream: the tensor if it arrived whole, `DataLoss` if it was cut short.
    pub fn finish(self) -> Result<(TensorKey, Tensor)> {
        let Some(started) = self.started else {
            return Err(Error::invalid_argument("the tensor stream was empty"));
        };
        let complete = matches!(self.state, State::Prefix) && self.pending.is_empty();
        if !complete || started.filled != started.tensor.data.len() {
            return Err(Error::data_loss(format!(
                "{} ended after {} of {} bytes",
                started.key,
                started.filled,
                started.tensor.data.len()
            )));
        }
        Ok((started.key, started.tensor))
    }
}

#[cfg(test)]
mod tests {
    use super::super::framing::{frame_message, split_frames, tensor_frames};
    use super::super::messages::header;
    use super::*;
    use crate::base::cluster::TaskId;
    use crate::base::errors::Code;
    use crate::proto::DataType;

    fn key() -> TensorKey {
        TensorKey {
            source: TaskId::new("w", 1),
            name: "x".into(),
        }
    }

    fn frames_for(payload: &[u8], chunk: usize) -> (TensorMeta, Vec<Bytes>) {
        let meta = TensorMeta::new(
            DataType::DtUint8 as i32,
            vec![payload.len() as u64],
            payload.len() as u64,
        )
        .unwrap();
        let frames = tensor_frames(
            &header(&key(), &meta),
            Bytes::copy_from_slice(payload),
            chunk,
        );
        (meta, frames)
    }

    fn parse(stream: &[u8], split: usize) -> Result<(TensorKey, Tensor)> {
        let mut parser = ChunkParser::new(1 << 16);
        for piece in stream.chunks(split.max(1)) {
            parser.feed(Bytes::copy_from_slice(piece), &mut |_| Ok(()))?;
        }
        parser.finish()
    }

    #[test]
    fn stream_parses_whatever_the_frame_boundaries() {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let (meta, frames) = frames_for(&payload, 300);
        assert_eq!(frames.len(), 1, "a small tensor travels as one frame");
        let stream: Vec<u8> = frames.concat();
        for split in [1, 2, 3, 5, 7, 64, 301, stream.len()] {
            let (got_key, tensor) = parse(&stream, split).unwrap();
            assert_eq!(got_key, key());
            assert_eq!(tensor.meta, meta);
            assert_eq!(tensor.data.as_slice(), &payload[..], "split {split}");
        }
    }

    #[test]
    fn prost_encoded_chunks_parse_too() {
        // What a stock client sends: prost/protobuf encoding of each TensorChunk.
        let payload = vec![9u8; 40];
        let (meta, _) = frames_for(&payload, 16);
        let mut stream = frame_message(&proto::TensorChunk {
            header: Some(header(&key(), &meta)),
            data: Bytes::new(),
        })
        .to_vec();
        for piece in payload.chunks(16) {
            stream.extend_from_slice(&frame_message(&proto::TensorChunk {
                header: None,
                data: Bytes::copy_from_slice(piece),
            }));
        }
        let (_, tensor) = parse(&stream, 3).unwrap();
        assert_eq!(tensor.data.as_slice(), &payload[..]);
    }

    #[test]
    fn truncated_and_oversized_streams_are_refused() {
        let payload = vec![1u8; 100];
        let (meta, _) = frames_for(&payload, 10);
        let frames = split_frames(&header(&key(), &meta), Bytes::from(payload), 10);
        let stream: Vec<u8> = frames.concat();
        let cut = parse(&stream[..stream.len() - 3], 4).err().unwrap();
        assert_eq!(cut.code, Code::DataLoss);
        let mut longer = stream.clone();
        longer.extend_from_slice(&frames[1]);
        longer.extend_from_slice(&frames[2]);
        let over = parse(&longer, 4).err().unwrap();
        assert_eq!(over.code, Code::InvalidArgument);
        assert!(parse(&[], 1).is_err());
    }

    #[test]
    fn a_chunk_length_near_u64_max_is_refused() {
        let payload = vec![1u8; 4];
        let (meta, _) = frames_for(&payload, 4);
        let mut stream = frame_message(&proto::TensorChunk {
            header: Some(header(&key(), &meta)),
            data: Bytes::new(),
        })
        .to_vec();
        // A chunk message of 11 bytes: the data field's key, then a varint of u64::MAX.
        stream.extend_from_slice(&[0, 0, 0, 0, 11, 0x12]);
        stream.extend_from_slice(&[0xff; 9]);
        stream.push(0x01);
        let refused = parse(&stream, 3).err().unwrap();
        assert_eq!(refused.code, Code::InvalidArgument);
    }
}
