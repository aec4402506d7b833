//! Tensor bytes across the boundary, without copies: a numpy array's memory lent to Rust for the
//! length of a send, and a received tensor's buffer handed to numpy.

use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Condvar, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::task::AtomicWaker;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyTuple, PyType};

use super::errors::to_py;
use crate::base::errors::Error;
use crate::proto::DataType;
use crate::tensor::{ResultMemory, Tensor, TensorBuf, TensorMeta, dtype_name};

/// How long a finished send may take to drop its last view of the memory (the transport lets go of
/// frames a moment after the reply). Past it the memory is leaked rather than handed back early.
pub const LEASE_GRACE: Duration = Duration::from_secs(10);

/// A Python buffer exported C-contiguous with its shape (`PyBUF_ND`). No format is asked for, so
/// numpy builds none: extension dtypes (bfloat16) export too, and exporting allocates nothing.
struct Export(Box<ffi::Py_buffer>);

// SAFETY: the view is only read, and released with the GIL held (see `HeldBuffer`).
unsafe impl Send for Export {}
unsafe impl Sync for Export {}

impl Export {
    /// With `flags` `PyBUF_ND`, or that and `PyBUF_WRITABLE` for memory to be written.
    fn get(object: &Bound<'_, PyAny>, flags: c_int) -> PyResult<Self> {
        // Boxed, so the view stays in place: an exporter may point its shape into it.
        let mut view = Box::new(ffi::Py_buffer::new());
        // SAFETY: a live object and a view for it to fill.
        if unsafe { ffi::PyObject_GetBuffer(object.as_ptr(), &mut *view, flags) } == -1 {
            return Err(PyErr::fetch(object.py()));
        }
        Ok(Self(view))
    }

    fn shape(&self) -> Vec<u64> {
        let ndim = usize::try_from(self.0.ndim).unwrap_or(0);
        if ndim == 0 || self.0.shape.is_null() {
            return Vec::new();
        }
        // SAFETY: with PyBUF_ND, `shape` points to `ndim` extents, alive until the release.
        let shape = unsafe { std::slice::from_raw_parts(self.0.shape, ndim) };
        shape.iter().map(|&extent| extent as u64).collect()
    }

    fn release(mut self, _py: Python<'_>) {
        // SAFETY: released once, with the GIL held; nothing reads the view afterwards.
        unsafe { ffi::PyBuffer_Release(&mut *self.0) };
    }
}

/// A Python buffer held while Rust reads it. [`HeldBuffer::release`] waits until no [`Bytes`]
/// made from it remains, then gives the buffer back to Python.
pub struct HeldBuffer {
    buffer: Option<Export>,
    returned: Arc<Returned>,
}

/// Whether the bytes lent from a held buffer are all dropped: a blocked thread waits for it, a
/// thread that drives a runtime awaits it.
#[derive(Default)]
pub struct Returned {
    done: Mutex<bool>,
    changed: Condvar,
    waker: AtomicWaker,
}

impl Returned {
    fn tell(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
        self.waker.wake();
    }

