//! Elementwise reductions over the raw bytes of tensors, for every dtype the exchange carries.
//!
//! Collectives combine a received piece into a buffer they own (`acc op= other`); the owner of a
//! piece computes its final value once and everyone else receives those bytes, which is what
//! makes results bitwise identical across tasks.

use bytemuck::Pod;
use half::{bf16, f16};

use super::meta::dtype_name;
use crate::base::errors::{Error, Result};
use crate::proto::DataType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// A sum divided by the number of contributions once, at the end.
    Mean,
    Max,
    Min,
    Prod,
}

impl ReduceOp {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "sum" => Self::Sum,
            "mean" => Self::Mean,
            "max" => Self::Max,
            "min" => Self::Min,
            "prod" => Self::Prod,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "unknown reduction {name:?}: use sum, mean, max, min or prod"
                )));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sum => "sum",
            Self::Mean => "mean",
            Self::Max => "max",
            Self::Min => "min",
            Self::Prod => "prod",
        }
    }

    /// Refuses what numpy would not do without changing the dtype: arithmetic on booleans, a mean
    /// of integers, an ordering of complex numbers.
    pub fn check(self, dtype: DataType) -> Result<()> {
        use DataType::*;
        let allowed = match dtype {
            DtBool => matches!(self, Self::Max | Self::Min),
            DtInt8 | DtInt16 | DtInt32 | DtInt64 | DtUint8 | DtUint16 | DtUint32 | DtUint64 => {
                self != Self::Mean
            }
            DtComplex64 | DtComplex128 => !matches!(self, Self::Max | Self::Min),
            DtHalf | DtBfloat16 | DtFloat | DtDouble => true,
            DtInvalid | DtString => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::invalid_argument(format!(
                "{} is not defined for {} tensors",
                self.as_str(),
                dtype_name(dtype)
            )))
        }
    }
}

/// `acc[i] = acc[i] op other[i]`; a mean sums here and divides in [`divide`]. `acc` must be
/// aligned for the dtype (tensor buffers are); `other` may be any slice, and one of another
/// length (a peer's forged piece) is refused rather than combined in part.
pub fn combine(op: ReduceOp, dtype: DataType, acc: &mut [u8], other: &[u8]) -> Result<()> {
    use DataType::*;
    if acc.len() != other.len() {
        return Err(Error::invalid_argument(format!(
            "cannot combine {} bytes into {}",
            other.len(),
            acc.len()
        )));
    }
    match dtype {
        DtBool | DtUint8 => combine_as::<u8>(op, acc, other),
        DtInt8 => combine_as::<i8>(op, acc, other),
        DtInt16 => combine_as::<i16>(op, acc, other),
        DtUint16 => combine_as::<u16>(op, acc, other),
        DtInt32 => combine_as::<i32>(op, acc, other),
        DtUint32 => combine_as::<u32>(op, acc, other),
        DtInt64 => combine_as::<i64>(op, acc, other),
        DtUint64 => combine_as::<u64>(op, acc, other),
        DtHalf => combine_as::<f16>(op, acc, other),
        DtBfloat16 => combine_as::<bf16>(op, acc, other),
        DtFloat => combine_as::<f32>(op, acc, other),
        DtDouble => combine_as::<f64>(op, acc, other),
        DtComplex64 => combine_as::<Complex<f32>>(op, acc, other),
        DtComplex128 => combine_as::<Complex<f64>>(op, acc, other),
        DtInvalid | DtString => unreachable!("ReduceOp::check refuses {dtype:?}"),
    }
    Ok(())
}

/// Divides every element by `count`: the last step of a mean, for the dtypes a mean allows.
pub fn divide(dtype: DataType, acc: &mut [u8], count: usize) {
    use DataType::*;
    match dtype {
        DtHalf => divide_as::<f16>(acc, count),
        DtBfloat16 => divide_as::<bf16>(acc, count),
        DtFloat => divide_as::<f32>(acc, count),
        DtDouble => divide_as::<f64>(acc, count),
        DtComplex64 => divide_as::<Complex<f32>>(acc, count),
        DtComplex128 => divide_as::<Complex<f64>>(acc, count),
        _ => unreachable!("ReduceOp::check refuses a mean of {dtype:?}"),
    }
}

