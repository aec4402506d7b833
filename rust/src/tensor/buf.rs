//! A tensor's payload buffer: aligned, recycled when large, or a shared-memory segment.

use std::sync::Mutex;

use super::POOL_BYTES;
use super::recycle::Recycler;
use super::segment::Segment;

/// A received tensor's payload: owned, writable, 16-byte aligned so that a numpy view of any
/// dtype over it is aligned. Its memory is the process's own, or a shared-memory segment a
/// same-host sender wrote the tensor into (see `shm`), which goes back to its pool when dropped.
pub struct TensorBuf {
    words: Vec<u128>,
    shared: Option<Segment>,
    len: usize,
}

/// Buffers this large are recycled through [`POOL`] and backed by transparent huge pages.
const LARGE_BYTES: usize = 1 << 20;
/// What the pool may keep: enough for a training step's worth of gradients, or every piece of a
/// large collective (64 MiB in 4 MiB pieces is 16 buffers), bounded.
const POOL_BUFFERS: usize = 64;

/// Freed large buffers, kept for the next tensor of about the same size. A fresh buffer costs a
/// page fault and the kernel zeroing every page on first write, a large share of a big
/// transfer; a recycled one has its pages already.
static POOL: Mutex<Recycler<Vec<u128>>> =
    Mutex::new(Recycler::new(POOL_BUFFERS, POOL_BYTES, |words| {
        words.capacity() * 16
    }));

impl TensorBuf {
    /// A buffer of `len` bytes whose contents are unspecified (zero or a previous tensor's) until
    /// the caller overwrites all of it.
    pub fn new(len: usize) -> Self {
        let words = len.div_ceil(16);
        let words = if len >= LARGE_BYTES {
            recycled(words).unwrap_or_else(|| huge_page_backed(words))
        } else {
            vec![0u128; words]
        };
        Self {
            words,
            shared: None,
            len,
        }
    }

    /// A buffer over a shared-memory segment (page-aligned), its length the segment's.
    pub fn shared(segment: Segment) -> Self {
        Self {
            words: Vec::new(),
            len: segment.len(),
            shared: Some(segment),
        }
    }

    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = Self::new(bytes.len());
        buf.as_mut_slice().copy_from_slice(bytes);
        buf
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.shared {
            Some(segment) => segment.as_slice(),
            None => &bytemuck::cast_slice(&self.words)[..self.len],
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.shared {
            Some(segment) => segment.as_mut_slice(),
            None => &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len],
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for TensorBuf {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.words);
        if words.capacity() * 16 < LARGE_BYTES {
            return;
        }
        let evicted = POOL.lock().unwrap_or_else(|e| e.into_inner()).keep(words);
        drop(evicted);
    }
}

/// A pooled buffer with room for `words`, wasting at most a quarter of it.
fn recycled(words: usize) -> Option<Vec<u128>> {
    let fits = |w: &Vec<u128>| (words..=words + words / 4).contains(&w.capacity());
    let mut buffer = POOL.lock().unwrap_or_else(|e| e.into_inner()).take(fits)?;
    buffer.resize(words, 0);
    Some(buffer)
}

/// Fresh zeroed memory (untouched pages straight from the kernel), asked to be backed by huge
/// pages so that the first write faults once per 2 MiB instead of once per 4 KiB.
fn huge_page_backed(words: usize) -> Vec<u128> {
    let buffer = vec![0u128; words];
    let page = 4096;
    let start = (buffer.as_ptr() as usize).next_multiple_of(page);
    let end = (buffer.as_ptr() as usize + words * 16) / page * page;
    if end > start {
        // SAFETY: advice only, on whole pages inside this allocation; failure changes nothing.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    buffer
}

impl AsRef<[u8]> for TensorBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_buffers_are_aligned_and_large_ones_recycled() {
        let buf = TensorBuf::new(33);
        assert_eq!(buf.as_slice().as_ptr() as usize % 16, 0);
        assert_eq!(buf.len(), 33);
        assert_eq!(TensorBuf::from_slice(b"abc").as_slice(), b"abc");

        let large = TensorBuf::from_slice(&vec![7u8; 3 << 20]);
        let address = large.as_slice().as_ptr();
        drop(large);
        let again = TensorBuf::new((3 << 20) - 100);
        assert_eq!(
            again.as_slice().as_ptr(),
            address,
            "a freed buffer of that size is reused"
        );
        assert_eq!(again.len(), (3 << 20) - 100);
    }
}
