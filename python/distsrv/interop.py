"""Other frameworks' tensors as numpy arrays over the same memory, and results back in their kind.

A CPU tensor of PyTorch, a JAX array, or anything that offers DLPack (``__dlpack__``, the
Python array API standard) or the buffer protocol is read where it lies: numpy gets a view of
its memory, which the native layer lends to the transport as it does any array. Neither torch
nor JAX is imported here unless a value of theirs arrives, so they stay optional.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["TensorLike", "as_array", "like", "writable_view"]

#: What an operation takes as an array and can write a result into: a numpy array, a CPU torch
#: tensor, a JAX array (read only), or any DLPack or buffer-protocol tensor in CPU memory.
TensorLike = Any

# DLPack's device types (dlpack.h) whose memory the CPU can read in place: CPU, CUDA and ROCm
# pinned host memory.
_HOST_DEVICES = frozenset({1, 3, 11})
_DEVICE_NAMES = {2: "cuda", 4: "opencl", 7: "vulkan", 8: "metal", 10: "rocm", 13: "cuda_managed"}


def as_array(value: Any) -> npt.NDArray[Any]:
    """``value`` as a numpy array, sharing its memory where its layout allows; TypeError for
    a tensor that is not in CPU memory, naming its device."""
    if isinstance(value, np.ndarray):
        return value
    torch = _torch_of(value)
    if torch is not None:
        return _torch_view(torch, value.detach())
    if _is_jax(value):
        _require_host(value)
        return np.asarray(value)
    if hasattr(value, "__dlpack__"):
        _require_host(value)
        try:
            return np.from_dlpack(value)
        except (BufferError, TypeError, RuntimeError):  # a dtype numpy's DLPack import lacks
            pass
    return np.asarray(value)


def writable_view(out: Any) -> npt.NDArray[Any]:
    """A numpy array over ``out``'s memory, for a result to be written into it in place."""
    if isinstance(out, np.ndarray):
        view = out
    elif (torch := _torch_of(out)) is not None:
        view = _torch_view(torch, out.detach())
    elif _is_jax(out):
        raise TypeError("JAX arrays are immutable and cannot be written into: pass like= instead")
    else:
        view = as_array(out)
    if not view.flags.writeable:
        raise TypeError(f"out must be writable; this {type(out).__name__} is read-only")
    return view


def like(array: npt.NDArray[Any], prototype: Any) -> Any:
    """``array`` in ``prototype``'s kind: a torch tensor over the same memory for a torch
    prototype, a JAX array (a copy: JAX owns its buffers) for a JAX one, else ``array``."""
    if prototype is None or isinstance(prototype, np.ndarray):
        return array
    torch = _torch_of(prototype)
    if torch is not None:
        if array.dtype.name == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    if _is_jax(prototype):
        import jax.numpy as jnp

        return jnp.asarray(array)
    return array


def _torch_of(value: Any) -> Any:
    """The torch module when ``value`` is a torch tensor (torch is then imported already)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return torch
    return None


def _torch_view(torch: Any, tensor: Any) -> npt.NDArray[Any]:
    if tensor.device.type != "cpu":
        raise TypeError(
            f"a tensor on {tensor.device} cannot be used here: distsrv moves CPU memory "
            "(call .cpu() first)"
        )
    tensor = tensor.resolve_conj().resolve_neg()
    if tensor.dtype == torch.bfloat16:
        bits: npt.NDArray[Any] = tensor.view(torch.int16).numpy()
        return bits.view(_bfloat16())
    try:
        view: npt.NDArray[Any] = tensor.numpy()
    except TypeError as error:  # a dtype numpy has no counterpart of (float8, complex32, ...)
        raise TypeError(f"cannot send torch tensors of dtype {tensor.dtype}: {error}") from None
    return view


def _is_jax(value: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.Array)


def _require_host(value: Any) -> None:
    try:
        device_type, device_id = value.__dlpack_device__()
    except (AttributeError, TypeError):
        return
    if int(device_type) not in _HOST_DEVICES:
        name = _DEVICE_NAMES.get(int(device_type), f"DLPack device type {int(device_type)}")
        raise TypeError(
            f"a tensor on {name}:{device_id} cannot be used here: distsrv moves CPU memory "
            "(copy it to the host first)"
        )


def _bfloat16() -> np.dtype[Any]:
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("bfloat16 tensors need the ml_dtypes package") from None
    bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return bfloat16
