//! A remote operation's arguments and result as a peer sends them: the limits check never
//! panics, and what it admits decodes within the limits (what prost decodes never holds more
//! than the encoded bytes spelled out).
#![no_main]

use distsrv::proto::{self, value::Kind};
use distsrv::wire::values::{MAX_VALUE_DEPTH, MAX_VALUE_ITEMS, decode_checked};
use libfuzzer_sys::fuzz_target;

/// Values and entries in `value`, and its depth (1 for a leaf).
fn measure(value: &proto::Value) -> (usize, usize) {
    match &value.kind {
        Some(Kind::ListValue(list)) => list.items.iter().map(measure).fold((1, 1), deeper),
        Some(Kind::DictValue(dict)) => measure_entries(&dict.entries),
        _ => (1, 1),
    }
}

fn measure_entries(entries: &[proto::DictEntry]) -> (usize, usize) {
    entries
        .iter()
        .map(|entry| {
            let (items, depth) = entry.value.as_ref().map_or((0, 0), measure);
            (items + 1, depth)
        })
        .fold((1, 1), deeper)
}

fn deeper((items, depth): (usize, usize), (more, inner): (usize, usize)) -> (usize, usize) {
    (items + more, depth.max(inner + 1))
}

fn within((items, depth): (usize, usize)) {
    assert!(items <= MAX_VALUE_ITEMS, "{items} items admitted");
    assert!(depth <= MAX_VALUE_DEPTH + 1, "{depth} deep admitted");
}

fuzz_target!(|input: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(input);
    if let Ok(request) = decode_checked::<proto::CallRequest>(bytes.clone()) {
        let (items, depth) = measure_entries(&request.kwargs.unwrap_or_default().entries);
        // The kwargs dictionary itself is no value.
        within((items - 1, depth.saturating_sub(1)));
    }
    if let Ok(response) = decode_checked::<proto::CallResponse>(bytes)
        && let Some(result) = &response.result
    {
        within(measure(result));
    }
});
