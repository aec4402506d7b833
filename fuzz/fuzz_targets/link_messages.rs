//! What a same-host peer sends on its link (length-prefixed `ShmMessage`s, inline tensors,
//! segment requests and commits, calls), served by the receiver's real loop over a socket pair:
//! it must refuse or serve, never panic or hang.
#![no_main]

use std::sync::Arc;

use distsrv::base::cluster::TaskId;
use distsrv::inbox::Inbox;
use distsrv::transport::shm::fuzzing::{serve_link_bytes, two_tasks};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let inbox = Arc::new(Inbox::new(two_tasks(), 4 << 20, 1.0));
    let _ = serve_link_bytes(Arc::clone(&inbox), TaskId::new("worker", 0), input);
    inbox.close();
});
