//! Collectives over a group of tasks, built on the tensor exchange.
//!
//! Every message of a collective is a tensor sent under a name made of the group, the
//! collective's sequence number in that group and its step, so successive collectives never mix
//! as long as every member calls the group's collectives in the same order. Small reductions go
//! all-to-all in one round (one message time, the least latency); large ones go round a ring in
//! pieces, reduce-scatter then all-gather, so each task moves about 2(n-1)/n of the tensor and a
//! piece's reduction overlaps the next piece's transfer.
//!
//! Each element of a result is computed by exactly one task (or, all-to-all, by every task in the
//! same order), so results are bitwise identical everywhere. Members that disagree on dtype or
//! shape all fail with `InvalidArgument`, since every member sees every member's description
//! before reducing. A member lost mid-collective fails it with `Unavailable` on every member
//! still waiting, within the peer timeout, and the collective's pieces that reached this task
//! are dropped, now and on arrival. A member whose collective fails, for whatever reason, says
//! so in its heartbeat answers (the last [`ABANDONED_KEPT`] it gave up), so that a member still
//! waiting in it (frozen while the others gave up, or waiting without a timeout) fails with
//! `Aborted` too.
//!
//! Sequence numbers count per group *and* per incarnation of its members: a member that
//! restarts counts from one again, and so do the others once they see it back, so the group
//! works again as soon as all its members are up.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::try_join_all;

use crate::base::cluster::TaskId;
use crate::base::errors::{Error, Result, within};
use crate::exchange::Exchange;
use crate::proto::DataType;
use crate::tensor::reduce::{self, ReduceOp};
use crate::tensor::{Tensor, TensorBuf, TensorMeta, dtype_name, itemsize};
use crate::transport::Peers;

/// A reduction goes all-to-all while each task sends at most this much that way; beyond, round
/// the ring. With two tasks both move the same bytes, and all-to-all saves the ring's steps.
const ALL_TO_ALL_BYTES: usize = 2 << 20;
/// Ring messages carry at most this much of a segment.
const PIECE_BYTES: usize = 4 << 20;

/// How many of the collectives this task gave up it tells its peers of.
const ABANDONED_KEPT: usize = 16;

/// Per group and incarnations of its members, how many collectives this task has begun; and
/// which it gave up lately.
pub struct Collectives {
    /// This task's incarnation, its part of every group's.
    incarnation: u64,
    sequences: Mutex<HashMap<(Vec<TaskId>, u64), u64>>,
    /// The ids of the last collectives this task gave up, newest last.
    abandoned: Mutex<VecDeque<u64>>,
}

impl Collectives {
    pub fn new(incarnation: u64) -> Self {
        Self {
            incarnation,
            sequences: Mutex::default(),
            abandoned: Mutex::default(),
        }
    }

    /// The ids of the collectives this task gave up lately, newest last.
    pub fn abandoned(&self) -> Vec<u64> {
        self.abandoned_list().iter().copied().collect()
    }

    fn abandon(&self, id: u64) {
        let mut abandoned = self.abandoned_list();
        if abandoned.len() == ABANDONED_KEPT {
            abandoned.pop_front();
        }
        abandoned.push_back(id);
    }

