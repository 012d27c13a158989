//! Failover decisions for one LlmDeployment: from its groups' pods, the nodes they run on, the
//! restarts already spent and the clock, which groups to recreate (all of their pods at once, as
//! LeaderWorkerSet's `RecreateGroupOnPodRestart`), which nodes to quarantine, which pods of dead
//! nodes to force-delete, and which groups have spent their restart budget. Values in, values
//! out: the controller reads, calls [`decide`], and applies what it returns.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use whaleflux_crds::GroupRestart;
use whaleflux_crds::worker::{EXIT_GPU_FAULT, EXIT_GROUP_FAILED};

use super::pool::QUARANTINE_ANNOTATION;
use crate::resources::children::{CONFIG_HASH_ANNOTATION, GROUP_LABEL, POD_INDEX_LABEL};

/// Annotation beside [`QUARANTINE_ANNOTATION`] saying why the node was quarantined.
pub const QUARANTINE_REASON_ANNOTATION: &str = "whaleflux.io/quarantine-reason";

/// The window `spec.failover.restartBudget` counts restarts in.
pub const BUDGET_WINDOW: SignedDuration = SignedDuration::from_secs(3600);

/// A pod created this long after its group's first pod replaced a deleted one (the pods of a
/// group are created together: `podManagementPolicy: Parallel`).
pub const REPLACED_AFTER: SignedDuration = SignedDuration::from_secs(10);

/// How a container last ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    /// The termination message (or the end of the log, `FallbackToLogsOnError`).
    pub message: String,
}

/// What failover reads of one worker pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub name: String,
    pub group: i32,
    /// Pipeline stage (the StatefulSet ordinal).
    pub rank: i32,
    pub node: Option<String>,
    /// Second precision, as the API server stores it.
    pub created: Timestamp,
    /// The config hash of the template the pod was made from.
    pub hash: String,
    pub terminating: bool,
    /// Every container answers its readiness probe (the worker's own `/readyz`; not the
    /// pod's Ready condition, which also waits on the operator's group-ready gate).
    pub ready: bool,
    /// Container restarts, summed.
    pub restarts: i32,
    /// `status.phase` is Failed.
    pub failed: bool,
    /// The last time a container ended (current or last state).
    pub exit: Option<Exit>,
}

impl PodView {
    /// The view of a worker pod; None when it lacks the group labels or a creation time.
    pub fn of(pod: &Pod) -> Option<Self> {
        let labels = pod.labels();
        let group = labels.get(GROUP_LABEL)?.parse().ok()?;
        let rank = labels
            .get(POD_INDEX_LABEL)
            .and_then(|r| r.parse().ok())
            .or_else(|| pod.name_any().rsplit('-').next()?.parse().ok())
            .unwrap_or(0);
        let status = pod.status.as_ref();
        let containers = status
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or_default();
        let ended = |t: &ContainerStateTerminated| Exit {
            code: t.exit_code,
            message: t.message.clone().unwrap_or_default().trim().to_string(),
        };
        let exit = containers.iter().find_map(|c| {
            c.state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))
                .map(ended)
        });
        Some(Self {
            name: pod.name_any(),
            group,
            rank,
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            created: pod.metadata.creation_timestamp.as_ref()?.0,
            hash: pod
                .annotations()
                .get(CONFIG_HASH_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            ready: !containers.is_empty() && containers.iter().all(|c| c.ready),
            restarts: containers.iter().map(|c| c.restart_count).sum(),
            failed: status.and_then(|s| s.phase.as_deref()) == Some("Failed"),
            exit,
        })
    }
}

/// What failover reads of a node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub ready: bool,
    /// When the Ready condition last changed.
    pub since: Option<Timestamp>,
    pub quarantined_until: Option<Timestamp>,
}

impl NodeView {
    pub fn of(node: &Node) -> Self {
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        Self {
            name: node.name_any(),
            ready: ready.is_some_and(|c| c.status == "True"),
            since: ready
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0),
            quarantined_until: node
                .annotations()
                .get(QUARANTINE_ANNOTATION)
                .and_then(|t| t.parse().ok()),
        }
    }
    /// Down for longer than `grace`: no kubelet will confirm the deletion of its pods, so
    /// they are force-deleted (by failover, and by the deletion finalizer).
    pub fn dead(&self, now: Timestamp, grace: SignedDuration) -> bool {
        !self.ready && self.since.is_some_and(|t| t + grace <= now)
    }
}

