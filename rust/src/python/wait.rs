//! Waiting without the GIL: every blocking call of the binding waits here, in slices short
//! enough that Ctrl-C interrupts it promptly, counted so that interpreter exit can wait for it;
//! and the fork guard, which refuses a server in a forked child.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::future::join_all;
use pyo3::prelude::*;
use tokio::runtime::Handle;

use super::tensor::{HeldBuffer, LEASE_GRACE};
use crate::node::calls::{Blocking, Driver};

/// How long a blocking call waits between checks for signals, so Ctrl-C interrupts it promptly.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// Threads inside a blocking wait (`join`, `send`, `recv`, `call`, `wait`) or running a handler.
/// At interpreter exit, a thread that takes the GIL back after finalization has begun is ended by
/// CPython with a forced unwind, which must not cross Rust frames; so the exit handler stops every
/// server (waking the waiting threads) and waits for this count to reach zero first.
static BLOCKED_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Counts the current thread as blocked in Rust while alive.
pub struct Blocked;

impl Blocked {
    pub fn enter() -> Self {
        BLOCKED_THREADS.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        BLOCKED_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many threads are inside a blocking distsrv call right now.
#[pyfunction]
pub fn blocked_threads() -> usize {
    BLOCKED_THREADS.load(Ordering::SeqCst)
}

/// This process's id, kept current across `fork()` by a child handler: every operation checks it,
/// and asking the kernel each time is a system call on the path of every small tensor.
pub fn current_pid() -> u32 {
    static WATCHED: std::sync::Once = std::sync::Once::new();
    WATCHED.call_once(|| {
        PID.store(std::process::id(), Ordering::Relaxed);
        // SAFETY: registers a handler that only stores the child's id.
        unsafe { libc::pthread_atfork(None, None, Some(forked)) };
    });
    PID.load(Ordering::Relaxed)
}

static PID: AtomicU32 = AtomicU32::new(0);

extern "C" fn forked() {
    PID.store(std::process::id(), Ordering::Relaxed);
}

/// Does `blocking`'s work, as its driver says, without the GIL and interruptibly; the driver's
/// runtime is let go without the GIL too (dropping the last handle of one waits for its threads).
pub fn wait<F>(py: Python<'_>, blocking: Blocking<F>) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let Blocking { driver, work } = blocking;
    let done = match &driver {
        Driver::Caller(runtime) => drive_interruptibly(py, runtime, work),
        Driver::Runtime(handle) => wait_interruptibly(py, handle, work),
        Driver::Own(runtime) => wait_interruptibly(py, runtime.handle(), work),
    };
    py.detach(|| drop(driver));
    done
}

/// Like [`wait`], for work that reads the `lent` arrays, which are given back after it. Work cut
/// short (a timeout, a lost peer) can leave their bytes queued on a connection until it resets or
/// closes, and a caller runtime's connections only move while a thread drives it: so the thread
/// drives it on until the bytes are let go, for up to [`LEASE_GRACE`].
pub fn wait_lending<F>(
    py: Python<'_>,
    blocking: Blocking<F>,
    lent: Vec<HeldBuffer>,
) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let done = if matches!(blocking.driver, Driver::Caller(_)) {
        let returned: Vec<_> = lent.iter().map(HeldBuffer::returned).collect();
        wait(
            py,
            blocking.map(|work| async move {
                let output = work.await;
                // A send that finished has let go already: no timer on that path.
                if !returned.iter().all(|lent| lent.is_done()) {
                    let all_returned = join_all(returned.iter().map(|lent| lent.returned()));
                    let _ = tokio::time::timeout(LEASE_GRACE, all_returned).await;
                }
                output
            }),
        )
    } else {
        wait(py, blocking)
    };
    for held in lent {
        held.release(py);
    }
    done
}

/// The one interruptible wait: runs `slice` without the GIL again and again, checking for
/// signals in between so Ctrl-C raises KeyboardInterrupt (dropping whatever `slice` works on,
/// which abandons it cleanly), until it gives a result or `deadline` passes (`None`). Each slice
/// is given how long it may last.
pub fn in_slices<T: Send>(
    py: Python<'_>,
    deadline: Option<Instant>,
    mut slice: impl FnMut(Duration) -> Option<T> + Send,
) -> PyResult<Option<T>> {
    let _blocked = Blocked::enter();
    loop {
        let length = deadline.map_or(SIGNAL_CHECK, |d| {
            d.saturating_duration_since(Instant::now())
                .min(SIGNAL_CHECK)
        });
        if let Some(done) = py.detach(|| slice(length)) {
            return Ok(Some(done));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
        py.check_signals()?;
    }
}

/// Polls `future` on this thread inside the runtime's context, parking until its waker or the
/// next signal check. No timer is made for the wait itself: a stop that shuts the runtime down
/// mid-wait must not find a new one being registered.
pub fn wait_interruptibly<F>(py: Python<'_>, runtime: &Handle, future: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    Ok(wait_until(py, runtime, None, future)?.expect("no deadline"))
}

/// Like [`wait_interruptibly`], giving up at `deadline` (`None`: never): `None` then.
pub fn wait_until<F>(
    py: Python<'_>,
    runtime: &Handle,
    deadline: Option<Instant>,
    future: F,
) -> PyResult<Option<F::Output>>
where
    F: Future + Send,
    F::Output: Send,
{
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    in_slices(py, deadline, |length| {
        let _entered = runtime.enter();
        let mut context = Context::from_waker(&waker);
        let check_signals_at = Instant::now() + length;
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                return Some(output);
            }
            let left = check_signals_at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            std::thread::park_timeout(left);
        }
    })
}

/// Drives `future` on a current-thread runtime (the server's caller runtime), which this thread
/// runs itself while no other thread does.
fn drive_interruptibly<F>(
    py: Python<'_>,
    runtime: &tokio::runtime::Runtime,
    future: F,
) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let mut future = std::pin::pin!(future);
    let driven = in_slices(py, None, |length| {
        runtime.block_on(async { tokio::time::timeout(length, &mut future).await.ok() })
    })?;
    Ok(driven.expect("no deadline"))
}

/// Wakes a thread parked in [`wait_interruptibly`].
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}
