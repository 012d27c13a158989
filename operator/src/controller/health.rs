//! What `/healthz` (the liveness probe) checks. The reconcile timeout and the renew deadline end
//! a slow reconcile or a lost leadership by themselves; when they cannot (a thread is blocked, so
//! the timer's task is never polled), the process is stuck and only a restart helps. Two rules,
//! decided by the pure [`health_verdict`]:
//!
//! - a reconcile in flight for longer than the reconcile timeout plus [`STUCK_GRACE`];
//! - while leading, a last successful renewal older than the renew deadline plus
//!   [`LEADER_GRACE`] (client-go's `HealthzAdaptor`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How far past the reconcile timeout a reconcile may run before the process counts as stuck
/// (the timeout fires on the next poll; this leaves room for a busy runtime).
pub const STUCK_GRACE: Duration = Duration::from_secs(30);

/// How far past the renew deadline the leader's last renewal may be before the process counts
/// as stuck (client-go's HealthzAdaptor uses the same slack).
pub const LEADER_GRACE: Duration = Duration::from_secs(5);

/// One reconcile in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// `llmdeployment` or `gpupool`.
    pub controller: &'static str,
    /// `namespace/name`, or `name` for cluster-scoped objects.
    pub object: String,
    /// When it started.
    pub started: Instant,
}

/// This process leads: when it last renewed the Lease, and how old that may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leading {
    /// The last successful renewal.
    pub renewed: Instant,
    /// The renew deadline plus [`LEADER_GRACE`].
    pub limit: Duration,
}

