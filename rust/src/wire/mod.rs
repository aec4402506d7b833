//! How tensors look on the wire: tensors in protobuf messages ([`messages`]), gRPC framing by hand
//! ([`framing`]), the parser of an arriving tensor stream ([`chunks`]), and the limits a remote
//! operation's values are held to before they are decoded ([`values`]).
//!
//! The sender frames the messages by hand so payload slices go to the socket straight from the
//! caller's memory, and the receiver ([`ChunkParser`]) copies each payload byte once, into the
//! tensor's final buffer.

pub mod chunks;
pub mod framing;
pub mod messages;
pub mod values;

pub use chunks::{Announced, ChunkParser};
pub use framing::{
    Assembler, IN_PLACE_BYTES, frame_message, frame_scattered, tensor_chunks, tensor_frames,
};
pub use messages::{described, from_tensor_proto, header, parse_header, tensor_proto};
