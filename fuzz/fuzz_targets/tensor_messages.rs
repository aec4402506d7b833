//! The tensor messages a peer sends whole: a framed tensor-stream message as a call by hand
//! gathers it (split where the input says), and TensorFlow's TensorProto as variables and remote
//! operations carry it. Each is refused or yields a tensor whose bytes agree with its shape.
#![no_main]

use distsrv::proto;
use distsrv::wire::{Assembler, from_tensor_proto, parse_header};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// The one message of `framed`, fed in two pieces split at its first byte's value.
fn assemble(framed: &[u8]) -> Option<bytes::Bytes> {
    let split = usize::from(*framed.first()?).min(framed.len());
    let mut assembler = Assembler::new(1 << 20);
    assembler.feed(&framed[..split]).ok()?;
    assembler.feed(&framed[split..]).ok()?;
    Some(assembler.finish().ok()??.bytes())
}

fuzz_target!(|input: &[u8]| {
    if let Some(message) = assemble(input)
        && let Ok(chunk) = proto::TensorChunk::decode(message)
        && let Some(header) = chunk.header
        && let Ok((_, meta)) = parse_header(&header)
    {
        assert_eq!(meta.byte_len(), Some(header.total_bytes));
    }
    if let Ok(tensor) = proto::TensorProto::decode(input)
        && let Ok((meta, data)) = from_tensor_proto(tensor)
    {
        assert_eq!(meta.byte_len(), Some(data.len() as u64));
    }
});
