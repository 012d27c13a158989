//! A small fork-join pool for the many short parallel loops of one decode step. Workers spin
//! briefly on a generation counter before parking, and the calling thread takes part, so a
//! dispatch costs well under a microsecond instead of a sleep/wake round trip.
//!
//! Items are claimed dynamically and a dispatch ends when every item is done, not when every
//! worker has checked in: on a busy machine a descheduled worker that never claimed an item
//! costs nothing (the caller runs its share) instead of stalling each step for a time slice.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How long an idle worker spins before parking.
const SPIN_ITERS: u32 = 1 << 16;

struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

struct Shared {
    epoch: AtomicUsize,
    job: AtomicPtr<()>,
    stop: AtomicBool,
    /// Workers between announcing themselves and leaving the current job; the dispatcher
    /// withdraws the job pointer and waits for this to drop to zero before the job dies.
    active: AtomicUsize,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

/// The pool; `threads - 1` workers plus the caller.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    busy: Mutex<()>,
}

fn run_items(job: &Job<'_>) {
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.n {
            break;
        }
        if catch_unwind(AssertUnwindSafe(|| (job.f)(i))).is_err() {
            job.panicked.store(true, Ordering::Relaxed);
        }
        job.done.fetch_add(1, Ordering::SeqCst);
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0u32;
        loop {
            let e = shared.epoch.load(Ordering::SeqCst);
            if e != seen {
                seen = e;
                break;
            }
            if spins < SPIN_ITERS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let guard = shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            let mut guard = guard;
            while shared.epoch.load(Ordering::SeqCst) == seen && !shared.stop.load(Ordering::SeqCst)
            {
                guard = shared.cv.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
            spins = 0;
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        shared.active.fetch_add(1, Ordering::SeqCst);
        let ptr = shared.job.load(Ordering::SeqCst) as *const Job<'_>;
        if !ptr.is_null() {
            // SAFETY: we announced ourselves in `active` before loading a non-null pointer, so
            // the dispatcher (which nulls the pointer, then waits for `active == 0`) keeps the
            // job alive until we leave below.
            run_items(unsafe { &*ptr });
        }
        shared.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    /// Start `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("wf-cpu-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(Self {
            shared,
            workers,
            busy: Mutex::new(()),
        })
    }

    fn wake(&self) {
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.cv.notify_all();
        }
    }

    /// Run `f(i)` for `i` in `0..n` on all threads; returns when every call has finished.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() || n <= 1 {
            (0..n).for_each(f);
            return;
        }
        // One dispatch at a time (the engine is single-threaded, but stay safe).
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let job = Job {
            f,
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        };
        self.shared
            .job
            .store(&job as *const Job<'_> as *mut (), Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.wake();
        run_items(&job);
        // Items a worker claimed but has not finished: wait (yielding after a while, in case
        // that worker is descheduled and needs this core).
        let mut spins = 0u32;
        while job.done.load(Ordering::SeqCst) < n {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.shared
            .job
            .store(std::ptr::null_mut(), Ordering::SeqCst);
        while self.shared.active.load(Ordering::SeqCst) > 0 {
            std::hint::spin_loop();
        }
        assert!(
            !job.panicked.load(Ordering::Relaxed),
            "a CPU worker task panicked"
        );
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.cv.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_exactly_once_across_many_dispatches() {
        for threads in [1, 2, 3, 4] {
            let pool = Pool::new(threads).expect("pool");
            // Each dispatch on its own counters, one extra slot catching an index >= n; read
            // as soon as run() returns, which must mean every call has finished.
            let check = |n: usize, what: &str| {
                let hits: Vec<AtomicUsize> = (0..=n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i.min(n)].fetch_add(1, Ordering::Relaxed);
                });
                for (i, h) in hits[..n].iter().enumerate() {
                    assert_eq!(
                        h.load(Ordering::Relaxed),
                        1,
                        "{what}: {threads} threads, {n} items: index {i}"
                    );
                }
                assert_eq!(
                    hits[n].load(Ordering::Relaxed),
                    0,
                    "{what}: an index >= {n} ran"
                );
            };
            for round in 0..500 {
                check(1 + round % 97, "busy");
            }
            // Wait until the workers have parked (no sleep: their own count says so), then
            // dispatch again: parked workers are woken.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while pool.shared.sleepers.load(Ordering::SeqCst) < threads - 1 {
                assert!(std::time::Instant::now() < deadline, "workers never parked");
                std::thread::yield_now();
            }
            check(10, "after parking");
        }
    }

    #[test]
    fn a_panicking_task_is_reported_not_hung() {
        let pool = Pool::new(2).expect("pool");
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|i| assert!(i != 5, "boom"));
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(4, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }
}
