//! A remote operation's arguments and result as a peer sends them, held to limits before they
//! are decoded. Two encoded bytes are an empty `Value`, about seventy once decoded: without a
//! limit a 64 MiB call would take gigabytes. So the encoded bytes are walked first, counting
//! values and dictionary entries and their nesting; only then does prost decode them.
//!
//! The same check ([`decode_checked`]) guards every path a call takes: the Worker's `Call`,
//! served and called by hand so that arrays are not copied on the way, and the same-host link.

use bytes::{Buf, Bytes};
use prost::Message;
use prost::encoding::{WireType, decode_key, decode_varint};

use super::framing::frame_scattered;
use crate::base::errors::{Error, Result};
use crate::proto;

/// The Worker's `Call` method.
pub const CALL_PATH: &str = "/distsrv.v1.Worker/Call";
/// The field of `CallRequest` and `CallResponse` that pads their first large array to a boundary.
const PADDING_FIELD: u32 = 15;
/// The deepest nesting of lists and dictionaries in one value (as Python's encoder allows).
pub const MAX_VALUE_DEPTH: usize = 32;
/// Values and dictionary entries in one call's arguments, or in its result.
pub const MAX_VALUE_ITEMS: usize = 1 << 20;

/// The messages of a call whose encoded bytes hold values, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    CallRequest,
    CallResponse,
    Dict,
    Entry,
    List,
    Value,
}

impl Shape {
    /// The shape of field `field` of this message, where that field holds values.
    fn field(self, field: u32) -> Option<Shape> {
        match (self, field) {
            (Shape::CallRequest, 2) | (Shape::Value, 8) => Some(Shape::Dict),
            (Shape::CallResponse, 1) | (Shape::Entry, 2) | (Shape::List, 1) => Some(Shape::Value),
            (Shape::Dict, 1) => Some(Shape::Entry),
            (Shape::Value, 7) => Some(Shape::List),
            _ => None,
        }
    }
}

/// A message of a call: its bytes are checked by [`check`] before prost decodes it.
pub trait CallMessage: Message + Default {
    const SHAPE: Shape;
    /// What the message is, for errors: "the call's arguments".
    const WHAT: &'static str;
}

impl CallMessage for proto::CallRequest {
    const SHAPE: Shape = Shape::CallRequest;
    const WHAT: &'static str = "the call's arguments";
}

impl CallMessage for proto::CallResponse {
    const SHAPE: Shape = Shape::CallResponse;
    const WHAT: &'static str = "the call's result";
}

/// An object sent as a tensor's bytes (`send_object`, `broadcast_object`).
impl CallMessage for proto::Value {
    const SHAPE: Shape = Shape::Value;
    const WHAT: &'static str = "the object's values";
}

/// Refuses `encoded` (an `M`) if it is malformed, nests values deeper than
/// [`MAX_VALUE_DEPTH`] or holds more than [`MAX_VALUE_ITEMS`] values and entries.
pub fn check<M: CallMessage>(encoded: &[u8]) -> Result<()> {
    let mut walk = Walk { items: 0 };
    let mut bytes = encoded;
    walk.message(&mut bytes, M::SHAPE, 0)
        .map_err(|refusal| match refusal {
            Refusal::Malformed(e) => {
                Error::invalid_argument(format!("{} are undecodable: {e}", M::WHAT))
            }
            Refusal::TooDeep => Error::invalid_argument(format!(
                "{} nest lists and dictionaries more than {MAX_VALUE_DEPTH} deep",
                M::WHAT
            )),
            Refusal::TooMany => Error::resource_exhausted(format!(
                "{} hold more than {MAX_VALUE_ITEMS} values and dictionary entries",
                M::WHAT
            )),
        })
}

/// `message` gRPC-framed for sending: its arrays uncopied, the first aligned for the receiver;
/// RESOURCE_EXHAUSTED if it is past `max` bytes (the sender's `max_message_bytes`).
pub fn frame_call<M: CallMessage>(message: &M, max: usize) -> Result<Vec<Bytes>> {
    let len = message.encoded_len();
    if len > max {
        return Err(Error::resource_exhausted(format!(
            "{} are {len} bytes, past the limit of {max} (max_message_bytes)",
            M::WHAT
        )));
    }
    Ok(frame_scattered(message, Some(PADDING_FIELD)))
}

/// `encoded` decoded as an `M` once [`check`] admits it; `bytes` fields stay slices of it.
pub fn decode_checked<M: CallMessage>(encoded: Bytes) -> Result<M> {
    check::<M>(&encoded)?;
    M::decode(encoded)
        .map_err(|e| Error::invalid_argument(format!("{} are undecodable: {e}", M::WHAT)))
}

enum Refusal {
    Malformed(String),
    TooDeep,
    TooMany,
}

