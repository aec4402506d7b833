"""numpy arrays to and from the wire: TensorFlow's DataType codes, C-order native-endian bytes."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from distsrv.interop import as_array

__all__ = ["dtype_code", "supported_dtypes", "to_wire"]

#: TensorFlow's DataType code of bfloat16, the one dtype numpy has only through ml_dtypes.
BFLOAT16_CODE = 14


class _DtypeCodes(dict[np.dtype[Any], int]):
    """TensorFlow's DataType numbers (tensorflow/core/framework/types.proto) by dtype. bfloat16
    joins the first time it is looked up: an array of it means ml_dtypes is loaded already, and
    importing ml_dtypes up front would take most of ``import distsrv``'s time."""

    def __missing__(self, dtype: np.dtype[Any]) -> int:
        if getattr(dtype, "name", None) == "bfloat16" and _load_bfloat16():
            return self[dtype]
        raise KeyError(dtype)


class _CodeDtypes(dict[int, np.dtype[Any]]):
    """The dtypes by DataType number; bfloat16 joins the first time one arrives."""

    def __missing__(self, code: int) -> np.dtype[Any]:
        if code == BFLOAT16_CODE and _load_bfloat16():
            return self[code]
        raise KeyError(code)


DTYPE_CODES = _DtypeCodes(
    {
        np.dtype(np.float32): 1,
        np.dtype(np.float64): 2,
        np.dtype(np.int32): 3,
        np.dtype(np.uint8): 4,
        np.dtype(np.int16): 5,
        np.dtype(np.int8): 6,
        np.dtype(np.complex64): 8,
        np.dtype(np.int64): 9,
        np.dtype(np.bool_): 10,
        np.dtype(np.uint16): 17,
        np.dtype(np.complex128): 18,
        np.dtype(np.float16): 19,
        np.dtype(np.uint32): 22,
        np.dtype(np.uint64): 23,
    }
)
CODE_DTYPES = _CodeDtypes({code: dtype for dtype, code in DTYPE_CODES.items()})


def _load_bfloat16() -> bool:
    """Adds bfloat16 to the tables if ml_dtypes provides it; whether they now hold it."""
    if BFLOAT16_CODE in CODE_DTYPES:
        return True
    try:
        import ml_dtypes
    except ImportError:  # bfloat16 is carried only where ml_dtypes provides it
        return False
    bfloat16 = np.dtype(ml_dtypes.bfloat16)
    DTYPE_CODES[bfloat16] = BFLOAT16_CODE
    CODE_DTYPES[BFLOAT16_CODE] = bfloat16
    return True


def supported_dtypes() -> tuple[np.dtype[Any], ...]:
    """The dtypes that can be sent, in TensorFlow's DataType order."""
    _load_bfloat16()
    return tuple(sorted(DTYPE_CODES, key=DTYPE_CODES.__getitem__))


def dtype_code(dtype: npt.DTypeLike) -> int:
    """TensorFlow's DataType number of ``dtype``; TypeError for dtypes the wire cannot carry."""
    if isinstance(dtype, np.dtype) and dtype in DTYPE_CODES:  # native-endian: nothing to normalize
        return DTYPE_CODES[dtype]
    native = np.dtype(dtype).newbyteorder("=")
    try:
        return DTYPE_CODES[native]
    except KeyError:
        raise TypeError(
            f"cannot send arrays of dtype {np.dtype(dtype)}: supported are "
            + ", ".join(str(d) for d in supported_dtypes())
        ) from None


def to_wire(array: Any) -> tuple[int, list[int], npt.NDArray[Any]]:
    """(dtype code, shape, a C-contiguous native-endian array of it) for sending; copies only when
    the array is not such an array already (a torch tensor, a JAX array or any DLPack tensor in
    CPU memory is read in place). The native layer lends a C-contiguous ndarray
    of a dtype in ``DTYPE_CODES`` as it is, and comes here for everything else; it makes received
    arrays with ``CODE_DTYPES``."""
    array = as_array(array)
    code = dtype_code(array.dtype)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return code, list(array.shape), array
