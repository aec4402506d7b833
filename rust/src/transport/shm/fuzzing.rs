//! The receiver's half of a link, run over bytes a fuzz target makes up: only in fuzzing builds
//! (`--cfg fuzzing`), since the parser of link messages is the serving loop itself, tied to its
//! socket.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::serve::{CallServer, Serving, serve};
use super::socket::Socket;
use crate::base::cluster::{Cluster, TaskId};
use crate::base::errors::{Error, Result};
use crate::inbox::Inbox;
use crate::proto;
use crate::tensor::segment::SegmentPool;

/// Serves `input` as what the peer `source` (of `cluster`) sent on its link, into `inbox`,
/// answering calls with an empty value, until the input ends or the link is refused; drains
/// every answer. The serving loop's result: an error for off-protocol input, never a panic.
pub fn serve_link_bytes(inbox: Arc<Inbox>, source: TaskId, input: &[u8]) -> Result<()> {
    let failed = |e: std::io::Error| Error::internal(e.to_string());
    let (ours, mut theirs) = UnixStream::pair().map_err(failed)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(failed)?;
    let mut answers = theirs.try_clone().map_err(failed)?;
    let drain = std::thread::spawn(move || std::io::copy(&mut answers, &mut std::io::sink()));
    let input = input.to_vec();
    let send = std::thread::spawn(move || {
        let _ = theirs.write_all(&input);
        let _ = theirs.shutdown(std::net::Shutdown::Write);
    });
    let calls: CallServer = Arc::new(|_, _, _| Box::pin(async { Ok(proto::Value::default()) }));
    let serving = Arc::new(Serving {
        inbox,
        pool: Arc::new(SegmentPool::new(8)),
        received: Arc::new(AtomicU64::new(0)),
        calls_served: Arc::new(AtomicU64::new(0)),
        calls,
        max_message_bytes: 1 << 20,
    });
    let served = runtime.block_on(async move {
        let socket = Socket::new(ours).map_err(failed)?;
        let reader = socket.reader();
        let served = serve(Arc::clone(&socket), reader, source, serving).await;
        // Calls answer from tasks of their own: let them finish before the socket closes.
        tokio::task::yield_now().await;
        socket.shut_down();
        served
    });
    drop(runtime);
    let _ = send.join();
    let _ = drain.join();
    served
}

/// A cluster of the two tasks the fuzz target plays: the sender and this receiver.
pub fn two_tasks() -> Cluster {
    let tasks = [(0, "127.0.0.1:1".to_owned()), (1, "127.0.0.1:2".to_owned())];
    Cluster::new([("worker".to_owned(), tasks.into())].into()).expect("a valid cluster")
}
