//! Collectives between the ranks of a replica group: all-reduce (sum) and barrier inside a
//! tensor-parallel group, and point-to-point messages (steps, activations, logits) between
//! pipeline stages and from a stage's rank 0 to its TP peers. Two transports implement the same
//! traits: [`local`] for ranks that are threads of one process (shared memory) and [`tcp`] for
//! ranks in different processes or pods (length-prefixed frames, a group-secret handshake,
//! heartbeats, timeouts). A peer that dies or stalls turns into a [`CommError`] naming it.

pub mod dns;
pub mod handshake;
pub mod local;
pub mod tcp;
pub mod wire;

use std::fmt;

/// A rank of the replica group: pipeline stage and tensor-parallel rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankId {
    /// Pipeline stage.
    pub stage: usize,
    /// Tensor-parallel rank inside the stage.
    pub tp_rank: usize,
}

impl fmt::Display for RankId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage {} TP rank {}", self.stage, self.tp_rank)
    }
}

/// Why talking to a peer failed. Every variant names the peer so the log line says which
/// process of the group to look at.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The peer closed the connection or its thread ended.
    #[error("peer {peer} ({addr}) went away: {detail}")]
    Closed {
        /// Which rank.
        peer: RankId,
        /// Where it was.
        addr: String,
        /// What the transport saw.
        detail: String,
    },
    /// Nothing, not even a heartbeat, arrived from the peer in time.
    #[error("peer {peer} ({addr}) sent nothing for {ms} ms: it is stalled or dead")]
    Timeout {
        /// Which rank.
        peer: RankId,
        /// Where it was.
        addr: String,
        /// The timeout.
        ms: u64,
    },
    /// The peer's link is alive (heartbeats) but what this rank waits for inside a step did not
    /// come in time.
    #[error(
        "peer {peer} ({addr}) still sends heartbeats but answered nothing for {ms} ms inside a step: its engine is stuck (or one step takes longer than the peer timeout: raise peerTimeoutMs)"
    )]
    NoReply {
        /// Which rank.
        peer: RankId,
        /// Where it was.
        addr: String,
        /// The timeout.
        ms: u64,
    },
    /// The peer could not be reached before the timeout.
    #[error("cannot connect to peer {peer} at {addr} within {ms} ms: {reason}")]
    Connect {
        /// Which rank.
        peer: RankId,
        /// Where it should be.
        addr: String,
        /// The timeout.
        ms: u64,
        /// The last failure.
        reason: String,
    },
    /// The peer's expected ranks did not all dial in before the timeout.
    #[error("peer {peer} did not connect to this rank's port {port} within {ms} ms")]
    NoDialIn {
        /// Which rank.
        peer: RankId,
        /// Our peer port.
        port: u16,
        /// The timeout.
        ms: u64,
    },
    /// A connection did not prove it belongs to the group.
    #[error("connection from {addr} failed the group handshake: {reason}")]
    Handshake {
        /// Remote address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer sent something this protocol does not allow here.
    #[error("peer {peer} sent an unexpected message: {detail}")]
    Protocol {
        /// Which rank.
        peer: RankId,
        /// What was wrong.
        detail: String,
    },
    /// Multi-process groups need a shared secret.
    #[error(
        "{} is not set: a group that spans processes needs the group secret (the operator and `whaleflux run` set it)",
        whaleflux_crds::worker::GROUP_SECRET_ENV
    )]
    NoSecret,
    /// The peer's host name does not resolve.
    #[error("cannot resolve peer {peer} host {host:?}: {reason}")]
    Resolve {
        /// Which rank.
        peer: RankId,
        /// The name.
        host: String,
        /// Why.
        reason: String,
    },
    /// The peer port cannot be opened.
    #[error("cannot listen for peers on port {port}: {source}")]
    Listen {
        /// The port.
        port: u16,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Collective operations among the tensor-parallel ranks of one stage. Every rank calls the
/// same operations in the same order.
pub trait Collective: Send + Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Replace `buf` on every rank by the element-wise sum over ranks; the sum is taken in rank
    /// order so every rank ends with bit-identical values.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Return once every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;
}

