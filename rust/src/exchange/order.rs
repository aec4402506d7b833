//! Sends to the same (task, name) are delivered in call order: each waits for the previous one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::base::cluster::TaskId;

/// Destination and name: sends sharing one are delivered in call order.
type Line = (TaskId, String);
/// Per line, the id of the newest send and what signals its end.
type LineEnds = HashMap<Line, (u64, oneshot::Receiver<()>)>;

/// Keeps sends to the same (task, name) in call order: each send waits for the previous one.
#[derive(Default)]
pub struct SendOrder {
    last: Mutex<LineEnds>,
    next_id: AtomicU64,
}

impl SendOrder {
    pub fn take_turn(self: &Arc<Self>, to: &TaskId, name: &str) -> Turn {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, finished) = oneshot::channel();
        let slot = (to.clone(), name.to_owned());
        let previous = self
            .lock()
            .insert(slot.clone(), (id, finished))
            .map(|(_, previous)| previous);
        Turn {
            order: Arc::clone(self),
            slot,
            id,
            previous,
            _done: done,
        }
    }

    fn lock(&self) -> MutexGuard<'_, LineEnds> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A send's place in line; dropping it (send finished or abandoned) lets the next one go.
pub struct Turn {
    order: Arc<SendOrder>,
    slot: Line,
    id: u64,
    previous: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
}

impl Turn {
    pub async fn wait(mut self) -> Self {
        if let Some(previous) = self.previous.take() {
            // An error means the previous send ended without signalling: it is over either way.
            let _ = previous.await;
        }
        self
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut last = self.order.lock();
        // The last send of a name leaves no entry behind, so names used once do not pile up.
        if last.get(&self.slot).is_some_and(|(id, _)| *id == self.id) {
            last.remove(&self.slot);
        }
    }
}
