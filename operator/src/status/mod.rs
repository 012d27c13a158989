//! Pure status decisions: what the GpuPool and LlmDeployment statuses say, from values in to
//! values out (no client, no clock of its own: the time is an input). The controllers read,
//! call these, and apply what they return.

pub mod deployment;
pub mod failover;
pub mod pool;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A standard condition; `lastTransitionTime` is kept from `previous` when the status did not
/// change, as the API conventions ask.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}
