//! A tensor stream as a peer pushes it (`SendTensor`), cut into frames wherever the input says:
//! the parser must refuse or accept it, never panic, and never accept more or fewer bytes than
//! the header it checked announced.
#![no_main]

use bytes::Bytes;
use distsrv::wire::ChunkParser;
use libfuzzer_sys::fuzz_target;

/// The header bound the server uses for pushes.
const MAX_HEADER_BYTES: usize = 64 << 10;
/// What the fuzzer may make the parser allocate: more would only test the allocator.
const MAX_TENSOR_BYTES: u64 = 1 << 20;

fuzz_target!(|input: &[u8]| {
    // The first byte picks the frame size, the rest is the stream.
    let Some((&split, stream)) = input.split_first() else {
        return;
    };
    let mut parser = ChunkParser::new(MAX_HEADER_BYTES);
    let mut announced = None;
    let mut admit = |header: distsrv::wire::Announced<'_>| {
        let bytes = header.meta.byte_len().unwrap_or(u64::MAX);
        if bytes > MAX_TENSOR_BYTES {
            return Err(distsrv::base::errors::Error::resource_exhausted(
                "too large",
            ));
        }
        announced = Some(bytes);
        Ok(())
    };
    let stream = Bytes::copy_from_slice(stream);
    let frame = usize::from(split).max(1);
    for start in (0..stream.len()).step_by(frame) {
        let end = (start + frame).min(stream.len());
        if parser.feed(stream.slice(start..end), &mut admit).is_err() {
            return;
        }
    }
    if let Ok((_, tensor)) = parser.finish() {
        assert_eq!(Some(tensor.data.len() as u64), announced);
        assert_eq!(tensor.meta.byte_len(), announced);
    }
});
