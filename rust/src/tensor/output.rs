//! Memory a collective writes its result into in place: the caller's own array, which was its
//! input too.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;

/// Memory lent for a result to be written into. It was the operation's input as well, so it is
/// written only once `free` has said that every view of it as input is gone.
pub struct ResultMemory {
    ptr: *mut u8,
    len: usize,
    free: Pin<Box<dyn Future<Output = bool> + Send>>,
    /// What keeps the memory valid (its lender's hold on it), given back when this is dropped:
    /// a collective whose handle was dropped still writes its result.
    _owner: Box<dyn Send>,
}

// SAFETY: one task writes the memory, once, after `free` (see `ResultMemory::new`).
unsafe impl Send for ResultMemory {}

impl ResultMemory {
    /// Memory at `ptr..ptr + len`, kept valid by `owner`; `free` resolves to whether every
    /// view of it as the operation's input was dropped in time.
    ///
    /// # Safety
    /// The memory must stay valid while `owner` lives, and once `free` has resolved to true
    /// nothing but this value may read or write it until it is dropped.
    pub unsafe fn new(
        ptr: *mut u8,
        len: usize,
        free: impl Future<Output = bool> + Send + 'static,
        owner: impl Send + 'static,
    ) -> Self {
        Self {
            ptr,
            len,
            free: Box::pin(free),
            _owner: Box::new(owner),
        }
    }

    /// Writes `parts` (the byte range of each, and its bytes) once the memory is free; whether
    /// it was (if not, nothing is written and the result must be assembled elsewhere).
    pub async fn write<'a>(
        mut self,
        parts: impl IntoIterator<Item = (Range<usize>, &'a [u8])>,
    ) -> bool {
        if !self.free.as_mut().await {
            return false;
        }
        for (range, bytes) in parts {
            assert!(
                range.end <= self.len && range.len() == bytes.len(),
                "a part of the result outside its memory"
            );
            // SAFETY: in bounds (checked above), and only this value uses the memory now.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    self.ptr.add(range.start),
                    range.len(),
                )
            };
        }
        true
    }
}