    fn abandoned_list(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        self.abandoned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This task's part in the next collective of `group`, failing after `timeout` if given. Its
    /// messages go over `connections`, those of the runtime that will drive it.
    ///
    /// The collective takes its sequence number once every member is up: check whatever the
    /// call can refuse on its own before running it, since a collective that took a number and
    /// then sent nothing leaves this task out of step with the rest of the group.
    pub fn begin(
        self: &Arc<Self>,
        exchange: &Arc<Exchange>,
        connections: &Arc<Peers>,
        group: Group,
        timeout: Option<Duration>,
    ) -> Collective {
        Collective {
            collectives: Arc::clone(self),
            exchange: Arc::clone(exchange),
            connections: Arc::clone(connections),
            prefix: OnceLock::new(),
            group,
            timeout,
        }
    }

    /// The next sequence number of `group` with its members' `incarnations`.
    fn next(&self, group: &Group, incarnations: u64) -> u64 {
        let mut sequences = self.sequences.lock().unwrap_or_else(|e| e.into_inner());
        let next = sequences
            .entry((group.members.clone(), incarnations))
            .or_default();
        *next += 1;
        *next
    }
}

/// The incarnations of a group's members, in rank order, as one number: the same on every
/// member that sees the same incarnations, and new when any member restarts.
fn fingerprint(incarnations: &[u64]) -> u64 {
    fnv1a(
        incarnations
            .iter()
            .flat_map(|incarnation| incarnation.to_le_bytes()),
    )
}

/// A collective's id, as members tell each other which they gave up: its name prefix's hash.
fn collective_id(prefix: &str) -> u64 {
    fnv1a(prefix.bytes())
}

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The tasks of a collective, including this one.
pub struct Group {
    /// In (job, index) order; a member's rank is its position.
    members: Vec<TaskId>,
    /// This task's rank.
    rank: usize,
}

impl Group {
    /// `members` of the cluster (all of its tasks when `None`), which must include this task.
    pub fn new(exchange: &Exchange, members: Option<Vec<TaskId>>) -> Result<Self> {
        let cluster = exchange.peers().cluster();
        let mut members = match members {
            Some(members) => members,
            None => cluster.tasks().collect(),
        };
        for member in &members {
            cluster.require(member)?;
        }
        members.sort();
        members.dedup();
        let mut group = Self { members, rank: 0 };
        group.rank = group.rank_of(exchange.me())?;
        Ok(group)
    }

    /// `task`'s rank, or `InvalidArgument` if it is not a member.
    pub fn rank_of(&self, task: &TaskId) -> Result<usize> {
        self.members
            .iter()
            .position(|member| member == task)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "task {task} is not a member of the group [{self}]"
                ))
            })
    }
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.members.iter().map(TaskId::to_string).collect();
        f.write_str(&names.join(","))
    }
}

/// One collective call, as this task takes part in it.
pub struct Collective {
    collectives: Arc<Collectives>,
    exchange: Arc<Exchange>,
    connections: Arc<Peers>,
    group: Group,
    /// What every message of this collective is named under, set once every member is up.
    prefix: OnceLock<String>,
    timeout: Option<Duration>,
}

impl Collective {
    /// The element-wise reduction of every member's `data` (a `meta` tensor).
    pub async fn all_reduce(self, op: ReduceOp, meta: TensorMeta, data: Bytes) -> Result<Tensor> {
        op.check(meta.dtype)?;
        let n = self.group.members.len();
        let work = async {
            // Empty tensors take the ring, so that an all-to-all head is never empty and never
            // taken for a description (see `agree`).
            if !data.is_empty() && data.len() * (n - 1) <= ALL_TO_ALL_BYTES {
                let all = self.agree(&meta, Some(data)).await?;
                let mut acc = TensorBuf::from_slice(&all[0].1);
                for (_, other) in &all[1..] {
                    reduce::combine(op, meta.dtype, acc.as_mut_slice(), other)?;
                }
                if op == ReduceOp::Mean {
                    reduce::divide(meta.dtype, acc.as_mut_slice(), n);
                }
                return Ok(Tensor { meta, data: acc });
            }
            self.agree(&meta, None).await?;
            let layout = Layout::new(&meta, n);
            let own = self.reduce_scatter_ring(op, &meta, &data, &layout).await?;
            let pieces = self.all_gather_ring(own, &layout).await?;
            let mut out = TensorBuf::new(data.len());
            for (piece, segments) in pieces.iter().enumerate() {
                for (segment, bytes) in segments.iter().enumerate() {
                    out.as_mut_slice()[layout.range(segment, piece)].copy_from_slice(bytes);
                }
            }
            Ok(Tensor { meta, data: out })
        };
        self.guarded("all_reduce", work).await
    }

