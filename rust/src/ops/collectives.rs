//! Collectives over a group of tasks, built on the tensor exchange.
//!
//! Every message of a collective is a tensor sent under a name made of the group, the
//! collective's sequence number in that group and its step, so successive collectives never mix
//! as long as every member calls the group's collectives in the same order.
//!
//! Members agree or fail together: the first step of every collective is a head from each member
//! to each other, saying what it called (the collective, its op and root, the tensor it gives, the
//! order it gave the members in), and every member checks all heads before going on. Members
//! that called different collectives, or one with other arguments, all fail with
//! `InvalidArgument` within that one round, saying what each called. A small payload rides in
//! the head itself, so small reductions, gathers and broadcasts take that one round (the least
//! latency); large ones follow it. Large reductions go round a ring in pieces, reduce-scatter
//! then all-gather, so each task moves about 2(n-1)/n of the tensor and a piece's reduction
//! overlaps the next piece's transfer.
//!
//! Each element of a result is computed by exactly one task (or, all-to-all, by every task in the
//! same order), so results are bitwise identical everywhere. A member lost mid-collective fails
//! it with `Unavailable` on every member still waiting, within the peer timeout, and the
//! collective's pieces that reached this task are dropped, now and on arrival. A member whose
//! collective fails, for whatever reason, says so in its heartbeat answers (the last
//! [`ABANDONED_KEPT`] it gave up), so that a member still waiting in it (frozen while the others
//! gave up, or waiting without a timeout) fails with `Aborted` too. A collective that times out
//! names the members that never joined it.
//!
//! Sequence numbers count per group *and* per incarnation of its members: a member that
//! restarts counts from one again, and so do the others once they see it back, so the group
//! works again as soon as all its members are up. A group's collectives take their numbers in
//! the order they were called, even those started in the background, which each wait for the
//! members on their own.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::try_join_all;
use prost::Message;
use tokio::sync::Notify;

use crate::base::cluster::TaskId;
use crate::base::errors::{Code, Error, Result, within};
use crate::exchange::Exchange;
use crate::proto::{self, DataType};
use crate::tensor::reduce::{self, ReduceOp};
use crate::tensor::{
    COLLECTIVE_NAMES, ResultMemory, Tensor, TensorBuf, TensorMeta, dtype_name, itemsize,
};
use crate::transport::Peers;
use crate::wire;

/// A reduction goes all-to-all while each task sends at most this much that way; beyond, round
/// the ring. With two tasks both move the same bytes, and all-to-all saves the ring's steps.
const ALL_TO_ALL_BYTES: usize = 2 << 20;
/// A payload up to this size rides in the head (one copy, one message); a larger one follows it
/// in a message of its own, straight from the caller's memory.
const INLINE_BYTES: usize = ALL_TO_ALL_BYTES;
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
    /// Per group (its members sorted), the order its collectives were called in.
    turns: Mutex<HashMap<Vec<TaskId>, Turns>>,
    /// Told whenever a collective's turn passes.
    turn_passed: Notify,
    /// The ids of the last collectives this task gave up, newest last.
    abandoned: Mutex<VecDeque<u64>>,
}

