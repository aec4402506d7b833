//! Casts between dtypes as numpy's `astype` does, where numpy's `same_kind` rule allows them:
//! within a kind (float64 to float32, int64 to int8) or up the order bool, unsigned, signed,
//! floating, complex; never down it (no float to int, no complex to float). Integers wrap,
//! floats round to nearest.

use bytemuck::Pod;
use half::{bf16, f16};

use super::{TensorBuf, dtype_name, itemsize};
use crate::base::errors::{Error, Result};
use crate::proto::DataType;

/// An element on its way from one dtype to another.
#[derive(Clone, Copy)]
enum Scalar {
    Unsigned(u64),
    Signed(i64),
    Real(f64),
    Complex(f64, f64),
}

/// A dtype's place in numpy's order of kinds; None for those that are not numbers.
fn kind(dtype: DataType) -> Option<u8> {
    use DataType::*;
    Some(match dtype {
        DtBool => 0,
        DtUint8 | DtUint16 | DtUint32 | DtUint64 => 1,
        DtInt8 | DtInt16 | DtInt32 | DtInt64 => 2,
        DtHalf | DtBfloat16 | DtFloat | DtDouble => 3,
        DtComplex64 | DtComplex128 => 4,
        _ => return None,
    })
}

/// Whether numpy's `can_cast(from, to, "same_kind")` holds.
pub fn same_kind(from: DataType, to: DataType) -> bool {
    matches!((kind(from), kind(to)), (Some(from), Some(to)) if to >= from)
}

/// `data`, elements of `from`, as elements of `to`; `InvalidArgument` where the same_kind rule
/// refuses the cast.
pub fn cast(from: DataType, data: &[u8], to: DataType) -> Result<TensorBuf> {
    if !same_kind(from, to) {
        return Err(Error::invalid_argument(format!(
            "cannot cast {} to {} (numpy's same_kind rule)",
            dtype_name(from),
            dtype_name(to)
        )));
    }
    let size = |dtype| itemsize(dtype).expect("a number's size");
    let (size_in, size_out) = (size(from), size(to));
    let mut out = TensorBuf::new(data.len() / size_in * size_out);
    for (element, slot) in data
        .chunks_exact(size_in)
        .zip(out.as_mut_slice().chunks_exact_mut(size_out))
    {
        write(to, read(from, element), slot);
    }
    Ok(out)
}

fn load<T: Pod>(bytes: &[u8]) -> T {
    bytemuck::pod_read_unaligned(bytes)
}

fn read(dtype: DataType, bytes: &[u8]) -> Scalar {
    use DataType::*;
    use Scalar::*;
    match dtype {
        DtBool => Unsigned(u64::from(bytes[0] != 0)),
        DtUint8 => Unsigned(u64::from(bytes[0])),
        DtUint16 => Unsigned(u64::from(load::<u16>(bytes))),
        DtUint32 => Unsigned(u64::from(load::<u32>(bytes))),
        DtUint64 => Unsigned(load::<u64>(bytes)),
        DtInt8 => Signed(i64::from(load::<i8>(bytes))),
        DtInt16 => Signed(i64::from(load::<i16>(bytes))),
        DtInt32 => Signed(i64::from(load::<i32>(bytes))),
        DtInt64 => Signed(load::<i64>(bytes)),
        DtHalf => Real(load::<f16>(bytes).to_f64()),
        DtBfloat16 => Real(load::<bf16>(bytes).to_f64()),
        DtFloat => Real(f64::from(load::<f32>(bytes))),
        DtDouble => Real(load::<f64>(bytes)),
        DtComplex64 => {
            let [re, im] = load::<[f32; 2]>(bytes);
            Complex(f64::from(re), f64::from(im))
        }
        DtComplex128 => {
            let [re, im] = load::<[f64; 2]>(bytes);
            Complex(re, im)
        }
        _ => unreachable!("same_kind refuses {dtype:?}"),
    }
}

fn write(dtype: DataType, value: Scalar, out: &mut [u8]) {
    use DataType::*;
    use Scalar::*;
    fn put<T: Pod>(out: &mut [u8], value: T) {
        out.copy_from_slice(bytemuck::bytes_of(&value));
    }
    // What the same_kind rule lets reach each kind: integers come from bool and integers, reals
    // from those and reals. `as` wraps integers and rounds floats to nearest, as numpy's C casts.
    let integer = || match value {
        Unsigned(u) => u as i64,
        Signed(i) => i,
        Real(_) | Complex(..) => unreachable!("same_kind refuses a float to an integer"),
    };
    let real = || match value {
        Unsigned(u) => u as f64,
        Signed(i) => i as f64,
        Real(r) => r,
        Complex(..) => unreachable!("same_kind refuses a complex to a real"),
    };
    let complex = || match value {
        Complex(re, im) => (re, im),
        _ => (real(), 0.0),
    };
    match dtype {
        DtBool => put(out, u8::from(integer() != 0)),
        DtUint8 => put(out, integer() as u8),
        DtUint16 => put(out, integer() as u16),
        DtUint32 => put(out, integer() as u32),
        DtUint64 => put(out, integer() as u64),
        DtInt8 => put(out, integer() as i8),
        DtInt16 => put(out, integer() as i16),
        DtInt32 => put(out, integer() as i32),
        DtInt64 => put(out, integer()),
        DtHalf => put(out, f16::from_f64(real())),
        DtBfloat16 => put(out, bf16::from_f64(real())),
        DtFloat => put(out, real() as f32),
        DtDouble => put(out, real()),
        DtComplex64 => {
            let (re, im) = complex();
            put(out, [re as f32, im as f32]);
        }
        DtComplex128 => {
            let (re, im) = complex();
            put(out, [re, im]);
        }
        _ => unreachable!("same_kind refuses {dtype:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cast_to<T: Pod>(from: DataType, values: &[impl Pod], to: DataType) -> Vec<T> {
        let out = cast(from, bytemuck::cast_slice(values), to).unwrap();
        bytemuck::cast_slice(out.as_slice()).to_vec()
    }

    #[test]
    fn casts_round_and_wrap_as_numpy_does() {
        use DataType::*;
        let rounded: Vec<f32> = cast_to(DtDouble, &[0.1f64, 1e40, -2.5], DtFloat);
        assert_eq!(rounded, [0.1f32, f32::INFINITY, -2.5]);
        let wrapped: Vec<i8> = cast_to(DtInt64, &[300i64, -129, 5], DtInt8);
        assert_eq!(wrapped, [44, 127, 5]);
        let widened: Vec<f64> = cast_to(DtUint8, &[255u8, 0], DtDouble);
        assert_eq!(widened, [255.0, 0.0]);
        let complex: Vec<[f32; 2]> = cast_to(DtInt32, &[3i32], DtComplex64);
        assert_eq!(complex, [[3.0, 0.0]]);
    }

    #[test]
    fn the_same_kind_rule_refuses_casts_down_the_kinds() {
        use DataType::*;
        assert!(same_kind(DtDouble, DtHalf) && same_kind(DtUint64, DtInt8));
        assert!(same_kind(DtBool, DtComplex128));
        assert!(!same_kind(DtInt8, DtUint64) && !same_kind(DtFloat, DtInt64));
        assert!(!same_kind(DtComplex64, DtDouble) && !same_kind(DtString, DtString));
        let refused = cast(DtFloat, &[0; 4], DtInt32).map(drop).unwrap_err();
        assert!(
            refused.message.contains("float32 to int32"),
            "{}",
            refused.message
        );
    }
}