    /// Whether the bytes are back.
    pub fn is_done(&self) -> bool {
        *self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the bytes came back within `limit`.
    fn wait(&self, limit: Duration) -> bool {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let (done, _) = self
            .changed
            .wait_timeout_while(done, limit, |done| !*done)
            .unwrap_or_else(|e| e.into_inner());
        *done
    }

    /// Resolves once the bytes are back.
    pub async fn returned(&self) {
        std::future::poll_fn(|context| {
            self.waker.register(context.waker());
            if self.is_done() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// The owner behind the payload `Bytes`: a view of the held buffer's memory, dropped with the
/// last `Bytes`, which tells the holder the memory is free again.
struct Lease {
    ptr: *const u8,
    len: usize,
    returned: Arc<Returned>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.returned.tell();
    }
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
        Self::hold_with(object, ffi::PyBUF_ND)
    }

    fn hold_with(object: &Bound<'_, PyAny>, flags: c_int) -> PyResult<(Self, Bytes)> {
        let buffer = Export::get(object, flags)?;
        let returned = Arc::new(Returned::default());
        let lease = Lease {
            ptr: buffer.0.buf.cast_const().cast(),
            len: usize::try_from(buffer.0.len).unwrap_or(0),
            returned: Arc::clone(&returned),
        };
        let held = Self {
            buffer: Some(buffer),
            returned,
        };
        Ok((held, Bytes::from_owner(lease)))
    }

    /// The held array's shape, as its exporter gave it.
    fn shape(&self) -> Vec<u64> {
        self.buffer.as_ref().map(Export::shape).unwrap_or_default()
    }

    /// The held memory, for writing once nothing reads it.
    fn memory(&self) -> (*mut u8, usize) {
        self.buffer
            .as_ref()
            .map_or((std::ptr::null_mut(), 0), |buffer| {
                (
                    buffer.0.buf.cast(),
                    usize::try_from(buffer.0.len).unwrap_or(0),
                )
            })
    }

    /// Tells when the lent bytes are all dropped.
    pub fn returned(&self) -> Arc<Returned> {
        Arc::clone(&self.returned)
    }

    /// Waits, without the GIL, for the lent bytes to be dropped, then releases the buffer.
    pub fn release(mut self, py: Python<'_>) {
        self.release_now(py);
    }

    fn release_now(&mut self, py: Python<'_>) {
        let Some(buffer) = self.buffer.take() else {
            return;
        };
        let returned = &self.returned;
        let free = py.detach(move || returned.wait(LEASE_GRACE));
        if free {
            buffer.release(py);
        } else {
            // Something still reads the memory: keeping the export forever is safe, freeing it
            // is not.
            Box::leak(buffer.0);
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

/// `numpy.ndarray`, imported once.
pub(super) static NDARRAY: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CODES: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static DTYPES: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static TO_WIRE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The numpy dtype of `dtype`; UnimplementedError where numpy here has none.
pub fn numpy_dtype(py: Python<'_>, dtype: DataType) -> PyResult<Bound<'_, PyAny>> {
    DTYPES
        .import(py, "distsrv.tensors", "CODE_DTYPES")?
        .get_item(dtype as i32)
        .map_err(|_| {
            to_py(Error::unimplemented(format!(
                "a {} tensor arrived, which numpy here cannot hold (bfloat16 needs ml_dtypes)",
                dtype_name(dtype)
            )))
        })
}

/// An array (anything numpy can make one of) as the wire lays it out: its dtype and shape, and
/// its C-order bytes, held. A C-contiguous ndarray of a dtype the wire carries is lent as it is,
/// read here; anything else goes through `distsrv.tensors.to_wire`, which makes such an array of
/// it (a copy) or raises TypeError. The common case runs no Python code: on the way to a send,
/// Python is a large part of a small tensor's time.
pub fn array_in(array: &Bound<'_, PyAny>) -> PyResult<(TensorMeta, HeldBuffer, Bytes)> {
    let py = array.py();
    if array.is_instance(NDARRAY.import(py, "numpy", "ndarray")?)? {
        let codes = CODES.import(py, "distsrv.tensors", "DTYPE_CODES")?;
        if let Ok(code) = codes.get_item(array.getattr(intern!(py, "dtype"))?) {
            // Refused only when not C-contiguous: then laid out anew below.
            if let Ok((held, bytes)) = HeldBuffer::hold(array) {
                let meta = TensorMeta::checked(code.extract()?, held.shape()).map_err(to_py)?;
                return Ok((meta, held, bytes));
            }
        }
    }
    let to_wire = TO_WIRE.import(py, "distsrv.tensors", "to_wire")?;
    let (code, shape, flat): (i32, Vec<u64>, Bound<'_, PyAny>) =
        to_wire.call1((array,))?.extract()?;
    let meta = TensorMeta::checked(code, shape).map_err(to_py)?;
    let (held, bytes) = HeldBuffer::hold(&flat)?;
    Ok((meta, held, bytes))
}

/// A writable C-contiguous ndarray of a dtype the wire carries, as `array_in` lends it, and
/// the same memory for an in-place collective's result, which holds it until the collective
/// ends; None for any other array, or one whose size `wanted` refuses (it goes through
/// `array_in`, and its result is a new one).
pub fn array_in_place(
    array: &Bound<'_, PyAny>,
    wanted: impl Fn(usize) -> bool,
) -> PyResult<Option<(TensorMeta, Bytes, ResultMemory)>> {
    let py = array.py();
    if !array.is_instance(NDARRAY.import(py, "numpy", "ndarray")?)? {
        return Ok(None);
    }
    if !wanted(array.getattr(intern!(py, "nbytes"))?.extract()?) {
        return Ok(None);
    }
    let codes = CODES.import(py, "distsrv.tensors", "DTYPE_CODES")?;
    let Ok(code) = codes.get_item(array.getattr(intern!(py, "dtype"))?) else {
        return Ok(None);
    };
    let Ok((held, bytes)) = HeldBuffer::hold_with(array, ffi::PyBUF_ND | ffi::PyBUF_WRITABLE)
    else {
        return Ok(None); // read-only or not C-contiguous
    };
    let meta = TensorMeta::checked(code.extract()?, held.shape()).map_err(to_py)?;
    let (ptr, len) = held.memory();
    let returned = held.returned();
    let free = async move {
        returned.is_done()
            || tokio::time::timeout(LEASE_GRACE, returned.returned())
                .await
                .is_ok()
    };
    // SAFETY: the export, held by the memory's owner until it is dropped, keeps the array's
    // memory in place; `free` resolves true only when no lent view of it remains.
    let memory = unsafe { ResultMemory::new(ptr, len, free, ResultHold(Some(held))) };
    Ok(Some((meta, bytes, memory)))
}

/// The hold on an in-place collective's array, given back when its result memory is dropped:
/// at once where no lent view of it remains, else by a thread of its own that waits for them
/// (as `HeldBuffer::release` does), since the task dropping it must not block.
struct ResultHold(Option<HeldBuffer>);

impl Drop for ResultHold {
    fn drop(&mut self) {
        let Some(held) = self.0.take() else {
            return;
        };
        if held.returned.is_done() {
            drop(held);
        } else {
            std::thread::spawn(move || drop(held));
        }
    }
}

/// A received tensor as an ordinary writable numpy array over its buffer: nothing is copied.
pub fn array_out(py: Python<'_>, tensor: Tensor) -> PyResult<Bound<'_, PyAny>> {
    let dtype = numpy_dtype(py, tensor.meta.dtype)?;
    let shape = PyTuple::new(py, &tensor.meta.shape)?;
    let data = Bound::new(py, TensorBytes::new(tensor.data))?;
    NDARRAY
        .import(py, "numpy", "ndarray")?
        .call1((shape, dtype, data))
}
