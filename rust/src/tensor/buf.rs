//! A tensor's payload buffer: aligned, recycled when large, a shared-memory segment, or a part
//! of a message that arrived whole ([`Arrived`]).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::POOL_BYTES;
use super::recycle::Recycler;
use super::segment::Segment;

/// Alignment of every payload buffer: a numpy view of any dtype over one is aligned.
pub const ALIGNMENT: usize = 16;

/// A received tensor's payload: owned, writable, [`ALIGNMENT`]-aligned. Its memory is the
/// process's own, a shared-memory segment a same-host sender wrote the tensor into (see `shm`),
/// which goes back to its pool when dropped, or its range of a message that arrived whole.
pub struct TensorBuf {
    memory: Memory,
    len: usize,
}

enum Memory {
    Own(Vec<u128>),
    Shared(Segment),
    Arrived { message: Arrived, offset: usize },
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
            memory: Memory::Own(words),
            len,
        }
    }

    /// A buffer over a shared-memory segment (page-aligned), its length the segment's.
    pub fn shared(segment: Segment) -> Self {
        Self {
            len: segment.len(),
            memory: Memory::Shared(segment),
        }
    }

    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = Self::new(bytes.len());
        buf.as_mut_slice().copy_from_slice(bytes);
        buf
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.memory {
            Memory::Own(words) => &bytemuck::cast_slice(words)[..self.len],
            Memory::Shared(segment) => segment.as_slice(),
            // SAFETY: the range is inside the message and no other tensor covers it.
            Memory::Arrived { message, offset } => unsafe {
                std::slice::from_raw_parts(message.0.base.add(*offset), self.len)
            },
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.memory {
            Memory::Own(words) => &mut bytemuck::cast_slice_mut(words)[..self.len],
            Memory::Shared(segment) => segment.as_mut_slice(),
            // SAFETY: as in `as_slice`; `&mut self` makes this the one reference to the range.
            Memory::Arrived { message, offset } => unsafe {
                std::slice::from_raw_parts_mut(message.0.base.add(*offset), self.len)
            },
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A message received whole into one buffer. prost decodes it from [`Arrived::bytes`], its
/// `bytes` fields slices of the buffer; a large array among them then becomes a tensor where it
/// lies ([`Arrived::tensor`]) instead of a copy. The buffer is freed with the last of them.
#[derive(Clone)]
pub struct Arrived(Arc<Whole>);

struct Whole {
    /// Where `buffer`'s bytes are, taken once it stopped moving; nothing else touches them.
    base: *mut u8,
    len: usize,
    /// The ranges that are tensors now, which no other may overlap.
    lent: Mutex<Vec<Range<usize>>>,
    /// Kept for its memory, and recycled when dropped.
    _buffer: TensorBuf,
}

// SAFETY: the bytes behind `base` are read through `Bytes` slices and written only through the
// tensor of a range lent once, so no two threads ever write the same byte or read one being written.
unsafe impl Send for Whole {}
unsafe impl Sync for Whole {}

impl Arrived {
    /// The message in `buffer`, which the caller has filled.
    pub fn new(mut buffer: TensorBuf) -> Self {
        let bytes = buffer.as_mut_slice();
        let (base, len) = (bytes.as_mut_ptr(), bytes.len());
        Self(Arc::new(Whole {
            base,
            len,
            lent: Mutex::default(),
            _buffer: buffer,
        }))
    }

    /// The whole message, for decoding.
    pub fn bytes(&self) -> Bytes {
        Bytes::from_owner(self.clone())
    }

    /// `slice` (of [`Arrived::bytes`], the field of one array) as that array's tensor, in place:
    /// given back when it is not a part of this message, not aligned, or a range already lent.
    pub fn tensor(&self, slice: Bytes) -> Result<TensorBuf, Bytes> {
        let start = (slice.as_ptr() as usize).wrapping_sub(self.0.base as usize);
        let range = start..start.wrapping_add(slice.len());
        let inside = range.start <= range.end && range.end <= self.0.len;
        if !inside || !(slice.as_ptr() as usize).is_multiple_of(ALIGNMENT) {
            return Err(slice);
        }
        let mut lent = self.0.lent.lock().unwrap_or_else(|e| e.into_inner());
        if lent
            .iter()
            .any(|other| other.start < range.end && range.start < other.end)
        {
            return Err(slice);
        }
        lent.push(range.clone());
        Ok(TensorBuf {
            memory: Memory::Arrived {
                message: self.clone(),
                offset: range.start,
            },
            len: slice.len(),
        })
    }
}

impl std::fmt::Debug for Arrived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arrived({} bytes)", self.0.len)
    }
}

impl AsRef<[u8]> for Arrived {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the buffer lives as long as `self`; see `Whole`.
        unsafe { std::slice::from_raw_parts(self.0.base, self.0.len) }
    }
}

impl Drop for TensorBuf {
    fn drop(&mut self) {
        let Memory::Own(words) = &mut self.memory else {
            return;
        };
        let words = std::mem::take(words);
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

    #[test]
    fn an_arrived_messages_aligned_parts_become_tensors_in_place_once() {
        let mut buffer = TensorBuf::new(4096);
        for (index, byte) in buffer.as_mut_slice().iter_mut().enumerate() {
            *byte = index as u8;
        }
        let arrived = Arrived::new(buffer);
        let whole = arrived.bytes();
        let mut tensor = arrived.tensor(whole.slice(64..1024)).unwrap();
        assert_eq!(tensor.as_slice(), &whole[64..1024]);
        tensor.as_mut_slice()[0] = 255;
        assert_eq!(whole[64], 255, "the tensor is the message's own bytes");

        for refused in [whole.slice(32..128), whole.slice(65..128)] {
            assert!(arrived.tensor(refused).is_err(), "lent, or not aligned");
        }
        let elsewhere = Bytes::from(vec![0u8; 64]);
        assert!(arrived.tensor(elsewhere).is_err(), "not of this message");
        assert!(arrived.tensor(whole.slice(1024..2048)).is_ok());
        drop((arrived, whole));
        assert_eq!(tensor.as_slice()[1], 65, "a tensor keeps the buffer alive");
    }
}
