//! Python values to and from [`proto::Value`], the encoding of remote operations' arguments and
//! results: None, bool, int (64-bit), float, str, bytes, list, dict with str keys, numpy arrays.
//!
//! Encoding refuses anything else with TypeError before a byte is sent; decoding refuses a
//! malformed value with InvalidArgumentError. Neither runs code the value names.

use bytes::Bytes;
use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType,
};

use super::errors::to_py;
use super::tensor::{HeldBuffer, NDARRAY, array_in, array_out};
use crate::base::errors::Error;
use crate::ops::remote::Returned;
use crate::proto::{self, value::Kind};
use crate::tensor::buf::Arrived;
use crate::tensor::{Tensor, TensorBuf};
use crate::wire;

/// How deeply lists and dicts may nest: as deep as a receiver decodes (protobuf decoders stop at
/// 100 nested messages and each level takes two). It also ends a self-containing list.
const MAX_DEPTH: usize = wire::values::MAX_VALUE_DEPTH;

static NUMPY_SCALAR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Where an encoded array's bytes are.
enum Arrays {
    /// Copied out: a handler's result outlives the Python call that made it.
    Copied,
    /// Still the caller's arrays, held until the call that carries them is over.
    Lent(Vec<HeldBuffer>),
}

/// Keyword arguments as the wire carries them, and the arrays among them, whose memory the
/// encoding borrows: release them once the call is over.
pub fn encode_kwargs(
    kwargs: &Bound<'_, PyDict>,
) -> PyResult<(Vec<proto::DictEntry>, Vec<HeldBuffer>)> {
    let mut arrays = Arrays::Lent(Vec::new());
    let entries = encode_entries(kwargs, 0, &mut arrays)?;
    let Arrays::Lent(held) = arrays else {
        unreachable!("lent above")
    };
    Ok((entries, held))
}

/// A value that owns all of its bytes.
pub fn encode(value: &Bound<'_, PyAny>) -> PyResult<proto::Value> {
    encode_at(value, 0, &mut Arrays::Copied)
}

fn encode_at(
    value: &Bound<'_, PyAny>,
    depth: usize,
    arrays: &mut Arrays,
) -> PyResult<proto::Value> {
    let kind = if value.is_none() {
        Kind::NullValue(proto::NullValue::NullValue as i32)
    } else if let Ok(flag) = value.cast::<PyBool>() {
        Kind::BoolValue(flag.is_true())
    } else if let Ok(int) = value.cast::<PyInt>() {
        Kind::IntValue(int.extract().map_err(|_| {
            PyTypeError::new_err(format!("{int} does not fit in 64 bits, as an int must"))
        })?)
    } else if let Ok(float) = value.cast::<PyFloat>() {
        Kind::FloatValue(float.value())
    } else if let Ok(text) = value.cast::<PyString>() {
        Kind::StringValue(text.to_str()?.to_owned())
    } else if let Ok(data) = value.cast::<PyBytes>() {
        Kind::BytesValue(Bytes::copy_from_slice(data.as_bytes()))
    } else if let Ok(data) = value.cast::<PyByteArray>() {
        Kind::BytesValue(Bytes::from(data.to_vec()))
    } else if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        let depth = deeper(depth)?;
        let items = value
            .try_iter()?
            .map(|item| encode_at(&item?, depth, arrays))
            .collect::<PyResult<_>>()?;
        Kind::ListValue(proto::ListValue { items })
    } else if let Ok(dict) = value.cast::<PyDict>() {
        let entries = encode_entries(dict, deeper(depth)?, arrays)?;
        Kind::DictValue(proto::DictValue { entries })
    } else if is_array(value)? {
        Kind::TensorValue(encode_array(value, arrays)?)
    } else {
        return Err(PyTypeError::new_err(format!(
            "cannot encode a {} for a remote operation: values are None, bool, int, float, str, \
             bytes, list, tuple, dict with str keys and numpy arrays",
            value.get_type().name()?
        )));
    };
    Ok(proto::Value { kind: Some(kind) })
}

fn encode_entries(
    dict: &Bound<'_, PyDict>,
    depth: usize,
    arrays: &mut Arrays,
) -> PyResult<Vec<proto::DictEntry>> {
    dict.iter()
        .map(|(key, value)| {
            let key = key.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "dict keys must be str, not {}",
                    key.get_type()
                        .name()
                        .map_or_else(|_| "?".into(), |n| n.to_string())
                ))
            })?;
            Ok(proto::DictEntry {
                key: key.to_str()?.to_owned(),
                value: Some(encode_at(&value, depth, arrays)?),
            })
        })
        .collect()
}

fn deeper(depth: usize) -> PyResult<usize> {
    if depth >= MAX_DEPTH {
        return Err(PyTypeError::new_err(format!(
            "cannot encode lists and dicts nested more than {MAX_DEPTH} deep"
        )));
    }
    Ok(depth + 1)
}

