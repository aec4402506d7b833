//! How tensors look on the wire: TensorFlow's dtype numbers, validated headers, aligned payload
//! buffers, and the gRPC framing of a tensor stream.
//!
//! A tensor travels as a stream of `TensorChunk` messages: the first carries only the
//! [`proto::TensorHeader`], the rest carry consecutive payload slices. The sender frames the
//! messages by hand so payload slices go to the socket straight from the caller's memory, and the
//! receiver ([`ChunkParser`]) copies each payload byte once, into the tensor's final buffer.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

use crate::cluster::TaskId;
use crate::errors::{Error, Result};
use crate::proto::{self, DataType};

/// Bytes per element of a dtype the exchange carries, `None` for the rest (strings, invalid).
pub fn itemsize(dtype: DataType) -> Option<usize> {
    use DataType::*;
    Some(match dtype {
        DtBool | DtInt8 | DtUint8 => 1,
        DtInt16 | DtUint16 | DtHalf | DtBfloat16 => 2,
        DtFloat | DtInt32 | DtUint32 => 4,
        DtDouble | DtInt64 | DtUint64 | DtComplex64 => 8,
        DtComplex128 => 16,
        DtInvalid | DtString => return None,
    })
}

/// What a tensor is, apart from its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: DataType,
    pub shape: Vec<u64>,
}

impl TensorMeta {
    /// A tensor of a dtype the exchange carries, whose byte size fits in 64 bits.
    pub fn checked(dtype: i32, shape: Vec<u64>) -> Result<Self> {
        let dtype = DataType::try_from(dtype)
            .ok()
            .filter(|d| itemsize(*d).is_some())
            .ok_or_else(|| Error::invalid_argument(format!("unsupported dtype code {dtype}")))?;
        let meta = Self { dtype, shape };
        if meta.byte_len().is_none() {
            return Err(Error::invalid_argument(format!(
                "shape {:?} is too large",
                meta.shape
            )));
        }
        Ok(meta)
    }

    /// Also checks that shape and dtype agree with `total_bytes`, so a receiver never sizes a
    /// buffer from inconsistent claims.
    pub fn new(dtype: i32, shape: Vec<u64>, total_bytes: u64) -> Result<Self> {
        let meta = Self::checked(dtype, shape)?;
        let expected = meta.byte_len().unwrap_or(0);
        if expected != total_bytes {
            return Err(Error::invalid_argument(format!(
                "a {:?} tensor of shape {:?} has {expected} bytes, but {total_bytes} were announced",
                meta.dtype, meta.shape
            )));
        }
        Ok(meta)
    }

    /// Bytes of the row-major payload; `None` on overflow.
    pub fn byte_len(&self) -> Option<u64> {
        let item = itemsize(self.dtype)? as u64;
        self.shape.iter().try_fold(item, |n, d| n.checked_mul(*d))
    }

    pub fn shape_proto(&self) -> proto::TensorShapeProto {
        proto::TensorShapeProto {
            dim: self
                .shape
                .iter()
                .map(|size| proto::tensor_shape_proto::Dim {
                    size: *size as i64,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }
    }
}

impl std::fmt::Display for TensorMeta {
    /// numpy's spelling: "float32 (2, 3)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use DataType::*;
        let dtype = match self.dtype {
            DtBool => "bool",
            DtInt8 => "int8",
            DtInt16 => "int16",
            DtInt32 => "int32",
            DtInt64 => "int64",
            DtUint8 => "uint8",
            DtUint16 => "uint16",
            DtUint32 => "uint32",
            DtUint64 => "uint64",
            DtHalf => "float16",
            DtBfloat16 => "bfloat16",
            DtFloat => "float32",
            DtDouble => "float64",
            DtComplex64 => "complex64",
            DtComplex128 => "complex128",
            DtString => "string",
            DtInvalid => "invalid",
        };
        let dims: Vec<_> = self.shape.iter().map(u64::to_string).collect();
        let trailing = if dims.len() == 1 { "," } else { "" };
        write!(f, "{dtype} ({}{trailing})", dims.join(", "))
    }
}

/// A received tensor's payload: owned, writable, 16-byte aligned so that a numpy view of any
/// dtype over it is aligned. Its memory is the process's own, or a shared-memory segment a
/// same-host sender wrote the tensor into (see `shm`), which goes back to its pool when dropped.
pub struct TensorBuf {
    words: Vec<u128>,
    shared: Option<crate::shm::segment::Segment>,
    len: usize,
}

/// Buffers this large are recycled through [`POOL`] and backed by transparent huge pages.
const LARGE_BYTES: usize = 1 << 20;
/// What the pool may keep: enough for a training step's worth of gradients, or every piece of a
/// large collective (64 MiB in 4 MiB pieces is 16 buffers), bounded.
const POOL_BUFFERS: usize = 64;
const POOL_BYTES: usize = 1 << 30;

/// Freed large buffers, kept for the next tensor of about the same size. A fresh buffer costs a
/// page fault and the kernel zeroing every page on first write, a large share of a big
/// transfer; a recycled one has its pages already.
static POOL: std::sync::Mutex<Vec<Vec<u128>>> = std::sync::Mutex::new(Vec::new());

impl TensorBuf {
    /// A buffer of `len` bytes whose contents are unspecified (zero or a previous tensor's) until
    /// the caller overwrites all of it.
    pub fn new(len: usize) -> Self {
        let words = len.div_ceil(16);
        let words = if len >= LARGE_BYTES {
            recycled(words).unwrap_or_else(|| huge_page_backed(words))
        } else {
            vec![0u128; words]
        };
        Self {
            words,
            shared: None,
            len,
        }
    }

