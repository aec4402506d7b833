//! Tensors in memory: what a tensor is ([`meta`]), its payload buffers ([`buf`]), the caller's
//! memory a result is written into in place ([`output`]), shared-memory
//! segments a same-host peer writes into ([`segment`]), element-wise reductions ([`reduce`]) and
//! casts ([`cast`]).

pub mod buf;
pub mod cast;
pub mod meta;
pub mod output;
pub mod recycle;
pub mod reduce;
pub mod segment;

pub use buf::TensorBuf;
pub use meta::{
    COLLECTIVE_NAMES, Tensor, TensorKey, TensorMeta, check_name, dtype_name, itemsize, shown_name,
};
pub use output::ResultMemory;

/// The most memory a pool of idle buffers (heap or shared) keeps for reuse.
pub const POOL_BYTES: usize = 1 << 30;