/// The deployment's failover settings and the operator's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Group recreations allowed per [`BUDGET_WINDOW`].
    pub budget: i32,
    /// How long a node whose GPU failed stays out of plans (zero: not quarantined).
    pub quarantine: SignedDuration,
    /// How long a node may be NotReady before its pods are force-deleted.
    pub node_grace: SignedDuration,
}

/// One replica group as it should be: its number and the config hash of its StatefulSet's
/// template.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    pub index: i32,
    pub hash: String,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Delete these pods of the group at once; the StatefulSet makes them again together.
    /// `counted` recreations (a fault) spend the restart budget; replacing pods of an old
    /// configuration does not. Only a group that serves (its API rank Ready) has requests to
    /// `drain` (the pods' grace period); the others go with no grace.
    Recreate {
        group: i32,
        pods: Vec<String>,
        reason: String,
        counted: bool,
        drain: bool,
    },
    /// Keep the node out of plans until `until`.
    Quarantine {
        node: String,
        until: Timestamp,
        reason: String,
    },
    /// Delete the pod with no grace: its node is gone and will never confirm the deletion.
    ForceDelete { pod: String, node: String },
}

/// What [`decide`] returns.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// The restarts of the last [`BUDGET_WINDOW`], with the ones decided now; the status keeps
    /// them.
    pub restarts: Vec<GroupRestart>,
    /// Groups with a fault and no budget left: (group, the fault).
    pub exhausted: Vec<(i32, String)>,
}

/// Everything [`decide`] reads.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub groups: &'a [GroupSpec],
    pub pods: &'a [PodView],
    pub nodes: &'a [NodeView],
    /// Restarts already spent (the status's, and those this process decided since).
    pub history: &'a [GroupRestart],
    pub policy: Policy,
    pub now: Timestamp,
}

fn describe(exit: Option<&Exit>) -> String {
    match exit {
        // Killed by a signal: the end of its log (FallbackToLogsOnError) says nothing of it.
        Some(e) if e.code > 128 => format!("exit code {} (signal {})", e.code, e.code - 128),
        Some(e) if e.message.is_empty() => format!("exit code {}", e.code),
        Some(e) => {
            // The first line says it; a log tail can be long.
            let line = e.message.lines().last().unwrap_or_default();
            let line: String = line.chars().take(240).collect();
            format!("exit code {}: {line}", e.code)
        }
        None => "no exit recorded".into(),
    }
}