/// A forward step as the ranks after the scheduler see it: which sequences, how many new rows
/// each, which sequences to forget, and the rows themselves.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Step {
    /// Step number (logits come back tagged with it).
    pub id: u64,
    /// `(sequence id, new rows)`, in row order.
    pub seqs: Vec<(u64, u32)>,
    /// Sequences whose KV cache can be dropped, before this step runs.
    pub free: Vec<u64>,
    /// The activations, `sum(rows) × hidden`.
    pub hidden: Vec<f32>,
}

/// What travels on a point-to-point link.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    /// The sender and everything behind it is loaded and connected.
    Ready,
    /// The whole group is loaded and connected (from the API rank down every link after the
    /// `Ready`s came up): ranks other than the API rank are Ready from then on.
    Formed,
    /// Run a step.
    Step(Step),
    /// Logits of a step (last stage to stage 0): one `vocab`-wide row per sequence with rows.
    Logits {
        /// The step.
        id: u64,
        /// Row width.
        vocab: u32,
        /// Rows.
        data: Vec<f32>,
    },
    /// A partial sum for an all-reduce (TCP collectives).
    Reduce(Vec<f32>),
    /// The group is shutting down cleanly.
    Shutdown,
    /// The sender is exiting because of this failure (so the root cause reaches every peer).
    Abort(String),
}

impl Msg {
    /// Short name for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Ready => "ready",
            Msg::Formed => "formed",
            Msg::Step(_) => "step",
            Msg::Logits { .. } => "logits",
            Msg::Reduce(_) => "reduce",
            Msg::Shutdown => "shutdown",
            Msg::Abort(_) => "abort",
        }
    }
}

/// A point-to-point link to one peer rank.
pub trait Link: Send + Sync {
    /// The rank at the other end.
    fn peer(&self) -> RankId;
    /// Send a message (never blocks on the peer's compute).
    fn send(&self, msg: &Msg) -> Result<(), CommError>;
    /// Wait for the next message; fails when the peer dies or stalls. For waits of an idle
    /// rank (the next step may be hours away): heartbeats prove the peer alive meanwhile.
    fn recv(&self) -> Result<Msg, CommError>;
    /// Wait for a message the peer owes this rank inside a step (logits, an all-reduce part):
    /// fails when it has not come within the peer timeout, even while heartbeats still flow
    /// (the peer's engine is stuck). Links inside one process wait as [`Link::recv`] does: a
    /// thread that dies there ends the process.
    fn recv_reply(&self) -> Result<Msg, CommError> {
        self.recv()
    }
}

/// Sum `parts` (one slice per rank, in rank order) into `out`.
pub(crate) fn sum_in_rank_order<'a>(out: &mut [f32], parts: impl Iterator<Item = &'a [f32]>) {
    let mut first = true;
    for p in parts {
        if first {
            out.copy_from_slice(p);
            first = false;
        } else {
            out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
    }
}

impl<L: Link + Sync + ?Sized> Link for std::sync::Arc<L> {
    fn peer(&self) -> RankId {
        (**self).peer()
    }
    fn send(&self, msg: &Msg) -> Result<(), CommError> {
        (**self).send(msg)
    }
    fn recv(&self) -> Result<Msg, CommError> {
        (**self).recv()
    }
    fn recv_reply(&self) -> Result<Msg, CommError> {
        (**self).recv_reply()
    }
}

/// A collective that adds the time spent inside all-reduce (waiting for peers included) to a
/// counter, for the benchmark's all-reduce share.
pub struct Timed<C> {
    /// The wrapped collective.
    pub inner: C,
    /// Nanoseconds spent in all-reduce and barrier.
    pub nanos: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<C: Collective> Collective for Timed<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let t = std::time::Instant::now();
        let r = self.inner.all_reduce_sum(buf);
        self.nanos.fetch_add(
            t.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        r
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.inner.barrier()
    }
}
