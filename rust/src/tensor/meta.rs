//! What a tensor is apart from its bytes: TensorFlow's dtype numbers, shape, and the key a
//! tensor is sent under.

use super::TensorBuf;
use crate::base::cluster::TaskId;
use crate::base::errors::{Error, Result};
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

/// Most dimensions a tensor may have (numpy's own limit): a header's shape is checked before
/// anything is sized from it.
pub const MAX_RANK: usize = 64;

/// Longest tensor name accepted, from a peer or a caller: room for the names of a collective of
/// a thousand members, while a peer's names cannot grow the inbox by megabytes apiece.
pub const MAX_NAME_BYTES: usize = 32 << 10;

/// `name`, if it is short enough to be a tensor's name.
pub fn check_name(name: &str) -> Result<()> {
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::invalid_argument(format!(
            "a tensor name of {} bytes is longer than the {MAX_NAME_BYTES} allowed",
            name.len()
        )));
    }
    Ok(())
}

/// The names of collectives' messages begin so; messages show them as what they are, not by
/// name.
pub const COLLECTIVE_NAMES: &str = "/distsrv/collective/";

/// A tensor's name as messages show it: quoted, or, for a collective's message, as such.
pub fn shown_name(name: &str) -> String {
    if name.starts_with(COLLECTIVE_NAMES) {
        "a collective's message".to_owned()
    } else {
        format!("tensor {name:?}")
    }
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
        if shape.len() > MAX_RANK {
            return Err(Error::invalid_argument(format!(
                "a tensor of rank {} has more than the {MAX_RANK} dimensions allowed",
                shape.len()
            )));
        }
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

/// numpy's name of `dtype` ("float32"), as messages to users spell it.
pub fn dtype_name(dtype: DataType) -> &'static str {
    use DataType::*;
    match dtype {
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
    }
}

impl std::fmt::Display for TensorMeta {
    /// numpy's spelling: "float32 (2, 3)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = dtype_name(self.dtype);
        let dims: Vec<_> = self.shape.iter().map(u64::to_string).collect();
        let trailing = if dims.len() == 1 { "," } else { "" };
        write!(f, "{dtype} ({}{trailing})", dims.join(", "))
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
        write!(f, "{} from {}", shown_name(&self.name), self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_and_high_ranks_are_refused() {
        assert!(check_name(&"n".repeat(MAX_NAME_BYTES)).is_ok());
        assert!(check_name(&"n".repeat(MAX_NAME_BYTES + 1)).is_err());
        let dtype = DataType::DtFloat as i32;
        assert!(TensorMeta::checked(dtype, vec![1; MAX_RANK]).is_ok());
        assert!(TensorMeta::checked(dtype, vec![1; MAX_RANK + 1]).is_err());
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
}