    /// The reduction of every member's `data`, split along the first dimension: member `r` of `n`
    /// gets rows `r*m .. (r+1)*m` of `n*m`.
    pub async fn reduce_scatter(
        self,
        op: ReduceOp,
        meta: TensorMeta,
        data: Bytes,
    ) -> Result<Tensor> {
        op.check(meta.dtype)?;
        let n = self.group.members.len() as u64;
        let work = async {
            self.agree(&meta, None).await?;
            let rows = match meta.shape.first() {
                Some(rows) if rows % n == 0 => rows / n,
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "reduce_scatter splits the first dimension among {n} tasks, so it must be \
                         a multiple of {n}; the shape is {:?}",
                        meta.shape
                    )));
                }
            };
            let layout = Layout::new(&meta, n as usize);
            let own = self.reduce_scatter_ring(op, &meta, &data, &layout).await?;
            let mut out = TensorBuf::new(own.iter().map(Bytes::len).sum());
            let mut at = 0;
            for piece in own {
                out.as_mut_slice()[at..at + piece.len()].copy_from_slice(&piece);
                at += piece.len();
            }
            let mut shape = meta.shape.clone();
            shape[0] = rows;
            Ok(Tensor {
                meta: TensorMeta {
                    dtype: meta.dtype,
                    shape,
                },
                data: out,
            })
        };
        self.guarded("reduce_scatter", work).await
    }

    /// Every member's `data`, stacked in rank order along a new first dimension.
    pub async fn all_gather(self, meta: TensorMeta, data: Bytes) -> Result<Tensor> {
        let work = async {
            let all = self.all_to_all("gather", meta.clone(), data).await?;
            self.check_same(all.iter().map(|(meta, _)| meta))?;
            let size = all[0].1.len();
            let mut out = TensorBuf::new(size * all.len());
            for (rank, (_, bytes)) in all.iter().enumerate() {
                out.as_mut_slice()[rank * size..(rank + 1) * size].copy_from_slice(bytes);
            }
            let mut shape = vec![all.len() as u64];
            shape.extend(&meta.shape);
            Ok(Tensor {
                meta: TensorMeta {
                    dtype: meta.dtype,
                    shape,
                },
                data: out,
            })
        };
        self.guarded("all_gather", work).await
    }

    /// `root`'s tensor on every member. The root must give one; another member may give one too,
    /// to have its dtype and shape checked against the root's.
    pub async fn broadcast(
        self,
        root: &TaskId,
        given: Option<(TensorMeta, Bytes)>,
    ) -> Result<Tensor> {
        let root = self.group.rank_of(root)?;
        let work = async {
            if self.group.rank == root {
                let (meta, data) = given.ok_or_else(|| {
                    Error::invalid_argument("the root of a broadcast must give the tensor")
                })?;
                let others = self.others();
                try_join_all(
                    others.map(|rank| self.send(rank, "broadcast", meta.clone(), data.clone())),
                )
                .await?;
                return Ok(Tensor {
                    meta,
                    data: TensorBuf::from_slice(&data),
                });
            }
            let received = self.recv(root, "broadcast").await?;
            if let Some((meta, _)) = given
                && meta != received.meta
            {
                return Err(Error::invalid_argument(format!(
                    "this task gave {meta}, the root {} broadcast {}",
                    self.group.members[root], received.meta
                )));
            }
            Ok(received)
        };
        self.guarded("broadcast", work).await
    }

    /// Returns once every member has called it.
    pub async fn barrier(self) -> Result<()> {
        let work = async {
            let nothing = TensorMeta {
                dtype: DataType::DtBool,
                shape: vec![0],
            };
            self.all_to_all("barrier", nothing, Bytes::new()).await?;
            Ok(())
        };
        self.guarded("barrier", work).await
    }

    /// Runs `work` once every member is up, until it ends, the timeout passes, a member is lost
    /// or another gives the collective up; a failed collective's pieces are dropped, and the
    /// other members told.
    async fn guarded<T>(&self, what: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
        let liveness = self.exchange.liveness();
        let work = async {
            self.name_messages().await?;
            let id = collective_id(self.prefix.get().expect("named above"));
            let abandoned = self
                .others()
                .map(|rank| Box::pin(liveness.abandoned(&self.group.members[rank], id)));
            let abandoned: Vec<_> = abandoned.collect();
            if abandoned.is_empty() {
                return work.await;
            }
            tokio::select! {
                biased;
                done = work => done,
                (gave_up, _, _) = futures::future::select_all(abandoned) => Err(gave_up),
            }
        };
        let watched = self
            .others()
            .map(|rank| Box::pin(liveness.lost(&self.group.members[rank])));
        let lost = async {
            let watched: Vec<_> = watched.collect();
            if watched.is_empty() {
                std::future::pending().await
            } else {
                futures::future::select_all(watched).await.0
            }
        };
        let watched_work = async {
            tokio::select! {
                biased;
                done = work => done,
                lost = lost => Err(lost),
            }
        };
        let done = within(self.timeout, "not done", watched_work).await;
        if done.is_err()
            && let Some(prefix) = self.prefix.get()
        {
            self.exchange.abandon(prefix);
            self.collectives.abandon(collective_id(prefix));
        }
        done.map_err(|e| {
            e.context(format!(
                "{what} of {} tasks at {}",
                self.group.members.len(),
                self.exchange.me()
            ))
        })
    }

    /// Waits until every member is up, then takes this collective's sequence number among
    /// those incarnations of the members.
    async fn name_messages(&self) -> Result<()> {
        let liveness = self.exchange.liveness();
        let others = self.others().map(|rank| {
            let member = &self.group.members[rank];
            async move { Ok::<_, Error>((rank, liveness.incarnation(member).await?)) }
        });
        let mut incarnations = vec![self.collectives.incarnation; self.group.members.len()];
        for (rank, incarnation) in try_join_all(others).await? {
            incarnations[rank] = incarnation;
        }
        let fingerprint = fingerprint(&incarnations);
        let sequence = self.collectives.next(&self.group, fingerprint);
        let group = &self.group;
        let _ = self.prefix.set(format!(
            "/distsrv/collective/[{group}]/{fingerprint:016x}/{sequence}"
        ));
        Ok(())
    }

    /// The name of this collective's message of `step`.
    fn message(&self, step: &str) -> String {
        let prefix = self.prefix.get().map_or("", String::as_str);
        format!("{prefix}/{step}")
    }

    fn others(&self) -> impl Iterator<Item = usize> + use<> {
        let me = self.group.rank;
        (0..self.group.members.len()).filter(move |rank| *rank != me)
    }

    async fn send(&self, rank: usize, step: &str, meta: TensorMeta, data: Bytes) -> Result<()> {
        let to = self.group.members[rank].clone();
        let name = self.message(step);
        self.exchange
            .send_via(&self.connections, to, name, meta, data)?
            .await
    }

    async fn recv(&self, rank: usize, step: &str) -> Result<Tensor> {
        let source = self.group.members[rank].clone();
        let name = self.message(step);
        self.exchange.recv(source, name, None).await
    }

    /// Sends `data` to every other member and receives theirs: every member's, in rank order.
    async fn all_to_all(
        &self,
        step: &str,
        meta: TensorMeta,
        data: Bytes,
    ) -> Result<Vec<(TensorMeta, Bytes)>> {
        let sends = try_join_all(
            self.others()
                .map(|rank| self.send(rank, step, meta.clone(), data.clone())),
        );
        let receives = try_join_all(self.others().map(|rank| self.recv(rank, step)));
        let (_, received) = futures::try_join!(sends, receives)?;
        let mut all: Vec<_> = received
            .into_iter()
            .map(|tensor| (tensor.meta, Bytes::from_owner(tensor.data)))
            .collect();
        all.insert(self.group.rank, (meta, data));
        Ok(all)
    }

    /// The first step of a reduction: every member sends the others its tensor, when it goes
    /// all-to-all, or else only a description of it, and checks that all members have the same
    /// dtype and shape before any of them reduces. Both paths begin with this one step, so members
    /// that would take different paths meet here and all fail alike. Returns what was sent.
    async fn agree(
        &self,
        meta: &TensorMeta,
        data: Option<Bytes>,
    ) -> Result<Vec<(TensorMeta, Bytes)>> {
        // A description is an empty tensor whose shape is the real one plus a last dimension of
        // 0: dtype and shape, no payload. A tensor sent whole is never empty.
        let whole = data.is_some();
        let head = match data {
            Some(data) => (meta.clone(), data),
            None => {
                let mut shape = meta.shape.clone();
                shape.push(0);
                let dtype = meta.dtype;
                (TensorMeta { dtype, shape }, Bytes::new())
            }
        };
        let heads = self.all_to_all("head", head.0, head.1).await?;
        // Every member sends the same kind of head for the same tensor: one that does not (a
        // forged or broken peer) must not pass for a tensor of no bytes.
        if let Some(rank) = odd_head(whole, &heads) {
            let (sent, expected) = if whole {
                ("a description", "the tensor itself")
            } else {
                ("a tensor", "a description")
            };
            return Err(Error::invalid_argument(format!(
                "{} sent {sent} where {expected} was due",
                self.group.members[rank]
            )));
        }
        let described: Vec<_> = heads
            .iter()
            .map(|(meta, data)| {
                let mut meta = meta.clone();
                if data.is_empty() {
                    meta.shape.pop();
                }
                meta
            })
            .collect();
        self.check_same(described.iter())?;
        Ok(heads)
    }

    fn check_same<'a>(&self, metas: impl Iterator<Item = &'a TensorMeta>) -> Result<()> {
        let metas: Vec<_> = metas.collect();
        if metas.windows(2).all(|pair| pair[0] == pair[1]) {
            return Ok(());
        }
        let described: Vec<_> = self
            .group
            .members
            .iter()
            .zip(&metas)
            .map(|(task, meta)| format!("{task} has {meta}"))
            .collect();
        Err(Error::invalid_argument(format!(
            "the tasks disagree on the tensor: {}",
            described.join(", ")
        )))
    }

    /// Ring reduce-scatter: afterwards this task holds the reduction of its own segment (its
    /// rank's), as pieces. Each piece travels its own chain of n-1 steps, all chains at once.
    async fn reduce_scatter_ring(
        &self,
        op: ReduceOp,
        meta: &TensorMeta,
        data: &Bytes,
        layout: &Layout,
    ) -> Result<Vec<Bytes>> {
        let n = self.group.members.len();
        let (next, prev) = ((self.group.rank + 1) % n, (self.group.rank + n - 1) % n);
        // At step s this task sends segment rank-s-1 and receives segment rank-s-2, so the last
        // step (n-2) brings in its own.
        let sent_at = |step: usize| (self.group.rank + 2 * n - step - 1) % n;
        let chains = (0..layout.pieces).map(|piece| async move {
            let mut carried = data.slice(layout.range(sent_at(0), piece));
            for step in 0..n - 1 {
                let step_name = format!("rs{step}.{piece}");
                let sent = self.send(next, &step_name, layout.meta(&carried), carried);
                let (_, mut received) = futures::try_join!(sent, self.recv(prev, &step_name))?;
                let range = layout.range(sent_at(step + 1), piece);
                layout.check(&received, range.len())?;
                reduce::combine(op, meta.dtype, received.data.as_mut_slice(), &data[range])?;
                if step == n - 2 && op == ReduceOp::Mean {
                    reduce::divide(meta.dtype, received.data.as_mut_slice(), n);
                }
                carried = Bytes::from_owner(received.data);
            }
            Ok(carried)
        });
        try_join_all(chains).await
    }

    /// Ring all-gather of every member's own segment, given as pieces: every segment's pieces,
    /// by piece then segment.
    async fn all_gather_ring(&self, own: Vec<Bytes>, layout: &Layout) -> Result<Vec<Vec<Bytes>>> {
        let n = self.group.members.len();
        let (next, prev) = ((self.group.rank + 1) % n, (self.group.rank + n - 1) % n);
        let chains = own.into_iter().enumerate().map(|(piece, mine)| async move {
            let mut segments = vec![Bytes::new(); n];
            segments[self.group.rank] = mine.clone();
            let mut carried = mine;
            for step in 0..n - 1 {
                let step_name = format!("ag{step}.{piece}");
                let sent = self.send(next, &step_name, layout.meta(&carried), carried);
                let (_, received) = futures::try_join!(sent, self.recv(prev, &step_name))?;
                let segment = (self.group.rank + 2 * n - step - 1) % n;
                layout.check(&received, layout.range(segment, piece).len())?;
                carried = Bytes::from_owner(received.data);
                segments[segment] = carried.clone();
            }
            Ok::<_, Error>(segments)
        });
        try_join_all(chains).await
    }
}