    /// A buffer over a shared-memory segment (page-aligned), its length the segment's.
    pub fn shared(segment: crate::shm::segment::Segment) -> Self {
        Self {
            words: Vec::new(),
            len: segment.len(),
            shared: Some(segment),
        }
    }

    /// Whether the bytes live in shared memory.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = Self::new(bytes.len());
        buf.as_mut_slice().copy_from_slice(bytes);
        buf
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.shared {
            Some(segment) => segment.as_slice(),
            None => &bytemuck::cast_slice(&self.words)[..self.len],
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.shared {
            Some(segment) => segment.as_mut_slice(),
            None => &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len],
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for TensorBuf {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.words);
        if words.capacity() * 16 < LARGE_BYTES {
            return;
        }
        if words.capacity() * 16 > POOL_BYTES {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(words);
        // The newest buffers are the likeliest to be needed again: evict from the oldest.
        let mut pooled: usize = pool.iter().map(|w| w.capacity() * 16).sum();
        while pool.len() > POOL_BUFFERS || pooled > POOL_BYTES {
            pooled -= pool.remove(0).capacity() * 16;
        }
    }
}

/// A pooled buffer with room for `words`, wasting at most a quarter of it.
fn recycled(words: usize) -> Option<Vec<u128>> {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let fits = |w: &Vec<u128>| (words..=words + words / 4).contains(&w.capacity());
    let index = pool.iter().position(fits)?;
    let mut buffer = pool.swap_remove(index);
    drop(pool);
    buffer.resize(words, 0);
    Some(buffer)
}

/// Fresh zeroed memory (untouched pages straight from the kernel), asked to be backed by huge
/// pages so that the first write faults once per 2 MiB instead of once per 4 KiB.
fn huge_page_backed(words: usize) -> Vec<u128> {
    let buffer = vec![0u128; words];
    let page = 4096;
    let start = (buffer.as_ptr() as usize).next_multiple_of(page);
    let end = (buffer.as_ptr() as usize + words * 16) / page * page;
    if end > start {
        // SAFETY: advice only, on whole pages inside this allocation; failure changes nothing.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    buffer
}

impl AsRef<[u8]> for TensorBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// A whole tensor held in memory.
pub struct Tensor {
    pub meta: TensorMeta,
    pub data: TensorBuf,
}

/// Who sent a tensor, and under which name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorKey {
    pub source: TaskId,
    pub name: String,
}

impl std::fmt::Display for TensorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tensor {:?} from {}", self.name, self.source)
    }
}

/// A tensor as TensorFlow's TensorProto lays it out (variables, remote-operation values).
pub fn tensor_proto(meta: &TensorMeta, data: Bytes) -> proto::TensorProto {
    proto::TensorProto {
        dtype: meta.dtype as i32,
        tensor_shape: Some(meta.shape_proto()),
        tensor_content: data,
    }
}

/// A tensor's description and bytes, checked to agree.
pub fn from_tensor_proto(tensor: proto::TensorProto) -> Result<(TensorMeta, Bytes)> {
    let shape = dims(&tensor.tensor_shape.unwrap_or_default())?;
    let meta = TensorMeta::new(tensor.dtype, shape, tensor.tensor_content.len() as u64)?;
    Ok((meta, tensor.tensor_content))
}

/// The header message of a tensor stream.
pub fn header(key: &TensorKey, meta: &TensorMeta) -> proto::TensorHeader {
    proto::TensorHeader {
        name: key.name.clone(),
        source: Some(key.source.to_proto()),
        dtype: meta.dtype as i32,
        shape: Some(meta.shape_proto()),
        total_bytes: meta.byte_len().unwrap_or(0),
    }
}

