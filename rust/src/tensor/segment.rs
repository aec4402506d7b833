//! Shared-memory segments: anonymous memory files (`memfd_create`) mapped read-write.
//!
//! A memfd has no name in `/dev/shm` or anywhere else: it lives while a descriptor or a mapping
//! of it does, so a process that dies leaks nothing. Another process reaches it only through
//! `/proc/<pid>/fd/<n>`, which the kernel opens only for a caller allowed to inspect the owner
//! (the same user, or root); the file itself is made owner-only besides.
//!
//! The receiving task owns the segments its tensors arrive in ([`SegmentPool`]): a sender maps
//! one it was lent, writes the tensor into it, and the receiver hands that very memory to numpy.
//! When the array is dropped the segment goes back to the pool, so the next tensor of about the
//! same size lands on pages that already exist instead of fresh ones the kernel must zero.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};

use super::POOL_BYTES;
use super::recycle::Recycler;

use crate::base::errors::{Error, Result};
use crate::base::files::open_file_limit;

/// Segments are sized in these steps, so tensors of nearly the same size share them.
const GRANULE: usize = 1 << 20;
/// What a pool keeps of idle segments, at most. A collective on a large tensor holds every piece
/// of it at once (64 MiB in 4 MiB pieces is 16 segments, each way), and a pool smaller than that
/// makes every call map fresh pages.
pub const POOL_SEGMENTS: usize = 64;

/// A read-write shared mapping of a whole memory file; unmapped when dropped.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through `&`/`&mut self`.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and writable; `populate` faults every page in at once,
    /// far cheaper than one fault per page on first touch.
    fn new(fd: RawFd, len: usize, populate: bool) -> Result<Self> {
        if len == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len,
            });
        }
        let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a fresh mapping chosen by the kernel; `fd` is open; failure is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_error("cannot map a shared-memory segment"));
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap does not return null on success"),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and writable; `&mut self` makes this the only view in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Copies `bytes` to the start of the mapping. The memory is shared with another process, so
    /// it is written through the raw pointer, never through a reference.
    pub fn copy_in(&self, bytes: &[u8]) {
        assert!(bytes.len() <= self.len, "the mapping is too small");
        // SAFETY: `bytes.len()` bytes fit the writable mapping, which cannot overlap `bytes`
        // (a Rust reference to it is never formed on this side).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr(), bytes.len()) };
    }

    /// Encodes `message` at the start of the mapping, which must hold it.
    pub fn encode_in(&self, message: &impl prost::Message) -> Result<()> {
        let len = message.encoded_len();
        assert!(len <= self.len, "the mapping is too small");
        // SAFETY: `len` bytes of the writable mapping. The segment was lent to this side for
        // this message, and its owner reads it only once told the message is in, so nothing
        // else touches these bytes while the slice lives.
        let mut target = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) };
        message
            .encode(&mut target)
            .map_err(|e| Error::internal(format!("cannot encode into a segment: {e}")))
    }

    /// Maps a memory file another process of this user holds open as descriptor `fd`.
    pub fn open_remote(pid: u32, fd: i32, len: usize) -> Result<Self> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::unavailable(format!("cannot open {path}: {e}")))?;
        let size = file
            .metadata()
            .map_err(|e| Error::unavailable(format!("cannot stat {path}: {e}")))?
            .len();
        if size < len as u64 {
            return Err(Error::internal(format!(
                "{path} holds {size} bytes, not the {len} announced"
            )));
        }
        Self::new(file.as_raw_fd(), len, true)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the region mapped in `new`, once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// A new anonymous memory file of `len` bytes, readable and writable by its owner only.
pub fn memfd(name: &str, len: usize) -> Result<File> {
    let name = std::ffi::CString::new(name).expect("no NUL in segment names");
    // SAFETY: a valid C string; the returned descriptor is checked and owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(os_error("memfd_create failed"));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: `fd` is open; the mode is a plain permission mask.
    if unsafe { libc::fchmod(file.as_raw_fd(), 0o600) } != 0 {
        return Err(os_error("cannot make a segment owner-only"));
    }
    file.set_len(len as u64)
        .map_err(|e| Error::internal(format!("cannot size a {len}-byte segment: {e}")))?;
    Ok(file)
}

/// A memory file with its mapping, owned by the receiving task.
pub struct Region {
    file: File,
    mapping: Mapping,
    id: u64,
}

impl Region {
    fn create(id: u64, capacity: usize) -> Result<Self> {
        let file = memfd("distsrv-tensor", capacity)?;
        let mapping = Mapping::new(file.as_raw_fd(), capacity, false)?;
        Ok(Self { file, mapping, id })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn capacity(&self) -> usize {
        self.mapping.len()
    }
}

/// Segments in use at once (lent, granted, or under an array the application keeps), at most:
/// each holds a descriptor and a mapping. A quarter of the descriptors this process may open,
/// the rest being for connections and the application.
pub const MAX_SEGMENTS_IN_USE: usize = 1024;

/// Idle segments of one task, the counter that names new ones, and the budget of those in use.
pub struct SegmentPool {
    state: Mutex<PoolState>,
    max_in_use: usize,
}

struct PoolState {
    idle: Recycler<Region>,
    next_id: u64,
    in_use: usize,
    closed: bool,
}

impl Default for SegmentPool {
    fn default() -> Self {
        let descriptors = open_file_limit() / 4;
        Self::new(MAX_SEGMENTS_IN_USE.min(descriptors).max(2))
    }
}

impl SegmentPool {
    /// A pool that lets at most `max_in_use` segments out at once.
    pub fn new(max_in_use: usize) -> Self {
        Self {
            state: Mutex::new(PoolState {
                idle: Recycler::new(POOL_SEGMENTS, POOL_BYTES, Region::capacity),
                next_id: 0,
                in_use: 0,
                closed: false,
            }),
            max_in_use,
        }
    }