/// How a ring cuts a tensor: `n` segments of whole elements, as even as can be, each cut into
/// the same number of pieces.
struct Layout {
    dtype: DataType,
    itemsize: usize,
    /// Element offsets of the segments: segment `i` is `bounds[i]..bounds[i + 1]`.
    bounds: Vec<usize>,
    pieces: usize,
}

impl Layout {
    fn new(meta: &TensorMeta, n: usize) -> Self {
        let itemsize = itemsize(meta.dtype).expect("a checked dtype");
        let elements = meta.byte_len().expect("a checked shape") as usize / itemsize;
        let bounds: Vec<usize> = (0..=n).map(|i| i * elements / n).collect();
        let largest = bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        Self {
            dtype: meta.dtype,
            itemsize,
            bounds,
            pieces: (largest * itemsize).div_ceil(PIECE_BYTES).max(1),
        }
    }

    /// Byte range of `piece` of `segment` in the whole tensor.
    fn range(&self, segment: usize, piece: usize) -> Range<usize> {
        let (start, end) = (self.bounds[segment], self.bounds[segment + 1]);
        let at = |p: usize| (start + (end - start) * p / self.pieces) * self.itemsize;
        at(piece)..at(piece + 1)
    }

    fn meta(&self, piece: &Bytes) -> TensorMeta {
        TensorMeta {
            dtype: self.dtype,
            shape: vec![(piece.len() / self.itemsize) as u64],
        }
    }

