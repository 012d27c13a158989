//! Running a forward step across the ranks of a replica group. Stage 0's TP rank 0 (the
//! [`Leader`]) owns the scheduler: it embeds the tokens, hands the rows to its tensor-parallel
//! peers, runs its layers, and sends the activations to the next stage; the last stage's rank 0
//! computes the logits and sends them back to stage 0. Every other rank is a follower
//! ([`Rank::follow`]): it waits for a step, runs its layers and passes the result on. Several
//! steps (micro-batches of different sequences) can be in flight at once, one per stage, so the
//! stages work at the same time. Each rank keeps the KV cache of its own layers and heads, keyed
//! by sequence id.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::forward::{KvCache, LlamaModel, StageSeq};
use crate::backend::Backend;
use crate::comm::{Collective, CommError, Link, Msg, RankId, Step};

/// One rank of a replica group: its shard of the model and its links.
pub struct Rank {
    /// Who this is.
    pub id: RankId,
    /// This rank's shard.
    pub model: Arc<LlamaModel>,
    /// Where it computes.
    pub backend: Arc<dyn Backend>,
    /// The stage's tensor-parallel group (absent when TP = 1).
    pub tp: Option<Box<dyn Collective>>,
    /// Rank 0: links to TP ranks 1.. (in order); other ranks: the link to rank 0.
    pub tp_links: Vec<Arc<dyn Link>>,
    /// Rank 0 of the previous stage (stage 0: the last stage, which returns the logits).
    pub prev: Option<Arc<dyn Link>>,
    /// Rank 0 of the next stage (the last stage: stage 0, which takes the logits).
    pub next: Option<Arc<dyn Link>>,
    /// Set once the whole group has formed (the API rank's [`Msg::Formed`] reached this rank):
    /// a rank's readiness. Ranks of one process share it.
    pub formed: Arc<AtomicBool>,
    caches: HashMap<u64, KvCache>,
}

fn unexpected(peer: RankId, what: &str, got: &Msg) -> CommError {
    CommError::Protocol {
        peer,
        detail: format!("expected {what}, got {}", got.kind()),
    }
}

impl Rank {
    /// A rank with no links yet.
    pub fn new(id: RankId, model: Arc<LlamaModel>, backend: Arc<dyn Backend>) -> Self {
        Self {
            id,
            model,
            backend,
            tp: None,
            tp_links: Vec::new(),
            prev: None,
            next: None,
            formed: Arc::new(AtomicBool::new(false)),
            caches: HashMap::new(),
        }
    }

    fn is_last_stage(&self) -> bool {
        self.model.spec.layers.end == self.model.config.n_layers
    }

    /// Sequences whose cache this rank holds.
    pub fn cached_sequences(&self) -> usize {
        self.caches.len()
    }

    /// Run this rank's layers of `step` over `x` (in place).
    fn run_layers(&mut self, step: &Step, x: &mut [f32]) -> Result<(), CommError> {
        for id in &step.free {
            self.caches.remove(id);
        }
        let mut held: Vec<(u64, u32, KvCache)> = step
            .seqs
            .iter()
            .map(|&(id, n)| (id, n, self.caches.remove(&id).unwrap_or_default()))
            .collect();
        let mut seqs: Vec<StageSeq<'_>> = held
            .iter_mut()
            .map(|(_, n, c)| StageSeq {
                n: *n as usize,
                cache: c,
            })
            .collect();
        let r = self
            .model
            .forward_layers(self.backend.as_ref(), self.tp.as_deref(), &mut seqs, x);
        drop(seqs);
        for (id, _, c) in held {
            self.caches.insert(id, c);
        }
        r
    }

    /// Wait until everything behind this rank is ready: its TP peers (rank 0) and, unless this
    /// is the last stage, the next stage.
    pub fn await_ready(&self) -> Result<(), CommError> {
        if self.id.tp_rank == 0 {
            for l in &self.tp_links {
                match l.recv()? {
                    Msg::Ready => {}
                    m => return Err(unexpected(l.peer(), "ready", &m)),
                }
            }
            if !self.is_last_stage()
                && let Some(n) = &self.next
            {
                match n.recv()? {
                    Msg::Ready => {}
                    m => return Err(unexpected(n.peer(), "ready", &m)),
                }
            }
        }
        Ok(())
    }

