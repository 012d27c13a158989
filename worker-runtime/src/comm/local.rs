//! In-process transport: tensor-parallel ranks that are threads of one process share memory for
//! the all-reduce, and stages or ranks in one process pass messages over channels.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{Collective, CommError, Link, Msg, RankId, sum_in_rank_order};

struct Shared {
    size: usize,
    stage: usize,
    /// Two slot sets used alternately, so one barrier per all-reduce suffices: a rank cannot
    /// write set `k` again before every rank has finished reading it (that needs the next
    /// all-reduce's barrier, which every rank reaches only after reading).
    slots: [Vec<RwLock<Vec<f32>>>; 2],
    arrived: AtomicUsize,
    generation: AtomicU64,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
    gone: Mutex<Option<usize>>,
    failed: AtomicBool,
    timeout: Duration,
}

/// One rank's handle on a group of threads that all-reduce through shared memory.
pub struct ThreadGroup {
    shared: Arc<Shared>,
    rank: usize,
    calls: AtomicU64,
}

impl ThreadGroup {
    /// Handles for `size` ranks of `stage`; a rank waiting longer than `timeout` for the others
    /// fails. Dropping a handle tells the other ranks that rank left.
    pub fn new(stage: usize, size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let slots = || (0..size).map(|_| RwLock::new(Vec::new())).collect();
        let shared = Arc::new(Shared {
            size,
            stage,
            slots: [slots(), slots()],
            arrived: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            gone: Mutex::new(None),
            failed: AtomicBool::new(false),
            timeout,
        });
        (0..size)
            .map(|rank| ThreadGroup {
                shared: shared.clone(),
                rank,
                calls: AtomicU64::new(0),
            })
            .collect()
    }

    fn gone_error(&self) -> CommError {
        let s = &self.shared;
        let rank = s
            .gone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(usize::MAX);
        CommError::Closed {
            peer: RankId {
                stage: s.stage,
                tp_rank: rank,
            },
            addr: "this process".into(),
            detail: "the rank's thread stopped".into(),
        }
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        let s = &self.shared;
        {
            let mut g = s.gone.lock().unwrap_or_else(|p| p.into_inner());
            g.get_or_insert(self.rank);
        }
        s.failed.store(true, Ordering::SeqCst);
        let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
        s.cv.notify_all();
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let s = &self.shared;
        if s.size <= 1 {
            return Ok(());
        }
        let set = (self.calls.fetch_add(1, Ordering::Relaxed) % 2) as usize;
        {
            let mut mine = s.slots[set][self.rank]
                .write()
                .unwrap_or_else(|p| p.into_inner());
            mine.clear();
            mine.extend_from_slice(buf);
        }
        self.barrier()?;
        let parts: Vec<_> = s.slots[set]
            .iter()
            .map(|l| l.read().unwrap_or_else(|p| p.into_inner()))
            .collect();
        if let Some((r, p)) = parts.iter().enumerate().find(|(_, p)| p.len() != buf.len()) {
            return Err(CommError::Protocol {
                peer: RankId {
                    stage: s.stage,
                    tp_rank: r,
                },
                detail: format!(
                    "all-reduce of {} values met one of {} values",
                    buf.len(),
                    p.len()
                ),
            });
        }
        sum_in_rank_order(buf, parts.iter().map(|p| p.as_slice()));
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let s = &self.shared;
        if s.size <= 1 {
            return Ok(());
        }
        if s.failed.load(Ordering::SeqCst) {
            return Err(self.gone_error());
        }
        let generation0 = s.generation.load(Ordering::SeqCst);
        if s.arrived.fetch_add(1, Ordering::SeqCst) + 1 == s.size {
            s.arrived.store(0, Ordering::SeqCst);
            s.generation.fetch_add(1, Ordering::SeqCst);
            if s.sleepers.load(Ordering::SeqCst) > 0 {
                let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
                s.cv.notify_all();
            }
            return Ok(());
        }
        // Spin briefly (the others are usually microseconds away), then yield the core (there
        // may be more rank threads than cores), then sleep.
        let start = Instant::now();
        let mut i = 0u32;
        while start.elapsed() < Duration::from_micros(300) {
            if s.generation.load(Ordering::SeqCst) != generation0 {
                return Ok(());
            }
            i += 1;
            if i < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let mut g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            if s.generation.load(Ordering::SeqCst) != generation0 {
                break Ok(());
            }
            if s.failed.load(Ordering::SeqCst) {
                break Err(self.gone_error());
            }
            let left = s.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break Err(CommError::Timeout {
                    peer: RankId {
                        stage: s.stage,
                        tp_rank: (self.rank + 1) % s.size,
                    },
                    addr: "this process".into(),
                    ms: s.timeout.as_millis() as u64,
                });
            }
            g =
                s.cv.wait_timeout(g, left.min(Duration::from_millis(100)))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
        };
        s.sleepers.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// One end of an in-process channel between two ranks.
pub struct ChanLink {
    peer: RankId,
    tx: Sender<Msg>,
    rx: Mutex<Receiver<Msg>>,
}

/// A connected pair of in-process links: the first end talks to `b`, the second to `a`.
pub fn pair(a: RankId, b: RankId) -> (ChanLink, ChanLink) {
    let (ta, rb) = channel();
    let (tb, ra) = channel();
    (
        ChanLink {
            peer: b,
            tx: ta,
            rx: Mutex::new(ra),
        },
        ChanLink {
            peer: a,
            tx: tb,
            rx: Mutex::new(rb),
        },
    )
}

impl ChanLink {
    fn closed(&self) -> CommError {
        CommError::Closed {
            peer: self.peer,
            addr: "this process".into(),
            detail: "its thread stopped".into(),
        }
    }
}

impl Link for ChanLink {
    fn peer(&self) -> RankId {
        self.peer
    }

