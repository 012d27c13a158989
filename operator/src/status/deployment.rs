//! The LlmDeployment status: conditions, phase and group counts from the plan outcome and the
//! groups as they are; and the small decisions around it (does the plan need recomputing, does
//! a pool change matter to a deployment). Values in, values out.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use whaleflux_crds::{GpuPool, LlmDeployment, LlmDeploymentStatus, Phase, Plan};

use super::condition;
use crate::resources::children::{self, CONFIG_HASH_ANNOTATION, GROUP_LABEL};

pub fn condition_of<'a>(status: Option<&'a LlmDeploymentStatus>, t: &str) -> Option<&'a Condition> {
    status.and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
}

/// Whether `d`'s status holds a plan chosen for its current generation (the watch cache has
/// caught up with the plan this process chose).
pub fn planned_at_generation(d: &LlmDeployment) -> bool {
    d.status.as_ref().is_some_and(|s| s.plan.is_some())
        && condition_of(d.status.as_ref(), "Planned")
            .is_some_and(|c| c.status == "True" && c.observed_generation == d.metadata.generation)
}

/// What one existing replica group looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupState {
    /// Group number.
    pub index: i32,
    /// Config hash on its pod template.
    pub hash: String,
    /// Every pod of the current template is ready.
    pub ready: bool,
    /// What failover did to it, if anything.
    pub fault: Option<GroupFault>,
}

/// A replica group failover acted on (or could not).
#[derive(Debug, Clone, PartialEq)]
pub enum GroupFault {
    /// Recreated after this fault; not ready again yet.
    Recreated(String),
    /// Faulty with its restart budget spent: left alone.
    Exhausted(String),
}

pub fn group_state(sts: &StatefulSet) -> Option<GroupState> {
    let index = sts.labels().get(GROUP_LABEL)?.parse::<i32>().ok()?;
    let spec = sts.spec.as_ref()?;
    let want = spec.replicas.unwrap_or(1);
    let hash = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    let ready = sts.status.as_ref().is_some_and(|s| {
        s.observed_generation >= sts.metadata.generation
            && s.replicas == want
            && s.ready_replicas.unwrap_or(0) == want
            && s.updated_replicas.unwrap_or(want) == want
    });
    Some(GroupState {
        index,
        hash,
        ready,
        fault: None,
    })
}

/// What to do with one replica group of a new (or unchanged) plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    /// It does not exist: create it.
    Create,
    /// It runs the current configuration: apply it again (a no-op unless it drifted).
    Keep,
    /// It runs an older configuration and it is its turn: replace it.
    Replace,
    /// It runs an older configuration and another group is being replaced: keep serving.
    Wait,
}

/// The rollout of `groups` (number, config hash of the plan) over the `existing` groups: one
/// group at a time, so the deployment keeps serving while a new plan rolls out. A group that
/// runs the current configuration but is not ready yet is a creation or replacement in
/// progress: no other group is replaced until it is ready.
pub fn rollout(
    groups: &[(i32, &str)],
    existing: &std::collections::BTreeMap<i32, GroupState>,
) -> Vec<Rollout> {
    let mut slot_free = !groups
        .iter()
        .any(|(i, hash)| existing.get(i).is_some_and(|s| s.hash == *hash && !s.ready));
    groups
        .iter()
        .map(|(i, hash)| match existing.get(i) {
            None => Rollout::Create,
            Some(s) if s.hash == *hash => Rollout::Keep,
            Some(_) if slot_free => {
                slot_free = false;
                Rollout::Replace
            }
            Some(_) => Rollout::Wait,
        })
        .collect()
}

/// Whether the plan must be (re)computed: no plan yet, the spec changed since it was planned,
/// the last attempt failed, or a node it uses left the pool or became unusable.
pub fn needs_plan(d: &LlmDeployment, pool: &GpuPool, now: Timestamp) -> bool {
    let status = d.status.as_ref();
    let Some(plan) = status.and_then(|s| s.plan.as_ref()) else {
        return true;
    };
    // A plan reduced for lack of GPUs is retried on every pool change, to grow back.
    if plan.replicas < d.spec.replicas {
        return true;
    }
    let planned = condition_of(status, "Planned");
    if planned.is_none_or(|c| c.status != "True" || c.observed_generation != d.metadata.generation)
    {
        return true;
    }
    let nodes = pool.status.as_ref().map(|s| &s.nodes);
    let usable = |name: &str| {
        nodes
            .and_then(|ns| ns.iter().find(|n| n.name == name))
            .is_some_and(|n| n.ready && n.quarantined_until.as_ref().is_none_or(|t| t.0 <= now))
    };
    plan.groups
        .iter()
        .flat_map(|g| g.nodes.iter())
        .chain(plan.stages.iter().map(|s| &s.node))
        .any(|n| !usable(n))
}

/// Whether a pool change can matter to `d` (the pool controller's mapper asks this so a busy
/// pool does not wake every deployment on it).
///
/// Only deployments that wait on the pool count: those that could not be planned on it, and
/// those whose plan uses a node the pool no longer offers. A deployment not reconciled yet
/// (no status) is woken by its own creation, not by every pool update.
pub fn pool_change_matters(d: &LlmDeployment, pool: &GpuPool) -> bool {
    d.spec.gpu_pool == pool.name_any()
        && d.metadata.deletion_timestamp.is_none()
        && d.status.is_some()
        && needs_plan(d, pool, Timestamp::now())
}

