//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! acquire when the Lease is free, ours, or has not changed for its duration (measured on our own
//! clock from when we last saw it change, so clock skew between operators does not matter);
//! the holder renews every retry period and gives up leading when no renewal succeeded within
//! the renew deadline, which is shorter than the duration, so it stops before any standby may
//! take over. Every API call is bounded by a timeout, and every write is an update conditional on
//! the resourceVersion read, so two candidates can never both win. kube-runtime 5 ships no leader
//! election.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

/// Where the Lease is and how it is held (client-go's timings: 15 s, 10 s, 2 s).
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This process's identity (holderIdentity).
    pub identity: String,
    /// How long a standby waits, from when it last saw the Lease change, before it takes the
    /// Lease over (client-go's LeaseDuration).
    pub duration: Duration,
    /// How long the holder keeps trying to renew before it stops leading (client-go's
    /// RenewDeadline). Shorter than `duration`: the old leader has stopped before a standby's
    /// clock lets it take over. Also bounds each acquisition attempt.
    pub renew_deadline: Duration,
    /// How often the holder renews and a candidate retries (client-go's RetryPeriod).
    pub retry_every: Duration,
}

/// A held Lease: the last version we wrote and when the write that made it was sent.
#[derive(Debug, Clone)]
pub struct Held {
    lease: Lease,
    renewed: Instant,
}

impl Held {
    /// When the last successful write of the Lease was sent (the renew deadline counts from
    /// here).
    pub fn renewed(&self) -> Instant {
        self.renewed
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Waits until this process holds the Lease. `on_contact` runs after every answer from the API
/// server (readiness). Each attempt is bounded by the renew deadline: a slower one would leave
/// no time to renew what it won.
pub async fn acquire(api: &Api<Lease>, cfg: &LeaseConfig, on_contact: impl Fn()) -> Held {
    // (resourceVersion, when we first saw it)
    let mut observed: Option<(String, Instant)> = None;
    loop {
        let attempt =
            tokio::time::timeout(cfg.renew_deadline, try_acquire(api, cfg, &mut observed)).await;
        match attempt {
            Ok(Ok(Some(held))) => {
                on_contact();
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "acquired the leader lease");
                return held;
            }
            Ok(Ok(None)) => on_contact(),
            Ok(Err(e)) if is_conflict(&e) => {
                on_contact();
                tracing::debug!("lost a race for the lease: {e}");
                continue;
            }
            Ok(Err(e)) => tracing::warn!(lease = %cfg.name, "reading the leader lease: {e}"),
            Err(_) => tracing::warn!(
                lease = %cfg.name,
                "the API server did not answer within {:?} while acquiring the leader lease",
                cfg.renew_deadline
            ),
        }
        tokio::time::sleep(cfg.retry_every).await;
    }
}

async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Option<(String, Instant)>,
) -> Result<Option<Held>, kube::Error> {
    let duration_s = i32::try_from(cfg.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(current) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration_s),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        let sent = Instant::now();
        let lease = api.create(&PostParams::default(), &lease).await?;
        return Ok(Some(Held {
            lease,
            renewed: sent,
        }));
    };
    let rv = current
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    if observed.as_ref().is_none_or(|(seen, _)| *seen != rv) {
        *observed = Some((rv, Instant::now()));
    }
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let their_duration = Duration::from_secs(
        u64::try_from(spec.lease_duration_seconds.unwrap_or(duration_s)).unwrap_or(0),
    );
    let expired = observed
        .as_ref()
        .is_some_and(|(_, seen)| seen.elapsed() >= their_duration);
    if !(holder.is_empty() || holder == cfg.identity || expired) {
        return Ok(None);
    }
    let mut lease = current;
    let transitions = spec.lease_transitions.unwrap_or(0);
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(duration_s),
        acquire_time: if holder == cfg.identity {
            spec.acquire_time.clone()
        } else {
            Some(now())
        },
        renew_time: Some(now()),
        lease_transitions: Some(if holder == cfg.identity {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..spec
    });
    if !holder.is_empty() && holder != cfg.identity {
        tracing::info!(previous = %holder, "taking over the leader lease");
    }
    // The update carries the resourceVersion we read: a concurrent writer makes it 409.
    let sent = Instant::now();
    let lease = api
        .replace(&cfg.name, &PostParams::default(), &lease)
        .await?;
    Ok(Some(Held {
        lease,
        renewed: sent,
    }))
}