    /// The group has formed: note it, and tell the ranks behind this one (its TP peers and,
    /// before the last stage, the next stage), as steps travel.
    fn pass_formed(&self) -> Result<(), CommError> {
        self.formed.store(true, Ordering::SeqCst);
        if self.id.tp_rank != 0 {
            return Ok(());
        }
        for l in &self.tp_links {
            l.send(&Msg::Formed)?;
        }
        match &self.next {
            Some(n) if !self.is_last_stage() => n.send(&Msg::Formed),
            _ => Ok(()),
        }
    }

    /// Tell the rank in front of this one that this part of the group is ready.
    fn announce_ready(&self) -> Result<(), CommError> {
        let to = if self.id.tp_rank > 0 {
            self.tp_links.first()
        } else {
            self.prev.as_ref()
        };
        match to {
            Some(l) => l.send(&Msg::Ready),
            None => Ok(()),
        }
    }

    /// Serve steps until the group shuts down: any rank but stage 0's TP rank 0. Returns `Ok`
    /// on a clean shutdown and the first peer failure otherwise.
    pub fn follow(mut self) -> Result<(), CommError> {
        self.await_ready()?;
        self.announce_ready()?;
        let source = if self.id.tp_rank > 0 {
            self.tp_links.first().cloned()
        } else {
            self.prev.clone()
        };
        let Some(source) = source else {
            return Err(CommError::Protocol {
                peer: self.id,
                detail: "a follower rank has no upstream link".into(),
            });
        };
        loop {
            let mut step = match source.recv()? {
                Msg::Step(s) => s,
                Msg::Formed => {
                    self.pass_formed()?;
                    continue;
                }
                Msg::Shutdown => {
                    if self.id.tp_rank == 0 {
                        for l in &self.tp_links {
                            let _ = l.send(&Msg::Shutdown);
                        }
                        if !self.is_last_stage()
                            && let Some(n) = &self.next
                        {
                            let _ = n.send(&Msg::Shutdown);
                        }
                    }
                    return Ok(());
                }
                m => return Err(unexpected(source.peer(), "a step", &m)),
            };
            let mut x = std::mem::take(&mut step.hidden);
            if self.id.tp_rank == 0 {
                broadcast(&self.tp_links, &step, &x)?;
            }
            self.run_layers(&step, &mut x)?;
            if self.id.tp_rank != 0 {
                continue;
            }
            let Some(next) = &self.next else {
                return Err(CommError::Protocol {
                    peer: self.id,
                    detail: "stage has no downstream link".into(),
                });
            };
            if self.model.spec.head {
                let counts: Vec<usize> = step.seqs.iter().map(|s| s.1 as usize).collect();
                let logits = self.model.head(self.backend.as_ref(), &x, &counts);
                next.send(&Msg::Logits {
                    id: step.id,
                    vocab: self.model.config.vocab as u32,
                    data: logits.concat(),
                })?;
            } else {
                step.hidden = x;
                next.send(&Msg::Step(step))?;
            }
        }
    }
}

/// Send `step` with rows `x` to the TP peers.
fn broadcast(links: &[Arc<dyn Link>], step: &Step, x: &[f32]) -> Result<(), CommError> {
    if links.is_empty() {
        return Ok(());
    }
    let msg = Msg::Step(Step {
        id: step.id,
        seqs: step.seqs.clone(),
        free: step.free.clone(),
        hidden: x.to_vec(),
    });
    for l in links {
        l.send(&msg)?;
    }
    Ok(())
}

/// What the scheduler runs: a step goes in, the logits of each of its sequences come out, up to
/// [`Executor::depth`] steps in flight.
pub trait Executor: Send {
    /// Steps that may be in flight at once (the pipeline stages).
    fn depth(&self) -> usize;
    /// Start a step: `(sequence id, new tokens)` for each sequence, and sequences to forget.
    fn launch(&mut self, seqs: &[(u64, &[u32])], free: &[u64]) -> Result<(), CommError>;
    /// Logits of the oldest launched step, one row per sequence in launch order.
    fn finish(&mut self) -> Result<Vec<Vec<f32>>, CommError>;
    /// Vocabulary size.
    fn vocab(&self) -> usize;
    /// Stop the followers (best effort).
    fn shutdown(&mut self) {}
}

