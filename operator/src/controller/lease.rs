//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! acquire when the Lease is free, ours, or has not changed for its duration (measured on our own
//! clock from when we last saw it change, so clock skew between operators does not matter);
//! renew well inside the duration; every write is an update conditional on the resourceVersion
//! read, so two candidates can never both win. kube-runtime 5 ships no leader election.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

/// Where the Lease is and how it is held.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This process's identity (holderIdentity).
    pub identity: String,
    /// How long a Lease stays ours without renewal.
    pub duration: Duration,
    /// How often the holder renews (well under `duration`).
    pub renew_every: Duration,
    /// How often a candidate retries.
    pub retry_every: Duration,
}

/// A held Lease: the last version we wrote and when.
#[derive(Debug, Clone)]
pub struct Held {
    lease: Lease,
    renewed: Instant,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Waits until this process holds the Lease. `on_contact` runs after every answer from the API
/// server (readiness).
pub async fn acquire(api: &Api<Lease>, cfg: &LeaseConfig, on_contact: impl Fn()) -> Held {
    // (resourceVersion, when we first saw it)
    let mut observed: Option<(String, Instant)> = None;
    loop {
        match try_acquire(api, cfg, &mut observed).await {
            Ok(Some(held)) => {
                on_contact();
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "acquired the leader lease");
                return held;
            }
            Ok(None) => on_contact(),
            Err(e) if is_conflict(&e) => {
                on_contact();
                tracing::debug!("lost a race for the lease: {e}");
                continue;
            }
            Err(e) => tracing::warn!(lease = %cfg.name, "reading the leader lease: {e}"),
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
        let lease = api.create(&PostParams::default(), &lease).await?;
        return Ok(Some(Held {
            lease,
            renewed: Instant::now(),
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
    let lease = api
        .replace(&cfg.name, &PostParams::default(), &lease)
        .await?;
    Ok(Some(Held {
        lease,
        renewed: Instant::now(),
    }))
}

/// Renews the Lease until it is lost: another holder took it, or no renewal succeeded for the
/// Lease's duration. Returns why.
pub async fn hold(api: &Api<Lease>, cfg: &LeaseConfig, mut held: Held) -> String {
    loop {
        tokio::time::sleep(cfg.renew_every).await;
        let mut lease = held.lease.clone();
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(now());
        }
        match api.replace(&cfg.name, &PostParams::default(), &lease).await {
            Ok(l) => {
                held = Held {
                    lease: l,
                    renewed: Instant::now(),
                };
            }
            Err(e) => {
                tracing::warn!("renewing the leader lease: {e}");
                // A conflict: someone wrote the Lease. Read it: still ours (e.g. our own write
                // whose answer was lost) → continue from it; someone else's → lost.
                if let Ok(Some(current)) = api.get_opt(&cfg.name).await {
                    let holder = current
                        .spec
                        .as_ref()
                        .and_then(|s| s.holder_identity.clone())
                        .unwrap_or_default();
                    if holder != cfg.identity {
                        return format!("the lease is now held by {holder:?}");
                    }
                    held.lease = current;
                }
            }
        }
        if held.renewed.elapsed() >= cfg.duration {
            return format!(
                "the lease was not renewed for {}s",
                cfg.duration.as_secs_f64()
            );
        }
    }
}

/// Gives the Lease up on a clean shutdown so a standby takes over at once rather than after the
/// Lease's duration.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
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