/// `acc[i] += scale * other[i]` for floating dtypes (an SGD step is `scale = -learning_rate`);
/// `InvalidArgument` for the rest.
pub fn add_scaled(dtype: DataType, acc: &mut [u8], other: &[u8], scale: f64) -> Result<()> {
    use DataType::*;
    match dtype {
        DtHalf => zip_with(bytemuck::cast_slice_mut(acc), other, |a: f16, b: f16| {
            f16::from_f32(a.to_f32() + scale as f32 * b.to_f32())
        }),
        DtBfloat16 => zip_with(bytemuck::cast_slice_mut(acc), other, |a: bf16, b: bf16| {
            bf16::from_f32(a.to_f32() + scale as f32 * b.to_f32())
        }),
        DtFloat => zip_with(bytemuck::cast_slice_mut(acc), other, |a: f32, b: f32| {
            a + scale as f32 * b
        }),
        DtDouble => zip_with(bytemuck::cast_slice_mut(acc), other, |a: f64, b: f64| {
            a + scale * b
        }),
        _ => {
            return Err(Error::invalid_argument(format!(
                "a scaled update needs a floating dtype, not {}",
                dtype_name(dtype)
            )));
        }
    }
    Ok(())
}

fn combine_as<T: Element>(op: ReduceOp, acc: &mut [u8], other: &[u8]) {
    let acc: &mut [T] = bytemuck::cast_slice_mut(acc);
    // Each operation is its own instance of `zip_with`, so the loops compile without a call per
    // element.
    match op {
        ReduceOp::Sum | ReduceOp::Mean => zip_with(acc, other, T::add),
        ReduceOp::Prod => zip_with(acc, other, T::mul),
        ReduceOp::Max => zip_with(acc, other, T::max),
        ReduceOp::Min => zip_with(acc, other, T::min),
    }
}

fn zip_with<T: Pod>(acc: &mut [T], other: &[u8], f: impl Fn(T, T) -> T) {
    match bytemuck::try_cast_slice::<u8, T>(other) {
        Ok(other) => {
            for (a, b) in acc.iter_mut().zip(other) {
                *a = f(*a, *b);
            }
        }
        // A caller's array need not be aligned; unaligned loads are as fast on x86 and ARM.
        Err(_) => {
            for (a, b) in acc.iter_mut().zip(other.chunks_exact(size_of::<T>())) {
                *a = f(*a, bytemuck::pod_read_unaligned(b));
            }
        }
    }
}

fn divide_as<T: Element>(acc: &mut [u8], count: usize) {
    for a in bytemuck::cast_slice_mut::<u8, T>(acc) {
        *a = a.div(count);
    }
}

/// What a reduction needs of an element type. Integers wrap like numpy's; floating max and min
/// propagate NaN like numpy's `maximum`/`minimum`.
trait Element: Pod {
    fn add(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    fn div(self, count: usize) -> Self;
}

macro_rules! integer_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn add(self, other: Self) -> Self { self.wrapping_add(other) }
            fn mul(self, other: Self) -> Self { self.wrapping_mul(other) }
            fn max(self, other: Self) -> Self { Ord::max(self, other) }
            fn min(self, other: Self) -> Self { Ord::min(self, other) }
            fn div(self, _: usize) -> Self { unreachable!("ReduceOp::check refuses a mean of integers") }
        }
    )*};
}
integer_element!(u8, i8, i16, u16, i32, u32, i64, u64);

macro_rules! float_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn add(self, other: Self) -> Self { self + other }
            fn mul(self, other: Self) -> Self { self * other }
            fn max(self, other: Self) -> Self { if self.is_nan() || self > other { self } else { other } }
            fn min(self, other: Self) -> Self { if self.is_nan() || self < other { self } else { other } }
            fn div(self, count: usize) -> Self { self / count as $t }
        }
    )*};
}
float_element!(f32, f64);

/// Half-precision floats compute in f32 and round once per operation, as numpy does.
macro_rules! half_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn add(self, other: Self) -> Self { <$t>::from_f32(self.to_f32() + other.to_f32()) }
            fn mul(self, other: Self) -> Self { <$t>::from_f32(self.to_f32() * other.to_f32()) }
            fn max(self, other: Self) -> Self { if self.is_nan() || self > other { self } else { other } }
            fn min(self, other: Self) -> Self { if self.is_nan() || self < other { self } else { other } }
            fn div(self, count: usize) -> Self { <$t>::from_f32(self.to_f32() / count as f32) }
        }
    )*};
}
half_element!(f16, bf16);

/// numpy's complex64 and complex128: a real and an imaginary part.
#[derive(Clone, Copy)]
#[repr(C)]
struct Complex<F> {
    re: F,
    im: F,
}

// SAFETY: two fields of one plain float type under repr(C): no padding, every bit pattern valid.
unsafe impl<F: Pod> bytemuck::Zeroable for Complex<F> {}
// SAFETY: as above.
unsafe impl<F: Pod> Pod for Complex<F> {}

