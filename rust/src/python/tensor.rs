//! Tensor bytes across the boundary, without copies: a numpy array's memory lent to Rust for the
//! length of a send, and a received tensor's buffer handed to numpy.

use std::os::raw::{c_int, c_void};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::codec::TensorBuf;

/// How long a finished send may take to drop its last view of the memory (the transport lets go of
/// frames a moment after the reply). Past it the memory is leaked rather than handed back early.
const LEASE_GRACE: Duration = Duration::from_secs(10);

/// A Python buffer held while Rust reads it. [`HeldBuffer::release`] waits until no [`Bytes`]
/// made from it remains, then gives the buffer back to Python.
pub struct HeldBuffer {
    buffer: Option<PyUntypedBuffer>,
    leases_gone: mpsc::Receiver<()>,
}

/// The owner behind the payload `Bytes`: a view of the held buffer's memory.
struct Lease {
    ptr: *const u8,
    len: usize,
    /// Dropped with the last `Bytes`, which tells the holder the memory is free again.
    _alive: mpsc::Sender<()>,
}

// SAFETY: the memory behind `ptr` stays exported, and so valid and in place, until the
// `HeldBuffer` sees every `Lease` dropped; it is only read.
unsafe impl Send for Lease {}

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: see `unsafe impl Send for Lease`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl HeldBuffer {
    /// Holds `object`'s buffer, which must be C-contiguous, and lends its bytes.
    pub fn hold(object: &Bound<'_, PyAny>) -> PyResult<(Self, Bytes)> {
        let buffer = PyUntypedBuffer::get(object)?;
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "the tensor's memory must be C-contiguous",
            ));
        }
        let (alive, leases_gone) = mpsc::channel();
        let lease = Lease {
            ptr: buffer.buf_ptr().cast_const().cast(),
            len: buffer.len_bytes(),
            _alive: alive,
        };
        let held = Self {
            buffer: Some(buffer),
            leases_gone,
        };
        Ok((held, Bytes::from_owner(lease)))
    }

    /// Waits, without the GIL, for the lent bytes to be dropped, then releases the buffer.
    pub fn release(mut self, py: Python<'_>) {
        self.release_now(py);
    }

    fn release_now(&mut self, py: Python<'_>) {
        let Some(buffer) = self.buffer.take() else {
            return;
        };
        let leases_gone = &mut self.leases_gone;
        let free = py.detach(move || {
            matches!(
                leases_gone.recv_timeout(LEASE_GRACE),
                Err(mpsc::RecvTimeoutError::Disconnected)
            )
        });
        if free {
            buffer.release(py);
        } else {
            // Something still reads the memory: keeping the export forever is safe, freeing it
            // is not.
            std::mem::forget(buffer);
        }
    }
}

impl Drop for HeldBuffer {
    fn drop(&mut self) {
        if self.buffer.is_some() {
            Python::attach(|py| self.release_now(py));
        }
    }
}

/// A received tensor's bytes, exposed through the buffer protocol so numpy wraps them in place:
/// `numpy.frombuffer(tensor_bytes, dtype).reshape(shape)` copies nothing and is writable.
#[pyclass(module = "distsrv._native")]
pub struct TensorBytes {
    data: TensorBuf,
}

impl TensorBytes {
    pub fn new(data: TensorBuf) -> Self {
        Self { data }
    }
}

#[pymethods]
impl TensorBytes {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    /// # Safety
    /// Called by Python with a valid `view`; the memory lives as long as this object, which the
    /// view keeps alive.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let mut this = slf.borrow_mut();
            let bytes = this.data.as_mut_slice();
            (bytes.as_mut_ptr(), bytes.len())
        };
        // SAFETY: `view` comes from Python; `ptr` and `len` describe memory owned by `slf`, which
        // PyBuffer_FillInfo keeps alive through `view.obj`.
        let filled = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                ptr.cast::<c_void>(),
                len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if filled == -1 {
            return Err(PyErr::take(slf.py())
                .unwrap_or_else(|| PyBufferError::new_err("cannot export the tensor buffer")));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