    /// A piece from a peer has the layout's dtype and size, or the peers are not running the
    /// same collective.
    fn check(&self, received: &Tensor, bytes: usize) -> Result<()> {
        if received.meta.dtype == self.dtype && received.data.len() == bytes {
            Ok(())
        } else {
            Err(Error::invalid_argument(format!(
                "a peer sent a {} piece of {} bytes where a {} piece of {bytes} was due",
                dtype_name(received.meta.dtype),
                received.data.len(),
                dtype_name(self.dtype)
            )))
        }
    }
}

/// The rank of the first head of another kind than this task's (`whole`: the tensor itself, or
/// else a description, which carries no bytes).
fn odd_head(whole: bool, heads: &[(TensorMeta, Bytes)]) -> Option<usize> {
    heads.iter().position(|(_, data)| data.is_empty() == whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_of_the_wrong_kind_is_found() {
        let meta = TensorMeta {
            dtype: DataType::DtUint8,
            shape: vec![2],
        };
        let tensor = (meta.clone(), Bytes::from_static(&[1, 2]));
        let description = (meta, Bytes::new());
        let heads = [tensor.clone(), description.clone(), tensor.clone()];
        assert_eq!(odd_head(true, &heads), Some(1));
        assert_eq!(odd_head(false, &heads), Some(0));
        assert_eq!(odd_head(true, &[tensor.clone(), tensor]), None);
        assert_eq!(odd_head(false, &[description.clone(), description]), None);
    }

    #[test]
    fn a_layout_covers_the_tensor_once_in_order() {
        for (elements, n) in [(10usize, 3usize), (2, 4), (3 << 20, 2), (0, 2)] {
            let meta = TensorMeta {
                dtype: DataType::DtFloat,
                shape: vec![elements as u64],
            };
            let layout = Layout::new(&meta, n);
            let mut next = 0;
            for segment in 0..n {
                for piece in 0..layout.pieces {
                    let range = layout.range(segment, piece);
                    assert_eq!(range.start, next, "{elements} elements over {n}");
                    assert!(range.len() <= PIECE_BYTES);
                    next = range.end;
                }
            }
            assert_eq!(next, elements * 4);
        }
    }
}