macro_rules! complex_element {
    ($($t:ty),*) => {$(
        impl Element for Complex<$t> {
            fn add(self, other: Self) -> Self { Self { re: self.re + other.re, im: self.im + other.im } }
            fn mul(self, other: Self) -> Self {
                Self {
                    re: self.re * other.re - self.im * other.im,
                    im: self.re * other.im + self.im * other.re,
                }
            }
            fn max(self, _: Self) -> Self { unreachable!("ReduceOp::check refuses ordering complex numbers") }
            fn min(self, _: Self) -> Self { unreachable!("ReduceOp::check refuses ordering complex numbers") }
            fn div(self, count: usize) -> Self { Self { re: self.re / count as $t, im: self.im / count as $t } }
        }
    )*};
}
complex_element!(f32, f64);

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Pod>(values: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(values).to_vec()
    }

    fn combined<T: Pod>(op: ReduceOp, dtype: DataType, a: &[T], b: &[T]) -> Vec<T> {
        let mut acc = crate::tensor::TensorBuf::from_slice(&bytes_of(a));
        combine(op, dtype, acc.as_mut_slice(), &bytes_of(b)).unwrap();
        bytemuck::cast_slice(acc.as_slice()).to_vec()
    }

    #[test]
    fn floats_reduce_like_numpy() {
        let (a, b) = ([1.0f32, -2.0, f32::NAN, 4.0], [3.0f32, 5.0, 1.0, f32::NAN]);
        assert_eq!(
            combined(ReduceOp::Sum, DataType::DtFloat, &a[..2], &b[..2]),
            [4.0, 3.0]
        );
        let max = combined(ReduceOp::Max, DataType::DtFloat, &a, &b);
        assert_eq!(&max[..2], [3.0, 5.0]);
        assert!(
            max[2].is_nan() && max[3].is_nan(),
            "NaN propagates: {max:?}"
        );
        let mut mean = crate::tensor::TensorBuf::from_slice(&bytes_of(&[3.0f64, 5.0]));
        divide(DataType::DtDouble, mean.as_mut_slice(), 2);
        assert_eq!(bytemuck::cast_slice::<u8, f64>(mean.as_slice()), [1.5, 2.5]);
    }

    #[test]
    fn integers_wrap_and_complex_multiplies() {
        assert_eq!(
            combined(ReduceOp::Sum, DataType::DtInt8, &[127i8, -3], &[1, 2]),
            [-128, -1]
        );
        let product = combined(
            ReduceOp::Prod,
            DataType::DtComplex64,
            &[1.0f32, 2.0],
            &[3.0f32, 4.0],
        );
        assert_eq!(product, [-5.0, 10.0], "(1+2i)(3+4i) = -5+10i");
        let halves = combined(
            ReduceOp::Sum,
            DataType::DtHalf,
            &[f16::from_f32(1.5)],
            &[f16::from_f32(2.25)],
        );
        assert_eq!(halves[0].to_f32(), 3.75);
    }

    #[test]
    fn operands_of_different_lengths_are_refused_whole() {
        let mut acc = crate::tensor::TensorBuf::from_slice(&bytes_of(&[1u32, 2]));
        let refused = combine(ReduceOp::Sum, DataType::DtUint32, acc.as_mut_slice(), &[]);
        assert_eq!(
            refused.unwrap_err().code,
            crate::base::errors::Code::InvalidArgument
        );
        assert_eq!(bytemuck::cast_slice::<u8, u32>(acc.as_slice()), [1, 2]);
    }

    #[test]
    fn unaligned_operands_give_the_same_result() {
        let a = [1u32, 2, 3];
        let mut shifted = vec![0u8];
        shifted.extend(bytes_of(&[10u32, 20, 30]));
        let mut acc = crate::tensor::TensorBuf::from_slice(&bytes_of(&a));
        combine(
            ReduceOp::Sum,
            DataType::DtUint32,
            acc.as_mut_slice(),
            &shifted[1..],
        )
        .unwrap();
        assert_eq!(
            bytemuck::cast_slice::<u8, u32>(acc.as_slice()),
            [11, 22, 33]
        );
    }

    #[test]
    fn a_scaled_add_is_an_sgd_step() {
        let mut weights = crate::tensor::TensorBuf::from_slice(&bytes_of(&[1.0f32, 2.0]));
        add_scaled(
            DataType::DtFloat,
            weights.as_mut_slice(),
            &bytes_of(&[10.0f32, -10.0]),
            -0.5,
        )
        .unwrap();
        assert_eq!(
            bytemuck::cast_slice::<u8, f32>(weights.as_slice()),
            [-4.0, 7.0]
        );
        assert!(add_scaled(DataType::DtInt32, &mut [0; 4], &[0; 4], 1.0).is_err());
    }

    #[test]
    fn refuses_what_numpy_would_not_do() {
        assert!(ReduceOp::Sum.check(DataType::DtBool).is_err());
        assert!(ReduceOp::Max.check(DataType::DtBool).is_ok());
        assert!(ReduceOp::Mean.check(DataType::DtInt32).is_err());
        assert!(ReduceOp::Max.check(DataType::DtComplex128).is_err());
        assert!(ReduceOp::parse("avg").is_err());
        assert_eq!(ReduceOp::parse("prod").unwrap(), ReduceOp::Prod);
    }
}
