//! Failover for one LlmDeployment: reads its worker pods and the nodes from the caches, asks
//! [`crate::status::failover::decide`] what to do, and does it — quarantines nodes (annotations,
//! events on the node and the deployment), force-deletes the pods of dead nodes, recreates
//! groups by deleting all of their pods at once (the StatefulSet makes them again together).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use whaleflux_crds::{GroupRestart, LlmDeployment};

use super::deployment::{ignore_not_found, key, publish};
use super::{Context, Error};
use crate::status::deployment::condition_of;
use crate::status::failover::{
    Action, Decision, GroupSpec, Inputs, NodeView, PodView, Policy, QUARANTINE_REASON_ANNOTATION,
    decide,
};
use crate::status::pool::QUARANTINE_ANNOTATION;

/// What failover did, and when the deployment must be looked at again (a node within its
/// grace period).
pub(super) struct Outcome {
    pub decision: Decision,
    pub recheck: Option<Duration>,
}

/// What this process decided for one deployment, which its status (read from a cache that
/// may lag) does not show yet.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// The restarts of the budget window.
    restarts: Vec<GroupRestart>,
    /// The exhausted budget was announced (one event per exhaustion).
    announced: bool,
}

fn remembered(ctx: &Context, key: &str) -> Memory {
    ctx.failover
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(key)
        .cloned()
        .unwrap_or_default()
}

/// Decides and applies failover for `d`'s `groups`.
pub(super) async fn run(
    ctx: &Context,
    d: &LlmDeployment,
    groups: &[GroupSpec],
    now: Timestamp,
) -> Result<Outcome, Error> {
    let ns = d.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let name = d.name_any();
    let k = key(d);
    let pods: Vec<PodView> = ctx
        .pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str())
                && p.labels().get("app.kubernetes.io/instance") == Some(&name)
        })
        .filter_map(|p| PodView::of(p))
        .collect();
    let nodes: Vec<NodeView> = ctx.nodes.state().iter().map(|n| NodeView::of(n)).collect();
    let mut history = d
        .status
        .as_ref()
        .map(|s| s.restarts.clone())
        .unwrap_or_default();
    let memory = remembered(ctx, &k);
    history.extend(memory.restarts);
    let policy = Policy {
        budget: d.spec.failover.restart_budget,
        quarantine: SignedDuration::from_mins(i64::from(d.spec.failover.quarantine_minutes)),
        node_grace: ctx.node_grace,
    };
    let decision = decide(&Inputs {
        groups,
        pods: &pods,
        nodes: &nodes,
        history: &history,
        policy,
        now,
    });
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let node_api: Api<Node> = Api::all(ctx.client.clone());
    for action in &decision.actions {
        match action {
            Action::Quarantine {
                node,
                until,
                reason,
            } => {
                let patch = serde_json::json!({"metadata": {"annotations": {
                    QUARANTINE_ANNOTATION: until.to_string(),
                    QUARANTINE_REASON_ANNOTATION: reason,
                }}});
                node_api
                    .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                let note = format!("node {node} quarantined until {until}: {reason}");
                tracing::warn!(deployment = %k, "{note}");
                let regarding = Node {
                    metadata: kube::api::ObjectMeta {
                        name: Some(node.clone()),
                        ..Default::default()
                    },
                    ..Node::default()
                }
                .object_ref(&());
                if let Err(e) = ctx
                    .events
                    .publish(
                        &regarding,
                        super::events::Severity::Warning,
                        "NodeQuarantined",
                        &note,
                    )
                    .await
                {
                    tracing::warn!(node, "publishing event NodeQuarantined: {e}");
                }
                publish(ctx, d, true, "NodeQuarantined", note).await;
                ctx.pool_changed();
            }
            Action::ForceDelete { pod, node } => {
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                };
                ignore_not_found(pod_api.delete(pod, &dp).await)?;
                publish(
                    ctx,
                    d,
                    true,
                    "PodForceDeleted",
                    format!(
                        "pod {pod} force-deleted: its node {node} has not been ready for {} s",
                        ctx.node_grace.as_secs()
                    ),
                )
                .await;
            }
            Action::Recreate {
                group,
                pods,
                reason,
                counted,
                drain,
            } => {
                // A broken group has nothing to drain, and a rank of it still in its preStop
                // pause could join the group's next incarnation: its pods go at once, as do
                // those of a group that does not serve yet. A serving group of an old
                // configuration drains (grace period).
                let dp = DeleteParams {
                    grace_period_seconds: (!drain).then_some(0),
                    ..DeleteParams::default()
                };
                for p in pods {
                    ignore_not_found(pod_api.delete(p, &dp).await)?;
                }
                if *counted {
                    let spent = decision
                        .restarts
                        .iter()
                        .filter(|r| r.group == *group)
                        .count();
                    let note = format!(
                        "replica group {group} recreated (restart {spent} of {} this hour): {reason}",
                        d.spec.failover.restart_budget
                    );
                    tracing::warn!(deployment = %k, "{note}");
                    publish(ctx, d, true, "GroupRestarted", note).await;
                    ctx.metrics
                        .group_restarts
                        .get_or_create(&vec![
                            ("namespace", ns.clone()),
                            ("deployment", name.clone()),
                        ])
                        .inc();
                } else {
                    tracing::info!(deployment = %k, group, "replacing {} pod(s): {reason}", pods.len());
                }
            }
        }
    }
    let already = memory.announced
        || condition_of(d.status.as_ref(), "Degraded")
            .is_some_and(|c| c.status == "True" && c.reason == "RestartBudgetExhausted");
    ctx.failover
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            k.clone(),
            Memory {
                restarts: decision.restarts.clone(),
                announced: !decision.exhausted.is_empty(),
            },
        );
    if !decision.exhausted.is_empty() && !already {
        let list: Vec<String> = decision
            .exhausted
            .iter()
            .map(|(g, why)| format!("group {g}: {why}"))
            .collect();
        publish(
            ctx,
            d,
            true,
            "RestartBudgetExhausted",
            format!(
                "restart budget of {} per hour spent; not recreating: {}",
                d.spec.failover.restart_budget,
                list.join("; ")
            ),
        )
        .await;
    }
    // A node of ours not ready yet within its grace period: look again when it runs out.
    let recheck = pods
        .iter()
        .filter_map(|p| nodes.iter().find(|n| Some(&n.name) == p.node.as_ref()))
        .filter(|n| !n.ready)
        .filter_map(|n| n.since.map(|t| t + ctx.node_grace))
        .filter_map(|due| Duration::try_from(due.duration_since(now)).ok())
        .min()
        .map(|d| d + Duration::from_secs(1));
    Ok(Outcome { decision, recheck })
}

/// Forgets what failover remembered of `key` (the deployment is gone).
pub(super) fn forget(ctx: &Context, key: &str) {
    ctx.failover
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(key);
}