/// A numpy array or scalar, or another framework's tensor (torch, JAX: anything with DLPack),
/// which travels as the array `distsrv.interop` reads it as.
fn is_array(value: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = value.py();
    Ok(value.is_instance(NDARRAY.import(py, "numpy", "ndarray")?)?
        || value.is_instance(NUMPY_SCALAR.import(py, "numpy", "generic")?)?
        || value.hasattr(intern!(py, "__dlpack__"))?)
}

/// An array (or numpy scalar, which becomes a 0-d array; `numpy.float64` is a float already) as
/// the exchange lays it out: dtype code, shape, C-order bytes.
fn encode_array(array: &Bound<'_, PyAny>, arrays: &mut Arrays) -> PyResult<proto::TensorProto> {
    let (meta, hold, bytes) = array_in(array)?;
    let data = match arrays {
        Arrays::Lent(held) => {
            held.push(hold);
            bytes
        }
        Arrays::Copied => {
            // A large array lands in a recycled buffer, whose pages exist already.
            let data = Bytes::from_owner(TensorBuf::from_slice(&bytes));
            drop(bytes);
            hold.release(array.py());
            data
        }
    };
    Ok(wire::tensor_proto(&meta, data))
}

/// `value` as the bytes of one encoded [`proto::Value`], as objects travel in tensors.
pub fn to_bytes(value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    Ok(prost::Message::encode_to_vec(&encode(value)?))
}

/// The value [`to_bytes`] encoded; InvalidArgumentError if `encoded` is not one or passes the
/// values limits.
pub fn from_bytes<'py>(py: Python<'py>, encoded: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let value = wire::values::decode_checked::<proto::Value>(Bytes::copy_from_slice(encoded))
        .map_err(to_py)?;
    decode(py, value, None)
}

/// A call's result, its large arrays left where they arrived.
pub fn decode_returned(py: Python<'_>, returned: Returned) -> PyResult<Bound<'_, PyAny>> {
    decode(py, returned.value, returned.arrived.as_ref())
}

/// `value`, its large arrays left in `arrived` (the buffer it arrived in), where given.
fn decode<'py>(
    py: Python<'py>,
    value: proto::Value,
    arrived: Option<&Arrived>,
) -> PyResult<Bound<'py, PyAny>> {
    let Some(kind) = value.kind else {
        return Err(malformed("a Value with no kind set"));
    };
    Ok(match kind {
        Kind::NullValue(_) => py.None().into_bound(py),
        Kind::BoolValue(flag) => PyBool::new(py, flag).to_owned().into_any(),
        Kind::IntValue(int) => int.into_pyobject(py)?.into_any(),
        Kind::FloatValue(float) => PyFloat::new(py, float).into_any(),
        Kind::StringValue(text) => PyString::new(py, &text).into_any(),
        Kind::BytesValue(data) => PyBytes::new(py, &data).into_any(),
        Kind::ListValue(list) => {
            let items = list
                .items
                .into_iter()
                .map(|item| decode(py, item, arrived))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Kind::DictValue(dict) => decode_entries(py, dict.entries, arrived)?.into_any(),
        Kind::TensorValue(tensor) => decode_array(py, tensor, arrived)?,
    })
}

/// A dict (keyword arguments too) from its entries, as [`decode`] makes values.
pub fn decode_entries<'py>(
    py: Python<'py>,
    entries: Vec<proto::DictEntry>,
    arrived: Option<&Arrived>,
) -> PyResult<Bound<'py, PyDict>> {
    let count = entries.len();
    let dict = PyDict::new(py);
    for entry in entries {
        let value = entry
            .value
            .ok_or_else(|| malformed(&format!("entry {:?} has no value", entry.key)))?;
        dict.set_item(entry.key, decode(py, value, arrived)?)?;
    }
    if dict.len() != count {
        return Err(malformed("a dict with a repeated key"));
    }
    Ok(dict)
}

fn decode_array<'py>(
    py: Python<'py>,
    tensor: proto::TensorProto,
    arrived: Option<&Arrived>,
) -> PyResult<Bound<'py, PyAny>> {
    let (meta, data) = wire::from_tensor_proto(tensor).map_err(to_py)?;
    // A small array is copied, so that it does not keep a large message's buffer alive.
    let data = match arrived {
        Some(arrived) if data.len() >= wire::IN_PLACE_BYTES => arrived
            .tensor(data)
            .unwrap_or_else(|data| TensorBuf::from_slice(&data)),
        _ => TensorBuf::from_slice(&data),
    };
    array_out(py, Tensor { meta, data })
}

fn malformed(what: &str) -> PyErr {
    to_py(Error::invalid_argument(format!("malformed value: {what}")))
}
