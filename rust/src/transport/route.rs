//! The way to a peer: the same-host link where the peer shares this host and user (proven by
//! the handshake, see [`super::shm`]), gRPC otherwise. The verdict is kept per peer: a peer that
//! refuses (shared memory off, another host, an older distsrv) gets gRPC from then on; a broken
//! link (the peer restarted) is dialled again.

use std::sync::Arc;

use super::peers::Peers;
use super::shm::{Link, Shm};
use crate::base::cluster::TaskId;
use crate::base::errors::Code;

/// The link to `to` among `peers`' connections for a tensor, counted as sent over one transport
/// or the other; `None`: use gRPC.
pub async fn for_tensor(shm: &Shm, peers: &Peers, to: &TaskId) -> Option<Arc<Link>> {
    let link = link(shm, peers, to).await;
    shm.count_sent(link.is_some());
    link
}

/// The link to `to` among `peers`' connections if `to` is on this host, dialling it on first
/// use; `None`: use gRPC. Each runtime has its own links (in its [`Peers`]), because a link's
/// socket answers to the runtime it was dialled on.
pub async fn link(shm: &Shm, peers: &Peers, to: &TaskId) -> Option<Arc<Link>> {
    if !shm.enabled() {
        return None;
    }
    let links = peers.links();
    if let Some(route) = links.known(to) {
        return route;
    }
    let _dialing = links.dialing().await;
    if let Some(route) = links.known(to) {
        return route;
    }
    let dialled = match peers.channel(to).await {
        Ok(channel) => shm.dial(channel, to).await,
        Err(error) => Err(error),
    };
    match dialled {
        Ok(link) => {
            links.settle(to, Some(Arc::clone(&link)));
            Some(link)
        }
        // The peer is not up yet, or the connection to it broke (it restarted): gRPC waits for
        // it, and the next send tries again.
        Err(error)
            if matches!(
                error.code,
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            ) =>
        {
            None
        }
        Err(_) => {
            links.settle(to, None);
            None
        }
    }
}