pub fn plan_summary(plan: &Plan) -> String {
    let placement: Vec<String> = plan
        .groups
        .iter()
        .map(|g| format!("group {} on {}", g.index, g.nodes.join(",")))
        .collect();
    format!(
        "TP {} x PP {} ({} GPU(s) per group, {}), {} replica group(s){}{}",
        plan.tensor_parallel,
        plan.pipeline_parallel,
        plan.gpus_per_replica,
        plan.gpu_model,
        plan.replicas,
        if placement.is_empty() { "" } else { ": " },
        placement.join("; ")
    )
}

/// What planning gave: the plan to run (the new one, or the previous one when planning failed)
/// and the Planned condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The plan to run, if any.
    pub plan: Option<Plan>,
    /// Planned condition: (status, reason, message).
    pub condition: (bool, &'static str, String),
    /// The plan runs fewer replica groups than the spec asks, because the pool lacks the GPUs
    /// for more: why.
    pub reduced: Option<String>,
}

/// The status of `d` from the planning outcome, its groups as they are (ready or not), whether
/// groups are being replaced (`rolling`) or were just created, and the time.
pub fn deployment_status(
    d: &LlmDeployment,
    planned: &Planned,
    groups: &[GroupState],
    rolling: bool,
    created_now: bool,
    now: Timestamp,
) -> LlmDeploymentStatus {
    let generation = d.metadata.generation;
    let previous = d
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    // With reduced capacity the plan's groups are what can be had.
    let want = match (&planned.reduced, &planned.plan) {
        (Some(_), Some(p)) => p.replicas.min(d.spec.replicas.max(0)),
        _ => d.spec.replicas.max(0),
    };
    let ready = groups.iter().filter(|g| g.ready).count() as i32;
    let recreating = groups.iter().find_map(|g| match &g.fault {
        Some(GroupFault::Recreated(why)) if !g.ready => Some((g.index, why)),
        _ => None,
    });
    let exhausted: Vec<String> = groups
        .iter()
        .filter_map(|g| match &g.fault {
            Some(GroupFault::Exhausted(why)) => Some(format!("group {}: {why}", g.index)),
            _ => None,
        })
        .collect();
    let (plan_ok, plan_reason, plan_msg) = &planned.condition;
    let planned_c = condition(
        "Planned",
        *plan_ok,
        plan_reason,
        plan_msg.clone(),
        generation,
        &previous,
        now,
    );
    let settled = *plan_ok && ready == want && !rolling;
    let progressing = condition(
        "Progressing",
        *plan_ok && !settled,
        if !plan_ok {
            "NotPlanned"
        } else if recreating.is_some() {
            "RecreatingGroup"
        } else if rolling {
            "ReplacingGroups"
        } else if settled {
            "Complete"
        } else {
            "StartingGroups"
        },
        if let Some((index, why)) = recreating {
            format!("replica group {index} recreated after a fault: {why}")
        } else if settled {
            format!("{ready} of {want} replica group(s) ready")
        } else if rolling {
            format!(
                "replacing replica groups one at a time; {ready} of {want} ready with the current plan"
            )
        } else {
            format!("{ready} of {want} replica group(s) ready")
        },
        generation,
        &previous,
        now,
    );
    let ready_c = condition(
        "Ready",
        ready >= 1,
        if ready >= 1 {
            "GroupsReady"
        } else if want == 0 {
            "ScaledToZero"
        } else {
            "NoGroupReady"
        },
        format!("{ready} of {want} replica group(s) have every pod ready"),
        generation,
        &previous,
        now,
    );
    // Degraded: the deployment had settled and lost a group without being asked to change.
    let was_settled = previous
        .iter()
        .any(|c| c.type_ == "Progressing" && c.status == "False" && c.reason == "Complete");
    let lost = *plan_ok && ready < want && !rolling && !created_now && was_settled;
    let degraded_c = if !exhausted.is_empty() {
        condition(
            "Degraded",
            true,
            "RestartBudgetExhausted",
            format!(
                "restart budget of {} per hour spent, not recreated again: {}",
                d.spec.failover.restart_budget,
                exhausted.join("; ")
            ),
            generation,
            &previous,
            now,
        )
    } else if let (true, Some(why)) = (*plan_ok, &planned.reduced) {
        condition(
            "Degraded",
            true,
            "ReducedCapacity",
            format!(
                "running {want} of {} replica group(s) ({why}); the rest come back when the pool has the GPUs",
                d.spec.replicas
            ),
            generation,
            &previous,
            now,
        )
    } else if !plan_ok && groups.iter().any(|g| g.ready) {
        condition(
            "Degraded",
            true,
            "NoPlanForSpec",
            format!("serving the previous plan: {plan_msg}"),
            generation,
            &previous,
            now,
        )
    } else if lost {
        condition(
            "Degraded",
            true,
            "GroupsUnavailable",
            format!("{} of {want} replica group(s) not ready", want - ready),
            generation,
            &previous,
            now,
        )
    } else {
        condition(
            "Degraded",
            false,
            "AsPlanned",
            "no replica group lost".into(),
            generation,
            &previous,
            now,
        )
    };
    let degraded = degraded_c.status == "True";
    let phase = if !plan_ok && !degraded {
        Phase::Failed
    } else if degraded {
        Phase::Degraded
    } else if settled {
        Phase::Ready
    } else {
        Phase::Progressing
    };
    LlmDeploymentStatus {
        observed_generation: generation,
        phase,
        conditions: vec![planned_c, progressing, ready_c, degraded_c],
        plan: planned.plan.clone(),
        replicas: groups.len() as i32,
        ready_replicas: ready,
        selector: Some(children::worker_selector_string(&d.name_any())),
        endpoint: children::endpoint(d),
        // Failover's decision (the controller's) fills it.
        restarts: Vec::new(),
    }
}

#[cfg(test)]
#[path = "deployment_tests.rs"]
mod tests;