/// Healthy, or why not: every reconcile in flight longer than `stuck_after` (oldest first,
/// with controller, object and age), and a leader whose renewal is older than its limit.
pub fn health_verdict(
    now: Instant,
    in_flight: &[InFlight],
    stuck_after: Duration,
    leading: Option<Leading>,
) -> Result<(), String> {
    let mut stuck: Vec<(Duration, &InFlight)> = in_flight
        .iter()
        .map(|r| (now.saturating_duration_since(r.started), r))
        .filter(|(age, _)| *age > stuck_after)
        .collect();
    stuck.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.object.cmp(&b.1.object)));
    let mut problems: Vec<String> = stuck
        .iter()
        .map(|(age, r)| {
            format!(
                "the {} controller's reconcile of {} has run for {}s, over the {}s limit (reconcile timeout + {}s): it is stuck",
                r.controller,
                r.object,
                age.as_secs(),
                stuck_after.as_secs(),
                STUCK_GRACE.as_secs()
            )
        })
        .collect();
    if let Some(l) = leading {
        let age = now.saturating_duration_since(l.renewed);
        if age > l.limit {
            problems.push(format!(
                "this process leads but last renewed the leader lease {}s ago, over the {}s limit (renew deadline + {}s)",
                age.as_secs(),
                l.limit.as_secs(),
                LEADER_GRACE.as_secs()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    in_flight: HashMap<u64, InFlight>,
    renewed: Option<Instant>,
}

/// The reconciles in flight and the leader's last renewal, for `/healthz`.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    stuck_after: Duration,
    renew_limit: Duration,
}

impl Health {
    /// Limits from the operator's reconcile timeout and renew deadline.
    pub fn new(reconcile_timeout: Duration, renew_deadline: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            stuck_after: reconcile_timeout.saturating_add(STUCK_GRACE),
            renew_limit: renew_deadline.saturating_add(LEADER_GRACE),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a reconcile of `object` by `controller` as started now; it stays registered
    /// until the guard drops (it finished, failed, timed out or was cancelled).
    pub fn start(self: &Arc<Self>, controller: &'static str, object: String) -> InFlightGuard {
        self.start_at(controller, object, Instant::now())
    }

    /// [`Self::start`] with a given start time.
    pub fn start_at(
        self: &Arc<Self>,
        controller: &'static str,
        object: String,
        started: Instant,
    ) -> InFlightGuard {
        let mut s = self.state();
        let id = s.next;
        s.next = s.next.wrapping_add(1);
        s.in_flight.insert(
            id,
            InFlight {
                controller,
                object,
                started,
            },
        );
        InFlightGuard {
            health: self.clone(),
            id,
        }
    }

    /// This process leads and last renewed at `renewed`; `None`: it does not lead.
    pub fn leading(&self, renewed: Option<Instant>) {
        self.state().renewed = renewed;
    }

    /// The reconciles in flight now.
    pub fn in_flight(&self) -> Vec<InFlight> {
        self.state().in_flight.values().cloned().collect()
    }

    /// [`health_verdict`] on the current state.
    pub fn check(&self, now: Instant) -> Result<(), String> {
        let (in_flight, renewed) = {
            let s = self.state();
            (s.in_flight.values().cloned().collect::<Vec<_>>(), s.renewed)
        };
        let leading = renewed.map(|renewed| Leading {
            renewed,
            limit: self.renew_limit,
        });
        health_verdict(now, &in_flight, self.stuck_after, leading)
    }
}

/// Unregisters its reconcile when dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    health: Arc<Health>,
    id: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.health.state().in_flight.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_verdict_table() {
        let t0 = Instant::now();
        let now = t0 + secs(1000);
        let rec = |controller, object: &str, age: u64| InFlight {
            controller,
            object: object.into(),
            started: now - secs(age),
        };
        let leading = |age: u64| {
            Some(Leading {
                renewed: now - secs(age),
                limit: secs(15),
            })
        };
        let stuck_after = secs(150);
        // (what, in flight, leading, Ok or (substrings the message must contain, must not))
        type Want = Option<(Vec<&'static str>, Vec<&'static str>)>;
        let cases: Vec<(&str, Vec<InFlight>, Option<Leading>, Want)> = vec![
            ("idle standby", vec![], None, None),
            ("idle leader, fresh renewal", vec![], leading(2), None),
            ("leader renewal at the limit", vec![], leading(15), None),
            (
                "leader renewal past the limit",
                vec![],
                leading(16),
                Some((
                    vec!["renewed the leader lease 16s ago", "15s limit"],
                    vec!["reconcile"],
                )),
            ),
            (
                "a young reconcile",
                vec![rec("llmdeployment", "ml/a", 10)],
                leading(1),
                None,
            ),
            (
                "a reconcile at the limit",
                vec![rec("llmdeployment", "ml/a", 150)],
                None,
                None,
            ),
            (
                "a reconcile past the limit",
                vec![rec("llmdeployment", "ml/a", 151)],
                None,
                Some((
                    vec!["llmdeployment", "ml/a", "151s", "150s limit", "stuck"],
                    vec!["lease"],
                )),
            ),
            (
                "a stuck pool among young deployments",
                vec![
                    rec("llmdeployment", "ml/a", 3),
                    rec("gpupool", "rtx4090", 400),
                ],
                leading(1),
                Some((
                    vec!["gpupool controller's reconcile of rtx4090 has run for 400s"],
                    vec!["ml/a", "lease"],
                )),
            ),
            (
                "both rules at once",
                vec![rec("gpupool", "p", 200)],
                leading(60),
                Some((
                    vec!["reconcile of p", "renewed the leader lease 60s ago"],
                    vec![],
                )),
            ),
        ];
        for (what, in_flight, leading, want) in cases {
            let got = health_verdict(now, &in_flight, stuck_after, leading);
            match (want, got) {
                (None, Ok(())) => {}
                (Some((has, lacks)), Err(msg)) => {
                    for p in has {
                        assert!(msg.contains(p), "{what}: {msg:?} lacks {p:?}");
                    }
                    for p in lacks {
                        assert!(!msg.contains(p), "{what}: {msg:?} names {p:?}");
                    }
                }
                (want, got) => panic!("{what}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn stuck_reconciles_are_listed_oldest_first() {
        let t0 = Instant::now();
        let now = t0 + secs(1000);
        let r = |o: &str, age| InFlight {
            controller: "llmdeployment",
            object: o.into(),
            started: now - secs(age),
        };
        let msg = health_verdict(now, &[r("ns/b", 200), r("ns/a", 300)], secs(10), None)
            .expect_err("stuck");
        let (a, b) = (msg.find("ns/a"), msg.find("ns/b"));
        assert!(a.is_some() && b.is_some() && a < b, "{msg}");
    }

    #[test]
    fn a_start_in_the_future_is_not_stuck() {
        let now = Instant::now();
        let r = InFlight {
            controller: "gpupool",
            object: "p".into(),
            started: now + secs(5),
        };
        assert_eq!(health_verdict(now, &[r], secs(1), None), Ok(()));
    }

    #[test]
    fn the_guard_unregisters_its_reconcile() {
        let h = Arc::new(Health::new(secs(120), secs(10)));
        let old = Instant::now()
            .checked_sub(secs(200))
            .expect("the clock is past 200 s");
        let g = h.start_at("llmdeployment", "ml/a".into(), old);
        let young = h.start("gpupool", "p".into());
        assert_eq!(h.in_flight().len(), 2);
        let msg = h.check(Instant::now()).expect_err("stuck");
        assert!(msg.contains("ml/a") && !msg.contains("of p "), "{msg}");
        drop(g);
        assert_eq!(h.check(Instant::now()), Ok(()));
        drop(young);
        assert!(h.in_flight().is_empty());
        h.leading(Some(old));
        assert!(h.check(Instant::now()).is_err(), "a stale renewal");
        h.leading(None);
        assert_eq!(h.check(Instant::now()), Ok(()), "a standby has no renewals");
    }
}