    /// A segment of at least `len` bytes: an idle one of about that size, or a new one;
    /// RESOURCE_EXHAUSTED once the budget of segments in use is spent.
    pub fn take(self: &Arc<Self>, len: usize) -> Result<Segment> {
        let capacity = len.max(1).next_multiple_of(GRANULE);
        let region = {
            let mut state = self.lock();
            if state.in_use >= self.max_in_use {
                return Err(Error::resource_exhausted(format!(
                    "{} shared-memory segments are in use, all this task may have",
                    state.in_use
                )));
            }
            state.in_use += 1;
            let fits = |r: &Region| (capacity..=capacity + capacity / 4).contains(&r.capacity());
            match state.idle.take(fits) {
                Some(region) => region,
                None => {
                    state.next_id += 1;
                    let id = state.next_id;
                    drop(state);
                    Region::create(id, capacity).inspect_err(|_| self.lock().in_use -= 1)?
                }
            }
        };
        Ok(Segment {
            region: Some(region),
            len,
            pool: Arc::downgrade(self),
        })
    }

    /// Frees every idle segment and every one handed back from now on.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        let idle = state.idle.drain();
        drop(state);
        drop(idle);
    }

    /// Idle segments held right now.
    pub fn idle(&self) -> usize {
        self.lock().idle.len()
    }

    /// Whether more than half the budget is in use: a tensor that arrived in a segment should
    /// then be copied out of it, so that arrays the application keeps cannot spend what
    /// transfers in flight need.
    pub fn crowded(&self) -> bool {
        self.lock().in_use * 2 > self.max_in_use
    }

    fn give_back(&self, region: Region) {
        let mut state = self.lock();
        state.in_use -= 1;
        if state.closed {
            return;
        }
        let evicted = state.idle.keep(region);
        drop(state);
        drop(evicted);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `len` bytes at the start of a pooled region, in use; back to its pool when dropped.
pub struct Segment {
    region: Option<Region>,
    len: usize,
    pool: Weak<SegmentPool>,
}

impl Segment {
    pub fn region(&self) -> &Region {
        self.region.as_ref().expect("held until dropped")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.region().mapping.as_slice()[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self
            .region
            .as_mut()
            .expect("held until dropped")
            .mapping
            .as_mut_slice()[..len]
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let (Some(region), Some(pool)) = (self.region.take(), self.pool.upgrade()) {
            pool.give_back(region);
        }
    }
}

fn os_error(what: &str) -> Error {
    Error::internal(format!("{what}: {}", std::io::Error::last_os_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_reused_and_reach_another_mapping() {
        let pool = Arc::new(SegmentPool::default());
        let mut segment = pool.take(3 << 20).unwrap();
        segment.as_mut_slice().fill(7);
        let (id, fd) = (segment.region().id(), segment.region().fd());
        let remote = Mapping::open_remote(std::process::id(), fd, 3 << 20).unwrap();
        assert!(remote.as_slice().iter().all(|b| *b == 7));
        drop(segment);
        assert_eq!(pool.idle(), 1);
        let again = pool.take(3 << 20).unwrap();
        assert_eq!(again.region().id(), id);
        let other = pool.take(64 << 20).unwrap();
        assert_ne!(other.region().id(), id);
        pool.close();
        drop((again, other));
    }

    #[test]
    fn segments_in_use_are_held_to_the_budget_and_count_again_when_dropped() {
        let pool = Arc::new(SegmentPool::new(3));
        let held = [pool.take(1).unwrap(), pool.take(0).unwrap()];
        assert!(pool.crowded());
        let last = pool.take(1 << 20).unwrap();
        let refused = pool.take(1).err().expect("past the budget");
        assert_eq!(refused.code, crate::base::errors::Code::ResourceExhausted);
        drop(last);
        drop(held);
        assert!(!pool.crowded());
        assert_eq!(pool.idle(), 3);
        let reused: Vec<_> = (0..3).map(|_| pool.take(1).unwrap()).collect();
        assert_eq!(pool.idle(), 0);
        drop(reused);
    }

    #[test]
    fn the_pool_keeps_a_large_collective_s_pieces_and_no_more() {
        let pool = Arc::new(SegmentPool::default());
        let held: Vec<_> = (0..POOL_SEGMENTS + 2)
            .map(|_| pool.take(4 << 20).unwrap())
            .collect();
        let ids: Vec<_> = held.iter().map(|segment| segment.region().id()).collect();
        drop(held);
        assert_eq!(pool.idle(), POOL_SEGMENTS);
        let again: Vec<_> = (0..POOL_SEGMENTS)
            .map(|_| pool.take(4 << 20).unwrap())
            .collect();
        let mut reused: Vec<_> = again.iter().map(|segment| segment.region().id()).collect();
        reused.sort();
        // The two oldest went; every other segment came back rather than a new one.
        assert_eq!(reused, ids[2..]);
    }

    #[test]
    fn segments_are_owner_only() {
        let file = memfd("test", 4096).unwrap();
        let mode = file.metadata().unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