/// What one renewal attempt found.
enum Renewal {
    /// Written: the new version.
    Renewed(Lease),
    /// Not written, but the Lease is still ours: carry on from this version.
    Stale(Lease),
    /// Not written, nothing learnt (the API server failed).
    Failed,
    /// Someone else holds it now.
    Lost(String),
}

async fn renew(api: &Api<Lease>, cfg: &LeaseConfig, held: &Lease) -> Renewal {
    let mut lease = held.clone();
    if let Some(spec) = lease.spec.as_mut() {
        spec.renew_time = Some(now());
    }
    let e = match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(l) => return Renewal::Renewed(l),
        Err(e) => e,
    };
    tracing::warn!("renewing the leader lease: {e}");
    // A conflict: someone wrote the Lease. Read it: still ours (e.g. our own write whose answer
    // was lost) → continue from it; someone else's → lost.
    match api.get_opt(&cfg.name).await {
        Ok(Some(current)) => {
            let holder = current
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.clone())
                .unwrap_or_default();
            if holder == cfg.identity {
                Renewal::Stale(current)
            } else {
                Renewal::Lost(holder)
            }
        }
        Ok(None) => Renewal::Failed,
        Err(e) => {
            tracing::warn!("reading the leader lease: {e}");
            Renewal::Failed
        }
    }
}

/// Renews the Lease every retry period until it is lost: another holder took it, or no renewal
/// succeeded within the renew deadline (each attempt, and the read inside it, is cut off at the
/// deadline). Returns why. `on_renewed` gets the time of every successful renewal (health).
pub async fn hold(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    mut held: Held,
    on_renewed: impl Fn(Instant),
) -> String {
    loop {
        let deadline = held.renewed + cfg.renew_deadline;
        tokio::time::sleep_until((Instant::now() + cfg.retry_every).min(deadline)).await;
        let started = Instant::now();
        if started >= deadline {
            return deadline_passed(cfg, &held);
        }
        match tokio::time::timeout_at(deadline, renew(api, cfg, &held.lease)).await {
            Ok(Renewal::Renewed(lease)) => {
                held = Held {
                    lease,
                    renewed: started,
                };
                on_renewed(started);
            }
            Ok(Renewal::Stale(lease)) => held.lease = lease,
            Ok(Renewal::Failed) => {}
            Ok(Renewal::Lost(holder)) => return format!("the lease is now held by {holder:?}"),
            Err(_) => return deadline_passed(cfg, &held),
        }
    }
}

fn deadline_passed(cfg: &LeaseConfig, held: &Held) -> String {
    format!(
        "the lease could not be renewed within the renew deadline of {}s (last renewed {:.1}s ago)",
        cfg.renew_deadline.as_secs_f64(),
        held.renewed.elapsed().as_secs_f64()
    )
}

/// Gives the Lease up on a clean shutdown so a standby takes over at once rather than after the
/// Lease's duration. Bounded by the renew deadline, so a silent API server cannot hold up the
/// exit.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    if tokio::time::timeout(cfg.renew_deadline, try_release(api, cfg))
        .await
        .is_err()
    {
        tracing::warn!(
            "releasing the leader lease: no answer within {:?}",
            cfg.renew_deadline
        );
    }
}

async fn try_release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => tracing::info!("released the leader lease"),
        Err(e) => tracing::warn!("releasing the leader lease: {e}"),
    }
}