/// Reads key and meta back from a header, validating both.
pub fn parse_header(header: &proto::TensorHeader) -> Result<(TensorKey, TensorMeta)> {
    let source = header
        .source
        .as_ref()
        .ok_or_else(|| Error::invalid_argument("the tensor header names no source task"))?;
    let shape = dims(&header.shape.clone().unwrap_or_default())?;
    let meta = TensorMeta::new(header.dtype, shape, header.total_bytes)?;
    let key = TensorKey {
        source: TaskId::from_proto(source)?,
        name: header.name.clone(),
    };
    Ok((key, meta))
}

/// A shape's dimensions, which must be known and not negative.
fn dims(shape: &proto::TensorShapeProto) -> Result<Vec<u64>> {
    if shape.unknown_rank {
        return Err(Error::invalid_argument("a tensor must have a known rank"));
    }
    shape
        .dim
        .iter()
        .map(|d| {
            u64::try_from(d.size)
                .map_err(|_| Error::invalid_argument(format!("negative dimension {}", d.size)))
        })
        .collect()
}

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

fn split_frames(header: &proto::TensorHeader, payload: Bytes, chunk: usize) -> Vec<Bytes> {
    let chunk = chunk.max(1);
    let first = frame_message(&proto::TensorChunk {
        header: Some(header.clone()),
        data: Bytes::new(),
    });
    let mut frames = Vec::with_capacity(1 + 2 * payload.len().div_ceil(chunk));
    frames.push(first);
    let mut offset = 0;
    while offset < payload.len() {
        let end = (offset + chunk).min(payload.len());
        let slice_len = end - offset;
        let mut prefix = BytesMut::with_capacity(16);
        let field =
            prost::encoding::key_len(2) + prost::encoding::encoded_len_varint(slice_len as u64);
        grpc_prefix(&mut prefix, field + slice_len);
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut prefix);
        prost::encoding::encode_varint(slice_len as u64, &mut prefix);
        frames.push(prefix.freeze());
        frames.push(payload.slice(offset..end));
        offset = end;
    }
    frames
}

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
                            if used as u64 + slice_len != len as u64 {
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
    use super::*;

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
    fn a_framed_message_unframes_and_anything_else_is_refused() {
        let reply = proto::SendTensorResponse {
            received_bytes: 4096,
        };
        let framed = frame_message(&reply);
        let back: proto::SendTensorResponse = unframe_message(&framed).unwrap();
        assert_eq!(back, reply);
        for broken in [&framed[..4], &framed[..framed.len() - 1]] {
            let error = unframe_message::<proto::SendTensorResponse>(broken).unwrap_err();
            assert_eq!(error.code, crate::errors::Code::DataLoss);
        }
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        let error = unframe_message::<proto::SendTensorResponse>(&compressed).unwrap_err();
        assert_eq!(error.code, crate::errors::Code::DataLoss);
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
        assert_eq!(cut.code, crate::errors::Code::DataLoss);
        let mut longer = stream.clone();
        longer.extend_from_slice(&frames[1]);
        longer.extend_from_slice(&frames[2]);
        let over = parse(&longer, 4).err().unwrap();
        assert_eq!(over.code, crate::errors::Code::InvalidArgument);
        assert!(parse(&[], 1).is_err());
    }

    #[test]
    fn headers_that_disagree_with_their_size_are_refused() {
        assert!(TensorMeta::new(DataType::DtFloat as i32, vec![2, 3], 24).is_ok());
        assert!(TensorMeta::new(DataType::DtFloat as i32, vec![2, 3], 23).is_err());
        assert!(TensorMeta::new(DataType::DtString as i32, vec![1], 8).is_err());
        assert!(TensorMeta::new(99, vec![], 0).is_err());
        assert!(TensorMeta::new(DataType::DtDouble as i32, vec![u64::MAX, 2], 0).is_err());
        assert_eq!(
            TensorMeta::new(DataType::DtBool as i32, vec![], 1)
                .unwrap()
                .byte_len(),
            Some(1)
        );
    }

    #[test]
    fn tensor_buffers_are_aligned_and_large_ones_recycled() {
        let buf = TensorBuf::new(33);
        assert_eq!(buf.as_slice().as_ptr() as usize % 16, 0);
        assert_eq!(buf.len(), 33);
        assert_eq!(TensorBuf::from_slice(b"abc").as_slice(), b"abc");

        let large = TensorBuf::from_slice(&vec![7u8; 3 << 20]);
        let address = large.as_slice().as_ptr();
        drop(large);
        let again = TensorBuf::new((3 << 20) - 100);
        assert_eq!(
            again.as_slice().as_ptr(),
            address,
            "a freed buffer of that size is reused"
        );
        assert_eq!(again.len(), (3 << 20) - 100);
    }
}
