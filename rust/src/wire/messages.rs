//! Tensors in protobuf messages: TensorFlow's TensorProto, and the header of a tensor stream.

use bytes::Bytes;

use crate::base::cluster::TaskId;
use crate::base::errors::{Error, Result};
use crate::proto;
use crate::tensor::{TensorKey, TensorMeta, check_name};

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

/// The dtype and shape a TensorProto describes, whatever bytes it holds.
pub fn described(tensor: &proto::TensorProto) -> Result<TensorMeta> {
    let shape = dims(&tensor.tensor_shape.clone().unwrap_or_default())?;
    TensorMeta::checked(tensor.dtype, shape)
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
    check_name(&header.name)?;
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