impl From<prost::DecodeError> for Refusal {
    fn from(e: prost::DecodeError) -> Self {
        Refusal::Malformed(e.to_string())
    }
}

struct Walk {
    items: usize,
}

impl Walk {
    /// Walks the fields of one message of `shape` (all of `bytes`), `depth` values deep.
    fn message(&mut self, bytes: &mut &[u8], shape: Shape, depth: usize) -> Result<(), Refusal> {
        let depth = match shape {
            Shape::Value => depth + 1,
            _ => depth,
        };
        // The outermost value is 1 deep and a list or dictionary puts its values one deeper,
        // so MAX_VALUE_DEPTH of them nest leaves one more deep.
        if depth > MAX_VALUE_DEPTH + 1 {
            return Err(Refusal::TooDeep);
        }
        if matches!(shape, Shape::Value | Shape::Entry) {
            self.items += 1;
            if self.items > MAX_VALUE_ITEMS {
                return Err(Refusal::TooMany);
            }
        }
        while bytes.has_remaining() {
            let (field, wire_type) = decode_key(bytes)?;
            match wire_type {
                WireType::Varint => {
                    decode_varint(bytes)?;
                }
                WireType::SixtyFourBit => skip(bytes, 8)?,
                WireType::ThirtyTwoBit => skip(bytes, 4)?,
                WireType::LengthDelimited => {
                    let len = decode_varint(bytes)?;
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|&len| len <= bytes.len())
                        .ok_or_else(past_the_end)?;
                    let (inner, rest) = bytes.split_at(len);
                    if let Some(child) = shape.field(field) {
                        self.message(&mut &inner[..], child, depth)?;
                    }
                    *bytes = rest;
                }
                WireType::StartGroup | WireType::EndGroup => {
                    return Err(Refusal::Malformed(
                        "groups are not part of the protocol".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn past_the_end() -> Refusal {
    Refusal::Malformed("a field runs past the message".into())
}

fn skip(bytes: &mut &[u8], len: usize) -> Result<(), Refusal> {
    if bytes.len() < len {
        return Err(past_the_end());
    }
    bytes.advance(len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: Vec<proto::Value>) -> proto::Value {
        proto::Value {
            kind: Some(proto::value::Kind::ListValue(proto::ListValue { items })),
        }
    }

    fn request(value: proto::Value) -> Vec<u8> {
        proto::CallRequest {
            op: "op".into(),
            kwargs: Some(proto::DictValue {
                entries: vec![proto::DictEntry {
                    key: "x".into(),
                    value: Some(value),
                }],
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn nested(depth: usize) -> proto::Value {
        (0..depth).fold(proto::Value::default(), |inner, _| list(vec![inner]))
    }

    #[test]
    fn values_are_admitted_up_to_the_limits_and_refused_past_them() {
        // As deep as Python's encoder makes: MAX_VALUE_DEPTH lists around a leaf.
        let deepest = request(nested(MAX_VALUE_DEPTH));
        assert!(check::<proto::CallRequest>(&deepest).is_ok());
        let decoded = decode_checked::<proto::CallRequest>(deepest.into()).unwrap();
        assert_eq!(decoded.op, "op");
        let refused = check::<proto::CallRequest>(&request(nested(MAX_VALUE_DEPTH + 1)));
        assert_eq!(
            refused.unwrap_err().code,
            crate::base::errors::Code::InvalidArgument
        );

        // Two bytes per empty value: the count is refused, not the size.
        let many = request(list(vec![proto::Value::default(); MAX_VALUE_ITEMS]));
        let refused = check::<proto::CallRequest>(&many).unwrap_err();
        assert_eq!(refused.code, crate::base::errors::Code::ResourceExhausted);
        assert!(
            refused.message.contains("the call's arguments"),
            "{refused:?}"
        );
        let fewer = request(list(vec![proto::Value::default(); MAX_VALUE_ITEMS - 2]));
        assert!(check::<proto::CallRequest>(&fewer).is_ok());

        let result = proto::CallResponse {
            result: Some(nested(MAX_VALUE_DEPTH + 1)),
            ..Default::default()
        };
        let refused = check::<proto::CallResponse>(&result.encode_to_vec()).unwrap_err();
        assert!(refused.message.contains("the call's result"), "{refused:?}");
    }

    #[test]
    fn malformed_bytes_are_refused_as_prost_would() {
        for bytes in [&b"\xff\xff\xff"[..], b"\x12\x05\x0a", b"\x0b", b"\x12\x80"] {
            assert!(check::<proto::CallRequest>(bytes).is_err(), "{bytes:?}");
            assert!(proto::CallRequest::decode(bytes).is_err(), "{bytes:?}");
        }
    }
}