    fn send(&self, msg: &Msg) -> Result<(), CommError> {
        self.tx.send(msg.clone()).map_err(|_| self.closed())
    }

    fn recv(&self) -> Result<Msg, CommError> {
        self.rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv()
            .map_err(|_| self.closed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_all_reduce_sums_identically_on_every_rank() {
        let ranks = ThreadGroup::new(0, 3, Duration::from_secs(5));
        let outs: Vec<Vec<f32>> = std::thread::scope(|sc| {
            let hs: Vec<_> = ranks
                .iter()
                .map(|g| {
                    sc.spawn(move || {
                        let mut last = Vec::new();
                        for round in 0..50 {
                            let mut b: Vec<f32> = (0..7)
                                .map(|i| (g.rank() * 10 + i + round) as f32 * 0.1)
                                .collect();
                            g.all_reduce_sum(&mut b).expect("all-reduce");
                            last = b;
                        }
                        last
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("rank")).collect()
        });
        let want: Vec<f32> = (0..7)
            .map(|i| (0..3).map(|r| (r * 10 + i + 49) as f32 * 0.1).sum())
            .collect();
        for o in &outs {
            assert_eq!(o, &outs[0]);
            for (a, b) in o.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{o:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_instead_of_hanging() {
        // A peer gone before the barrier is entered...
        let mut ranks = ThreadGroup::new(2, 2, Duration::from_secs(30));
        let r1 = ranks.pop().expect("rank 1");
        let r0 = ranks.pop().expect("rank 0");
        drop(r1);
        let err = r0.barrier().expect_err("must fail");
        assert!(err.to_string().contains("stage 2 TP rank 1"), "{err}");
        // ...and one leaving while the barrier waits, or just before (either order must fail
        // with the same error; there is no hook to force the interleaving, so both run).
        for _ in 0..20 {
            let mut ranks = ThreadGroup::new(2, 2, Duration::from_secs(30));
            let r1 = ranks.pop().expect("rank 1");
            let r0 = ranks.pop().expect("rank 0");
            let t = std::thread::spawn(move || r0.barrier());
            drop(r1);
            let err = t.join().expect("thread").expect_err("must fail");
            assert!(err.to_string().contains("stage 2 TP rank 1"), "{err}");
        }
    }
}