impl Collectives {
    pub fn new(incarnation: u64) -> Self {
        Self {
            incarnation,
            sequences: Mutex::default(),
            turns: Mutex::default(),
            turn_passed: Notify::new(),
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
    /// call can refuse on its own ([`Group::check`]) before running it, since a collective that
    /// took a number and then sent nothing leaves this task out of step with the rest of the
    /// group.
    pub fn begin(
        self: &Arc<Self>,
        exchange: &Arc<Exchange>,
        connections: &Arc<Peers>,
        group: Group,
        timeout: Option<Duration>,
    ) -> Collective {
        let turn = {
            let mut turns = self.turns_by_group();
            let turns = turns.entry(group.sorted.clone()).or_default();
            turns.called += 1;
            turns.called
        };
        Collective {
            turn,
            collectives: Arc::clone(self),
            exchange: Arc::clone(exchange),
            connections: Arc::clone(connections),
            prefix: OnceLock::new(),
            joined: (0..group.members.len())
                .map(|rank| AtomicBool::new(rank == group.rank))
                .collect(),
            group,
            timeout,
        }
    }

    /// The next sequence number of `group` with its members' `incarnations`, for its collective
    /// called `turn`th, once every collective of the group called before has taken its own.
    async fn next(&self, group: &Group, turn: u64, incarnations: u64) -> u64 {
        loop {
            let passed = self.turn_passed.notified();
            let mut passed = std::pin::pin!(passed);
            passed.as_mut().enable();
            if let Some(sequence) = self.try_next(group, turn, incarnations) {
                return sequence;
            }
            passed.await;
        }
    }

    fn try_next(&self, group: &Group, turn: u64, incarnations: u64) -> Option<u64> {
        let mut turns = self.turns_by_group();
        let turns = turns.get_mut(&group.sorted).expect("begun");
        if turns.passed + 1 != turn {
            return None;
        }
        let mut sequences = self.sequences.lock().unwrap_or_else(|e| e.into_inner());
        let next = sequences
            .entry((group.sorted.clone(), incarnations))
            .or_default();
        *next += 1;
        turns.pass();
        self.turn_passed.notify_waiters();
        Some(*next)
    }

    /// `group`'s collective called `turn`th gives up its turn without a number.
    fn forgo(&self, group: &Group, turn: u64) {
        let mut turns = self.turns_by_group();
        let turns = turns.get_mut(&group.sorted).expect("begun");
        if turns.passed + 1 == turn {
            turns.pass();
            self.turn_passed.notify_waiters();
        } else {
            turns.forgone.insert(turn);
        }
    }

    fn turns_by_group(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<TaskId>, Turns>> {
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How far a group's collectives, in the order they were called, have taken their numbers.
#[derive(Default)]
struct Turns {
    called: u64,
    /// Every collective called up to this one has taken its number or given its turn up.
    passed: u64,
    /// Turns given up out of order, passed once those before them are.
    forgone: BTreeSet<u64>,
}

impl Turns {
    fn pass(&mut self) {
        self.passed += 1;
        while self.forgone.remove(&(self.passed + 1)) {
            self.passed += 1;
        }
    }
}

/// The incarnations of a group's members, in (job, index) order, as one number: the same on
/// every member that sees the same incarnations, and new when any member restarts.
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

/// What a member calls, with the arguments all members must agree on.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// The element-wise reduction of every member's tensor, on every member.
    AllReduce(ReduceOp),
    /// The reduction, split along the first dimension: of `n * m` rows, rank `r` gets rows
    /// `r * m .. (r + 1) * m`.
    ReduceScatter(ReduceOp),
    /// Every member's tensor, stacked in rank order along a new first dimension.
    AllGather,
    /// The root's tensor on every member. Another member may give one too, to have its dtype
    /// and shape checked against the root's.
    Broadcast {
        root: TaskId,
    },
    Barrier,
    /// The reduction on the root only.
    Reduce {
        op: ReduceOp,
        root: TaskId,
    },
    /// Every member's tensor, stacked in rank order, on the root only.
    Gather {
        root: TaskId,
    },
    /// Row `r` of the root's tensor (whose first dimension is the group's size) on rank `r`.
    Scatter {
        root: TaskId,
    },
    /// Row `j` of every member's tensor (whose first dimension is the group's size) to rank
    /// `j`: rank `j` gets the rows, stacked in rank order.
    AllToAll,
}

impl Kind {
    /// The collective called `name`, with `op` for those that reduce and `root` for those that
    /// have one.
    pub fn new(name: &str, op: Option<ReduceOp>, root: Option<TaskId>) -> Result<Self> {
        let needs = |what: &str| Error::invalid_argument(format!("{name} needs {what}"));
        let op = || op.ok_or_else(|| needs("an op"));
        let root = || root.clone().ok_or_else(|| needs("a root"));
        Ok(match name {
            "all_reduce" => Self::AllReduce(op()?),
            "reduce_scatter" => Self::ReduceScatter(op()?),
            "all_gather" => Self::AllGather,
            "broadcast" => Self::Broadcast { root: root()? },
            "barrier" => Self::Barrier,
            "reduce" => Self::Reduce {
                op: op()?,
                root: root()?,
            },
            "gather" => Self::Gather { root: root()? },
            "scatter" => Self::Scatter { root: root()? },
            "all_to_all" => Self::AllToAll,
            _ => {
                return Err(Error::invalid_argument(format!("no collective {name:?}")));
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::AllReduce(_) => "all_reduce",
            Self::ReduceScatter(_) => "reduce_scatter",
            Self::AllGather => "all_gather",
            Self::Broadcast { .. } => "broadcast",
            Self::Barrier => "barrier",
            Self::Reduce { .. } => "reduce",
            Self::Gather { .. } => "gather",
            Self::Scatter { .. } => "scatter",
            Self::AllToAll => "all_to_all",
        }
    }

    fn op(&self) -> Option<ReduceOp> {
        match self {
            Self::AllReduce(op) | Self::ReduceScatter(op) | Self::Reduce { op, .. } => Some(*op),
            _ => None,
        }
    }

    fn root(&self) -> Option<&TaskId> {
        match self {
            Self::Broadcast { root }
            | Self::Reduce { root, .. }
            | Self::Gather { root }
            | Self::Scatter { root } => Some(root),
            _ => None,
        }
    }
}

/// Whether the member of `rank` in a collective named `kind`, with the root at `root`, must give
/// a tensor (`Some(true)`), must not (`Some(false)`), or may (`None`).
fn gives(kind: &str, rank: usize, root: Option<usize>) -> Option<bool> {
    let is_root = root == Some(rank);
    match kind {
        "barrier" => Some(false),
        "scatter" => Some(is_root),
        "broadcast" => is_root.then_some(true),
        _ => Some(true),
    }
}

/// The tasks of a collective, including this one.
pub struct Group {
    /// In the order given; a member's rank is its position.
    members: Vec<TaskId>,
    /// The members in (job, index) order, which names the group's messages: members that list
    /// the group in different orders still meet, and find that they differ.
    sorted: Vec<TaskId>,
    /// This task's rank.
    rank: usize,
}

impl Group {
    /// `members` of the cluster in rank order (all of its tasks, in cluster order, when `None`),
    /// which must include this task once.
    pub fn new(exchange: &Exchange, members: Option<Vec<TaskId>>) -> Result<Self> {
        let cluster = exchange.peers().cluster();
        let members = match members {
            Some(members) => members,
            None => cluster.tasks().collect(),
        };
        for member in &members {
            cluster.require(member)?;
        }
        let mut sorted = members.clone();
        sorted.sort();
        if let Some(twice) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(Error::invalid_argument(format!(
                "task {} is listed twice in the group",
                twice[0]
            )));
        }
        let mut group = Self {
            members,
            sorted,
            rank: 0,
        };
        group.rank = group.rank_of(exchange.me())?;
        Ok(group)
    }

    /// Whether an all_reduce of `bytes` goes round a ring (which can write its result into its
    /// input's memory) rather than all-to-all.
    pub fn rings(&self, bytes: usize) -> bool {
        bytes * (self.members.len() - 1) > ALL_TO_ALL_BYTES
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

    /// Refuses what this member's call of `kind`, giving a tensor `given`, cannot do whatever
    /// the others call.
    pub fn check(&self, kind: &Kind, given: Option<&TensorMeta>) -> Result<()> {
        let root = kind.root().map(|root| self.rank_of(root)).transpose()?;
        let name = kind.name();
        match (gives(kind.name(), self.rank, root), given) {
            (Some(true), None) => {
                let whose = if root.is_some() {
                    "its root"
                } else {
                    "every member"
                };
                return Err(Error::invalid_argument(format!(
                    "{name} needs a tensor from {whose}"
                )));
            }
            (Some(false), Some(_)) => {
                let whose = if root.is_some() {
                    "only its root gives"
                } else {
                    "it takes"
                };
                return Err(Error::invalid_argument(format!(
                    "{name} takes no tensor here: {whose} none"
                )));
            }
            _ => {}
        }
        let Some(meta) = given else { return Ok(()) };
        if let Some(op) = kind.op() {
            op.check(meta.dtype)?;
        }
        let n = self.members.len() as u64;
        let first = meta.shape.first().copied();
        let fits = match kind {
            Kind::ReduceScatter(_) => first.is_some_and(|rows| rows % n == 0),
            Kind::AllToAll | Kind::Scatter { .. } => first == Some(n),
            _ => true,
        };
        if !fits {
            let must = if matches!(kind, Kind::ReduceScatter(_)) {
                format!("a multiple of {n}")
            } else {
                n.to_string()
            };
            return Err(Error::invalid_argument(format!(
                "{name} splits the first dimension among the group's {n} tasks, so it must be \
                 {must}; the shape is {:?}",
                meta.shape
            )));
        }
        Ok(())
    }

    /// FNV-1a of the members' names in rank order.
    fn order(&self) -> u64 {
        fnv1a(
            self.members
                .iter()
                .flat_map(|member| member.to_string().into_bytes().into_iter().chain([0])),
        )
    }
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.members.iter().map(TaskId::to_string).collect();
        f.write_str(&names.join(","))
    }
}

/// What a member says it called, in the first message of a collective.
#[derive(Debug, Clone, PartialEq)]
struct Head {
    kind: String,
    op: String,
    root: Option<u32>,
    tensor: Option<TensorMeta>,
    order: u64,
}

/// A member's head, and the payload it meant for this member.
struct Arrival {
    head: Head,
    payload: Option<Bytes>,
}

impl Head {
    fn to_proto(&self, payload_bytes: Option<u64>) -> proto::CollectiveHead {
        proto::CollectiveHead {
            kind: self.kind.clone(),
            op: self.op.clone(),
            root: self.root,
            tensor: self
                .tensor
                .as_ref()
                .map(|meta| wire::tensor_proto(meta, Bytes::new())),
            order: self.order,
            payload_bytes,
        }
    }

    fn from_proto(head: proto::CollectiveHead) -> Result<Self> {
        Ok(Self {
            kind: head.kind,
            op: head.op,
            root: head.root,
            tensor: head.tensor.as_ref().map(wire::described).transpose()?,
            order: head.order,
        })
    }
}

/// A head message: `inline` payload, then the head, then its length (see `CollectiveHead`).
/// The size of a tensor whose shape `Group::check` has accepted.
fn byte_len(meta: &TensorMeta) -> usize {
    meta.byte_len().expect("a checked shape") as usize
}

fn head_message(head: &proto::CollectiveHead, inline: Option<&[u8]>) -> (TensorMeta, Bytes) {
    let inline = inline.unwrap_or_default();
    let length = head.encoded_len();
    let mut message = BytesMut::with_capacity(inline.len() + length + 4);
    message.put_slice(inline);
    head.encode(&mut message).expect("capacity reserved");
    message.put_u32_le(length as u32);
    let meta = TensorMeta {
        dtype: DataType::DtUint8,
        shape: vec![message.len() as u64],
    };
    (meta, message.freeze())
}

/// A head message's head, the payload size it announces and the payload it carries.
fn parse_head_message(message: Tensor) -> Result<(proto::CollectiveHead, Bytes)> {
    let not_a_head = || Error::invalid_argument("a peer sent a collective's head that is not one");
    if message.meta.dtype != DataType::DtUint8 || message.meta.shape.len() != 1 {
        return Err(not_a_head());
    }
    let bytes = Bytes::from_owner(message.data);
    let at = bytes.len().checked_sub(4).ok_or_else(not_a_head)?;
    let length = u32::from_le_bytes(bytes[at..].try_into().expect("4 bytes")) as usize;
    let start = at.checked_sub(length).ok_or_else(not_a_head)?;
    let head = proto::CollectiveHead::decode(&bytes[start..at]).map_err(|_| not_a_head())?;
    Ok((head, bytes.slice(..start)))
}

/// One collective call, as this task takes part in it.
pub struct Collective {
    /// Its place among the group's collectives in the order they were called.
    turn: u64,
    collectives: Arc<Collectives>,
    exchange: Arc<Exchange>,
    connections: Arc<Peers>,
    group: Group,
    /// What every message of this collective is named under, set once every member is up.
    prefix: OnceLock<String>,
    /// By rank, whether the member's head has come (this member's own counts as come).
    joined: Vec<AtomicBool>,
    timeout: Option<Duration>,
}

impl Collective {
    /// This member's part in `kind`, giving `given` (checked by [`Group::check`]); the result,
    /// where this member gets one. An all_reduce given `into` (the memory of `given` itself)
    /// may write its result there and give None.
    pub async fn run(
        self,
        kind: Kind,
        mut given: Option<(TensorMeta, Bytes)>,
        into: Option<ResultMemory>,
    ) -> Result<Option<Tensor>> {
        let root = kind
            .root()
            .map(|root| self.group.rank_of(root))
            .transpose()?;
        let head = Head {
            kind: kind.name().to_owned(),
            op: kind
                .op()
                .map(ReduceOp::as_str)
                .unwrap_or_default()
                .to_owned(),
            root: root.map(|rank| rank as u32),
            tensor: given.as_ref().map(|(meta, _)| meta.clone()),
            order: self.group.order(),
        };
        let work = async {
            if let Kind::AllReduce(op) = &kind {
                // Its input is handed over: an in-place result waits for it to be let go.
                let (meta, data) = given.take().expect("checked: this member gives a tensor");
                return self.all_reduce(&head, *op, &meta, data, into).await;
            }
            let given = given.as_ref();
            let tensor = || given.expect("checked: this member gives a tensor");
            Ok(match &kind {
                Kind::AllReduce(_) => unreachable!("reduced above"),
                Kind::ReduceScatter(op) => {
                    let (meta, data) = tensor();
                    Some(self.reduce_scatter(&head, *op, meta, data).await?)
                }
                Kind::AllGather => {
                    let (meta, data) = tensor();
                    let arrivals = self.meet(&head, |_| Some(data.clone())).await?;
                    Some(self.stack(meta, &arrivals, 0..self.size())?)
                }
                Kind::Broadcast { .. } => {
                    Some(self.broadcast(&head, root.expect("a root"), given).await?)
                }
                Kind::Barrier => {
                    self.meet(&head, |_| None).await?;
                    None
                }
                Kind::Reduce { op, .. } => {
                    let (meta, data) = tensor();
                    self.reduce(&head, *op, root.expect("a root"), meta, data)
                        .await?
                }
                Kind::Gather { .. } => {
                    let (meta, data) = tensor();
                    let root = root.expect("a root");
                    let to_root = |rank| (rank == root).then(|| data.clone());
                    let arrivals = self.meet(&head, to_root).await?;
                    if self.group.rank == root {
                        Some(self.stack(meta, &arrivals, 0..self.size())?)
                    } else {
                        None
                    }
                }
                Kind::Scatter { .. } => {
                    Some(self.scatter(&head, root.expect("a root"), given).await?)
                }
                Kind::AllToAll => {
                    let (meta, data) = tensor();
                    let row = data.len() / self.size();
                    let rows = |rank: usize| Some(data.slice(rank * row..(rank + 1) * row));
                    let arrivals = self.meet(&head, rows).await?;
                    let mut row_meta = meta.clone();
                    row_meta.shape.remove(0);
                    Some(self.stack(&row_meta, &arrivals, 0..self.size())?)
                }
            })
        };
        self.guarded(kind.name(), work).await
    }

    fn size(&self) -> usize {
        self.group.members.len()
    }

    /// The reduction; or, written into `into` (a ring's result, once the input is let go),
    /// None.
    async fn all_reduce(
        &self,
        head: &Head,
        op: ReduceOp,
        meta: &TensorMeta,
        data: Bytes,
        into: Option<ResultMemory>,
    ) -> Result<Option<Tensor>> {
        let n = self.size();
        let len = data.len();
        if !self.group.rings(len) {
            let arrivals = self.meet(head, |_| Some(data.clone())).await?;
            return self.reduced(op, meta, &arrivals).map(Some);
        }
        self.meet(head, |_| None).await?;
        let layout = Layout::new(meta, n);
        let own = self.reduce_scatter_ring(op, meta, &data, &layout).await?;
        drop(data);
        let pieces = self.all_gather_ring(own, &layout).await?;
        let mut parts = Vec::with_capacity(n * layout.pieces);
        for (piece, segments) in pieces.iter().enumerate() {
            for (segment, bytes) in segments.iter().enumerate() {
                parts.push((layout.range(segment, piece), &bytes[..]));
            }
        }
        if let Some(into) = into
            && into.write(parts.iter().cloned()).await
        {
            return Ok(None);
        }
        let mut out = TensorBuf::new(len);
        for (range, bytes) in parts {
            out.as_mut_slice()[range].copy_from_slice(bytes);
        }
        Ok(Some(Tensor {
            meta: meta.clone(),
            data: out,
        }))
    }

    async fn reduce_scatter(
        &self,
        head: &Head,
        op: ReduceOp,
        meta: &TensorMeta,
        data: &Bytes,
    ) -> Result<Tensor> {
        self.meet(head, |_| None).await?;
        let layout = Layout::new(meta, self.size());
        let own = self.reduce_scatter_ring(op, meta, data, &layout).await?;
        let mut out = TensorBuf::new(own.iter().map(Bytes::len).sum());
        let mut at = 0;
        for piece in own {
            out.as_mut_slice()[at..at + piece.len()].copy_from_slice(&piece);
            at += piece.len();
        }
        let mut shape = meta.shape.clone();
        shape[0] /= self.size() as u64;
        Ok(Tensor {
            meta: TensorMeta {
                dtype: meta.dtype,
                shape,
            },
            data: out,
        })
    }

    async fn broadcast(
        &self,
        head: &Head,
        root: usize,
        given: Option<&(TensorMeta, Bytes)>,
    ) -> Result<Tensor> {
        let me = self.group.rank;
        let from_root =
            |rank| (me == root && rank != me).then(|| given.expect("the root's").1.clone());
        let arrivals = self.meet(head, from_root).await?;
        if me == root {
            let (meta, data) = given.expect("the root's");
            return Ok(Tensor {
                meta: meta.clone(),
                data: TensorBuf::from_slice(data),
            });
        }
        let meta = self.tensor_of(&arrivals, root)?;
        let bytes = self.payload(&arrivals, root, byte_len(&meta))?;
        Ok(Tensor {
            meta,
            data: TensorBuf::from_slice(&bytes),
        })
    }

    async fn reduce(
        &self,
        head: &Head,
        op: ReduceOp,
        root: usize,
        meta: &TensorMeta,
        data: &Bytes,
    ) -> Result<Option<Tensor>> {
        let n = self.size();
        let is_root = self.group.rank == root;
        if data.len() <= ALL_TO_ALL_BYTES {
            let arrivals = self
                .meet(head, |rank| (rank == root).then(|| data.clone()))
                .await?;
            if !is_root {
                return Ok(None);
            }
            return self.reduced(op, meta, &arrivals).map(Some);
        }
        // Large: the ring's reduce-scatter, then every member's segment to the root.
        self.meet(head, |_| None).await?;
        let layout = Layout::new(meta, n);
        let own = self.reduce_scatter_ring(op, meta, data, &layout).await?;
        if !is_root {
            let sends = own.into_iter().enumerate().map(|(piece, bytes)| {
                let meta = layout.meta(&bytes);
                async move {
                    self.send(root, &format!("segment.{piece}"), meta, bytes)
                        .await
                }
            });
            try_join_all(sends).await?;
            return Ok(None);
        }
        let mut out = TensorBuf::new(data.len());
        for (piece, bytes) in own.iter().enumerate() {
            out.as_mut_slice()[layout.range(root, piece)].copy_from_slice(bytes);
        }
        let pieces = (0..n).filter(|rank| *rank != root).flat_map(|rank| {
            (0..layout.pieces).map(move |piece| async move {
                let received = self.recv(rank, &format!("segment.{piece}")).await?;
                Ok::<_, Error>((rank, piece, received))
            })
        });
        for (rank, piece, received) in try_join_all(pieces).await? {
            let range = layout.range(rank, piece);
            layout.check(&received, range.len())?;
            out.as_mut_slice()[range].copy_from_slice(received.data.as_slice());
        }
        Ok(Some(Tensor {
            meta: meta.clone(),
            data: out,
        }))
    }

    async fn scatter(
        &self,
        head: &Head,
        root: usize,
        given: Option<&(TensorMeta, Bytes)>,
    ) -> Result<Tensor> {
        let me = self.group.rank;
        let row = |data: &Bytes, rank: usize| {
            let size = data.len() / self.size();
            data.slice(rank * size..(rank + 1) * size)
        };
        let rows = |rank| given.map(|(_, data)| row(data, rank));
        let arrivals = self.meet(head, rows).await?;
        let mut meta = self.tensor_of(&arrivals, root)?;
        meta.shape.remove(0);
        let bytes = self.payload(&arrivals, root, byte_len(&meta))?;
        if me == root {
            debug_assert_eq!(bytes, row(&given.expect("the root's").1, me));
        }
        Ok(Tensor {
            meta,
            data: TensorBuf::from_slice(&bytes),
        })
    }

    /// The reduction of every member's payload for this one (each a `meta` tensor), in rank
    /// order, so that every member that computes it gets the same bits.
    fn reduced(&self, op: ReduceOp, meta: &TensorMeta, arrivals: &[Arrival]) -> Result<Tensor> {
        let size = byte_len(meta);
        let mut acc = TensorBuf::from_slice(&self.payload(arrivals, 0, size)?);
        for rank in 1..self.size() {
            let other = self.payload(arrivals, rank, size)?;
            reduce::combine(op, meta.dtype, acc.as_mut_slice(), &other)?;
        }
        if op == ReduceOp::Mean {
            reduce::divide(meta.dtype, acc.as_mut_slice(), self.size());
        }
        Ok(Tensor {
            meta: meta.clone(),
            data: acc,
        })
    }

    /// Every member's payload for this one (of `meta` tensors) stacked in rank order, for the
    /// members `ranks`.
    fn stack(
        &self,
        meta: &TensorMeta,
        arrivals: &[Arrival],
        ranks: Range<usize>,
    ) -> Result<Tensor> {
        let size = byte_len(meta);
        let mut shape = vec![ranks.len() as u64];
        shape.extend(&meta.shape);
        let mut out = TensorBuf::new(size * ranks.len());
        for (at, rank) in ranks.enumerate() {
            let bytes = self.payload(arrivals, rank, size)?;
            out.as_mut_slice()[at * size..(at + 1) * size].copy_from_slice(&bytes);
        }
        Ok(Tensor {
            meta: TensorMeta {
                dtype: meta.dtype,
                shape,
            },
            data: out,
        })
    }

    /// The tensor `rank` said it gives.
    fn tensor_of(&self, arrivals: &[Arrival], rank: usize) -> Result<TensorMeta> {
        arrivals[rank].head.tensor.clone().ok_or_else(|| {
            Error::invalid_argument(format!(
                "{} gave no tensor where one was due",
                self.group.members[rank]
            ))
        })
    }

    /// The payload `rank` meant for this member, which must be `bytes` long.
    fn payload(&self, arrivals: &[Arrival], rank: usize, bytes: usize) -> Result<Bytes> {
        match &arrivals[rank].payload {
            Some(payload) if payload.len() == bytes => Ok(payload.clone()),
            sent => Err(Error::invalid_argument(format!(
                "{} sent {} bytes where {bytes} were due",
                self.group.members[rank],
                sent.as_ref().map_or(0, Bytes::len)
            ))),
        }
    }

    /// The collective's first step: tells every other member what this one called, with the
    /// payload meant for each (`payload(rank)`), hears theirs, and checks that all called the same
    /// collective with the same arguments. Returns each member's head and payload for this one,
    /// in rank order (this member's own included).
    async fn meet(
        &self,
        head: &Head,
        payload: impl Fn(usize) -> Option<Bytes>,
    ) -> Result<Vec<Arrival>> {
        let payloads: Vec<_> = (0..self.size()).map(&payload).collect();
        let sends = self.others().map(|rank| {
            let payload = payloads[rank].as_ref();
            let inline = payload.filter(|payload| payload.len() <= INLINE_BYTES);
            let message = head.to_proto(payload.map(|payload| payload.len() as u64));
            let (meta, bytes) = head_message(&message, inline.map(|payload| &payload[..]));
            self.send(rank, "head", meta, bytes)
        });
        let receives = self.others().map(|rank| async move {
            let message = self.recv(rank, "head").await?;
            self.joined[rank].store(true, Ordering::Relaxed);
            Ok::<_, Error>((rank, parse_head_message(message)?))
        });
        let (_, received) = futures::try_join!(try_join_all(sends), try_join_all(receives))?;
        let mut heads = vec![head.clone(); self.size()];
        let mut announced = vec![None; self.size()];
        let mut inline = vec![Bytes::new(); self.size()];
        for (rank, (message, carried)) in received {
            announced[rank] = message.payload_bytes;
            inline[rank] = carried;
            heads[rank] = Head::from_proto(message)?;
        }
        self.check_agreed(&heads)?;
        // The payloads too large to ride in the heads follow them.
        let sends = self.others().filter_map(|rank| {
            let payload = payloads[rank].clone().filter(|p| p.len() > INLINE_BYTES)?;
            let meta = TensorMeta {
                dtype: DataType::DtUint8,
                shape: vec![payload.len() as u64],
            };
            Some(self.send(rank, "payload", meta, payload))
        });
        let followed = self.others().filter(|rank| {
            announced[*rank].is_some_and(|bytes| bytes as usize != inline[*rank].len())
        });
        let receives = followed.map(|rank| async move {
            let received = self.recv(rank, "payload").await?;
            Ok::<_, Error>((rank, Bytes::from_owner(received.data)))
        });
        let (_, followed) = futures::try_join!(try_join_all(sends), try_join_all(receives))?;
        let mut payloads: Vec<_> = (0..self.size())
            .map(|rank| {
                if rank == self.group.rank {
                    payloads[rank].clone()
                } else {
                    announced[rank].map(|_| std::mem::take(&mut inline[rank]))
                }
            })
            .collect();
        for (rank, bytes) in followed {
            payloads[rank] = Some(bytes);
        }
        Ok(heads
            .into_iter()
            .zip(payloads)
            .map(|(head, payload)| Arrival { head, payload })
            .collect())
    }

    /// Every member called the same collective, with the same op, root and order of members,
    /// and those that give a tensor give the same (dtype and shape), each where it must.
    fn check_agreed(&self, heads: &[Head]) -> Result<()> {
        let mine = &heads[self.group.rank];
        let same_call = heads.iter().all(|head| {
            (&head.kind, &head.op, head.root, head.order)
                == (&mine.kind, &mine.op, mine.root, mine.order)
        });
        let root = mine.root.map(|rank| rank as usize);
        let kind_gives = |rank: usize| {
            let given = heads[rank].tensor.is_some();
            match gives(&mine.kind, rank, root) {
                Some(required) => given == required,
                None => true,
            }
        };
        let tensors: Vec<_> = heads
            .iter()
            .filter_map(|head| head.tensor.as_ref())
            .collect();
        let same_tensor = tensors.windows(2).all(|pair| pair[0] == pair[1]);
        if same_call && same_tensor && (0..heads.len()).all(kind_gives) {
            return Ok(());
        }
        let called: Vec<_> = self
            .group
            .members
            .iter()
            .zip(heads)
            .map(|(task, head)| format!("{task} called {}", self.describe(head)))
            .collect();
        let order = if heads.iter().any(|head| head.order != mine.order) {
            " (listing the group's members in different orders)"
        } else {
            ""
        };
        Err(Error::invalid_argument(format!(
            "the members called different collectives{order}: {}",
            called.join("; ")
        )))
    }

    /// A head as the user called it: `all_reduce(op="sum") with float32 (4,)`.
    fn describe(&self, head: &Head) -> String {
        let mut arguments = Vec::new();
        if !head.op.is_empty() {
            arguments.push(format!("op={:?}", head.op));
        }
        if let Some(root) = head.root {
            let root = self.group.members.get(root as usize);
            arguments.push(format!(
                "root={}",
                root.map_or("?".into(), TaskId::to_string)
            ));
        }
        let tensor = head
            .tensor
            .as_ref()
            .map_or_else(|| "no tensor".to_owned(), TensorMeta::to_string);
        format!("{}({}) with {tensor}", head.kind, arguments.join(", "))
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
            let absent = self.absent();
            let e = if e.code == Code::DeadlineExceeded && !absent.is_empty() {
                let message = format!("{}; {} never joined it", e.message, absent.join(", "));
                Error::new(e.code, message)
            } else {
                e
            };
            e.context(format!(
                "{what} of {} tasks at {}",
                self.group.members.len(),
                self.exchange.me()
            ))
        })
    }

    /// The members whose heads have not come.
    fn absent(&self) -> Vec<String> {
        self.group
            .members
            .iter()
            .zip(&self.joined)
            .filter(|(_, joined)| !joined.load(Ordering::Relaxed))
            .map(|(member, _)| member.to_string())
            .collect()
    }

    /// Waits until every member is up, then takes this collective's sequence number among
    /// those incarnations of the members.
    async fn name_messages(&self) -> Result<()> {
        let liveness = self.exchange.liveness();
        let me = self.exchange.me();
        let sorted = &self.group.sorted;
        let others = sorted
            .iter()
            .filter(|member| *member != me)
            .map(|member| liveness.incarnation(member));
        let mut others = try_join_all(others).await?.into_iter();
        let incarnations: Vec<_> = sorted
            .iter()
            .map(|member| {
                if member == me {
                    self.collectives.incarnation
                } else {
                    others.next().expect("one per other member")
                }
            })
            .collect();
        let fingerprint = fingerprint(&incarnations);
        let sequence = self
            .collectives
            .next(&self.group, self.turn, fingerprint)
            .await;
        let names: Vec<_> = sorted.iter().map(TaskId::to_string).collect();
        let _ = self.prefix.set(format!(
            "{COLLECTIVE_NAMES}[{}]/{fingerprint:016x}/{sequence}",
            names.join(",")
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

impl Drop for Collective {
    fn drop(&mut self) {
        if self.prefix.get().is_none() {
            self.collectives.forgo(&self.group, self.turn);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_message_carries_its_payload_first() {
        let head = proto::CollectiveHead {
            kind: "all_reduce".into(),
            op: "sum".into(),
            payload_bytes: Some(3),
            ..Default::default()
        };
        let (meta, bytes) = head_message(&head, Some(&[7, 8, 9]));
        assert_eq!(&bytes[..3], &[7, 8, 9]);
        let message = Tensor {
            meta,
            data: TensorBuf::from_slice(&bytes),
        };
        let (parsed, payload) = parse_head_message(message).unwrap();
        assert_eq!(parsed, head);
        assert_eq!(&payload[..], &[7, 8, 9]);
    }

    #[test]
    fn a_broken_head_message_is_refused() {
        let head = proto::CollectiveHead::default();
        let (meta, bytes) = head_message(&head, None);
        for cut in [0, 1, bytes.len() - 1] {
            let message = Tensor {
                meta: TensorMeta {
                    dtype: DataType::DtUint8,
                    shape: vec![cut as u64],
                },
                data: TensorBuf::from_slice(&bytes[..cut]),
            };
            let refused = parse_head_message(message).map(drop).unwrap_err();
            assert_eq!(refused.code, Code::InvalidArgument, "cut at {cut}");
        }
        let mut lying = bytes.to_vec();
        let at = lying.len() - 4;
        lying[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        let message = Tensor {
            meta,
            data: TensorBuf::from_slice(&lying),
        };
        assert!(parse_head_message(message).is_err());
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
