//! A remote operation's arguments and result as a peer sends them: the limits check never
//! panics, what it admits decodes within the limits (what prost decodes never holds more than
//! the encoded bytes spelled out), and the arrays of the message that arrived become tensors in
//! place with exactly their bytes, no two over the same byte.
#![no_main]

use distsrv::proto::{self, value::Kind};
use distsrv::tensor::TensorBuf;
use distsrv::tensor::buf::Arrived;
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

/// Makes every array in `value` a tensor where it arrived, checking it holds the array's bytes.
fn take_arrays(value: &proto::Value, arrived: &Arrived, lent: &mut Vec<TensorBuf>) {
    match &value.kind {
        Some(Kind::ListValue(list)) => {
            for item in &list.items {
                take_arrays(item, arrived, lent);
            }
        }
        Some(Kind::DictValue(dict)) => {
            for value in dict.entries.iter().filter_map(|entry| entry.value.as_ref()) {
                take_arrays(value, arrived, lent);
            }
        }
        Some(Kind::TensorValue(tensor)) => {
            let content = tensor.tensor_content.clone();
            if let Ok(mut in_place) = arrived.tensor(content.clone()) {
                assert_eq!(in_place.as_slice(), &content[..]);
                // Written as a handler may write it, each with its own byte: no tensor may see
                // another's.
                in_place.as_mut_slice().fill(lent.len() as u8 + 1);
                lent.push(in_place);
            }
        }
        _ => {}
    }
}

fuzz_target!(|input: &[u8]| {
    let mut buffer = TensorBuf::new(input.len());
    buffer.as_mut_slice().copy_from_slice(input);
    let arrived = Arrived::new(buffer);
    let bytes = arrived.bytes();
    if let Ok(request) = decode_checked::<proto::CallRequest>(bytes.clone()) {
        let mut lent = Vec::new();
        for value in request
            .kwargs
            .iter()
            .flat_map(|k| &k.entries)
            .filter_map(|e| e.value.as_ref())
        {
            take_arrays(value, &arrived, &mut lent);
        }
        for (index, tensor) in lent.iter().enumerate() {
            assert!(
                tensor
                    .as_slice()
                    .iter()
                    .all(|&byte| byte == index as u8 + 1)
            );
        }
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