/// Stage 0, TP rank 0: drives the group.
pub struct Leader {
    rank: Rank,
    stages: usize,
    next_id: u64,
    in_flight: VecDeque<u64>,
    local: VecDeque<Vec<Vec<f32>>>,
}

impl Leader {
    /// Drive a group of `stages` pipeline stages from `rank` (stage 0, TP rank 0).
    pub fn new(rank: Rank, stages: usize) -> Self {
        Self {
            rank,
            stages: stages.max(1),
            next_id: 0,
            in_flight: VecDeque::new(),
            local: VecDeque::new(),
        }
    }

    /// A single rank holding the whole model.
    pub fn single(model: Arc<LlamaModel>, backend: Arc<dyn Backend>) -> Self {
        Self::new(
            Rank::new(
                RankId {
                    stage: 0,
                    tp_rank: 0,
                },
                model,
                backend,
            ),
            1,
        )
    }

    /// Wait until the whole group is loaded and connected, then tell every rank it has formed.
    pub fn await_ready(&self) -> Result<(), CommError> {
        self.rank.await_ready()?;
        self.rank.pass_formed()
    }

    /// Sequences whose cache stage 0 holds (for tests).
    pub fn cached_sequences(&self) -> usize {
        self.rank.cached_sequences()
    }
}

impl Executor for Leader {
    fn depth(&self) -> usize {
        self.stages
    }

    fn vocab(&self) -> usize {
        self.rank.model.config.vocab
    }

    fn launch(&mut self, seqs: &[(u64, &[u32])], free: &[u64]) -> Result<(), CommError> {
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.1.iter().copied()).collect();
        let mut x = self.rank.model.embed(&tokens);
        let mut step = Step {
            id: self.next_id,
            seqs: seqs.iter().map(|s| (s.0, s.1.len() as u32)).collect(),
            free: free.to_vec(),
            hidden: Vec::new(),
        };
        self.next_id += 1;
        broadcast(&self.rank.tp_links, &step, &x)?;
        self.rank.run_layers(&step, &mut x)?;
        if self.rank.model.spec.head {
            let counts: Vec<usize> = seqs.iter().map(|s| s.1.len()).collect();
            self.local.push_back(
                self.rank
                    .model
                    .head(self.rank.backend.as_ref(), &x, &counts),
            );
        } else {
            let Some(next) = &self.rank.next else {
                return Err(CommError::Protocol {
                    peer: self.rank.id,
                    detail: "stage 0 has no link to stage 1".into(),
                });
            };
            step.hidden = x;
            next.send(&Msg::Step(step))?;
        }
        self.in_flight.push_back(self.next_id - 1);
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<Vec<f32>>, CommError> {
        let Some(want) = self.in_flight.pop_front() else {
            return Ok(Vec::new());
        };
        if let Some(l) = self.local.pop_front() {
            return Ok(l);
        }
        let Some(prev) = &self.rank.prev else {
            return Err(CommError::Protocol {
                peer: self.rank.id,
                detail: "stage 0 has no link to the last stage".into(),
            });
        };
        match prev.recv_reply()? {
            Msg::Logits { id, vocab, data } if id == want && vocab as usize == self.vocab() => {
                Ok(data
                    .chunks_exact(vocab as usize)
                    .map(|c| c.to_vec())
                    .collect())
            }
            Msg::Logits { id, .. } => Err(CommError::Protocol {
                peer: prev.peer(),
                detail: format!("logits of step {id}, expected step {want}"),
            }),
            m => Err(unexpected(prev.peer(), "logits", &m)),
        }
    }

    fn shutdown(&mut self) {
        for l in &self.rank.tp_links {
            let _ = l.send(&Msg::Shutdown);
        }
        if let Some(n) = &self.rank.next {
            let _ = n.send(&Msg::Shutdown);
        }
    }
}
