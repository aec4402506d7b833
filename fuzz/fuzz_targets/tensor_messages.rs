//! The tensor messages a peer sends whole: a framed tensor-stream message as the pull path
//! (`RecvTensor`) and the same-host link read it, and TensorFlow's TensorProto as variables and
//! remote operations carry it. Each is refused or yields a tensor whose bytes agree with its shape.
#![no_main]

use distsrv::proto;
use distsrv::wire::{from_tensor_proto, parse_header, unframe_message};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|input: &[u8]| {
    if let Ok(chunk) = unframe_message::<proto::TensorChunk>(input)
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