/// Truncates to the second, the precision of the API server's timestamps.
fn second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// Decides failover for one deployment. Rules, per group (first match is the fault):
/// - a pod on a node NotReady for longer than `node_grace` is force-deleted, and its group
///   recreated;
/// - a container that ended with [`EXIT_GPU_FAULT`] quarantines its node for the
///   deployment's `quarantineMinutes` (already quarantined nodes are left as they are);
/// - a pod that restarted, failed, or was replaced (created [`REPLACED_AFTER`] later than its
///   group's first pod) makes the whole group be recreated;
/// - a recreation is counted against the budget per [`BUDGET_WINDOW`]; with none left the
///   group is reported exhausted and left alone;
/// - pods of an older configuration than the group's are deleted at once (not counted), so a
///   new plan never waits on a half-updated group; they drain when the group serves, and go
///   with no grace when it does not (a group still loading, or one just recreated on a node
///   that a fault has since quarantined).
///
/// Pods created before the group's last recreation are ones that recreation deleted (a cache
/// that has not caught up): they are ignored, so one fault is never counted twice.
pub fn decide(input: &Inputs) -> Decision {
    let now = input.now;
    let since = now - BUDGET_WINDOW;
    let mut restarts: Vec<GroupRestart> = input
        .history
        .iter()
        .filter(|r| r.time.0 > since)
        .map(|r| GroupRestart {
            time: Time(second(r.time.0)),
            ..r.clone()
        })
        .collect();
    restarts.sort_by_key(|r| (r.time.0, r.group));
    restarts.dedup();
    let nodes: BTreeMap<&str, &NodeView> =
        input.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let dead = |node: Option<&String>| {
        node.and_then(|n| nodes.get(n.as_str()))
            .is_some_and(|n| n.dead(now, input.policy.node_grace))
    };
    let mut out = Decision::default();
    // Every pod of a dead node goes, whether or not its group is still planned (a group
    // planned away leaves its pods there Terminating forever otherwise).
    for p in input.pods.iter().filter(|p| dead(p.node.as_ref())) {
        out.actions.push(Action::ForceDelete {
            pod: p.name.clone(),
            node: p.node.clone().unwrap_or_default(),
        });
    }
    for g in input.groups {
        let last = restarts
            .iter()
            .filter(|r| r.group == g.index)
            .map(|r| second(r.time.0))
            .max();
        let pods: Vec<&PodView> = input
            .pods
            .iter()
            .filter(|p| p.group == g.index && last.is_none_or(|t| p.created >= t))
            .collect();
        let mut fault: Option<String> = None;
        if let Some(p) = pods.iter().find(|p| dead(p.node.as_ref())) {
            let node = p.node.as_deref().unwrap_or_default();
            fault = Some(format!("node {node} of pod {} is not ready", p.name));
        }
        let live: Vec<&&PodView> = pods
            .iter()
            .filter(|p| !p.terminating && !dead(p.node.as_ref()))
            .collect();
        for p in &live {
            if let Some(exit) = p.exit.as_ref().filter(|e| e.code == EXIT_GPU_FAULT)
                && let Some(node) = &p.node
            {
                let quarantined = nodes
                    .get(node.as_str())
                    .and_then(|n| n.quarantined_until)
                    .is_some_and(|t| t > now);
                if input.policy.quarantine.is_positive() && !quarantined {
                    out.actions.push(Action::Quarantine {
                        node: node.clone(),
                        until: second(now + input.policy.quarantine),
                        reason: format!("pod {}: {}", p.name, describe(Some(exit))),
                    });
                }
            }
        }
        let first = live
            .iter()
            .filter(|p| p.hash == g.hash)
            .map(|p| p.created)
            .min();
        // The cause first: a rank that stopped because its group failed is not it.
        let mut live = live;
        live.sort_by_key(|p| p.exit.as_ref().is_some_and(|e| e.code == EXIT_GROUP_FAILED));
        for p in &live {
            let why = if p.restarts > 0 {
                format!(
                    "pod {} (rank {}) restarted, {}",
                    p.name,
                    p.rank,
                    describe(p.exit.as_ref())
                )
            } else if p.failed {
                format!(
                    "pod {} (rank {}) failed, {}",
                    p.name,
                    p.rank,
                    describe(p.exit.as_ref())
                )
            } else if p.hash == g.hash && first.is_some_and(|f| p.created >= f + REPLACED_AFTER) {
                format!("pod {} (rank {}) was deleted and replaced", p.name, p.rank)
            } else {
                continue;
            };
            fault.get_or_insert(why);
        }
        let spent = restarts.iter().filter(|r| r.group == g.index).count();
        match fault {
            Some(reason) if spent < usize::try_from(input.policy.budget).unwrap_or(0) => {
                out.actions.push(Action::Recreate {
                    group: g.index,
                    pods: live.iter().map(|p| p.name.clone()).collect(),
                    reason: reason.clone(),
                    counted: true,
                    drain: false,
                });
                // At the status's precision, so the status and this process's memory of the
                // same restart are one entry.
                restarts.push(GroupRestart {
                    group: g.index,
                    time: Time(second(now)),
                    reason,
                });
            }
            Some(reason) => out.exhausted.push((g.index, reason)),
            // A rollout's turn (the StatefulSet, `OnDelete`, now has the new template): the
            // whole group at once, never some ranks of one configuration with some of another.
            None if live.iter().any(|p| p.hash != g.hash) => {
                out.actions.push(Action::Recreate {
                    group: g.index,
                    pods: live.iter().map(|p| p.name.clone()).collect(),
                    reason: "its pods run an older configuration".into(),
                    counted: false,
                    drain: live.iter().any(|p| p.rank == 0 && p.ready),
                });
            }
            None => {}
        }
    }
    out.restarts = restarts;
    out
}

#[cfg(test)]
#[path = "failover_tests.rs"]
mod tests;
