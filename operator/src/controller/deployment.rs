//! LlmDeployment controller: dereference the GpuPool → validate → plan → build → apply (one
//! field manager, server-side apply) → status. Spec changes re-plan and replace the replica
//! groups one at a time; a finalizer removes every child before the object goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use whaleflux_crds::LlmDeployment;

use super::events::Severity;
use super::failover;
use super::{Context, Error};
use crate::planner::{self, PlanRequest, Pool};
use crate::resources::children::{self, Children, FIELD_MANAGER, MANAGED_BY};
use crate::status::condition;
use crate::status::deployment::{
    GroupFault, GroupState, Planned, Rollout, condition_of, deployment_status, group_state,
    needs_plan, plan_summary, rollout,
};
pub use crate::status::deployment::{planned_at_generation, pool_change_matters};
use crate::status::failover::{Action, GroupSpec};

/// Rejected options kept in `status.plan.rejected`.
pub const STATUS_REJECTED: usize = 8;

/// Finalizer the operator puts on every LlmDeployment.
pub const FINALIZER: &str = "whaleflux.io/cleanup";

/// `namespace/name`, the ledger's and backoff's key.
pub fn key(d: &LlmDeployment) -> String {
    format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any())
}

/// Reconciles one LlmDeployment (through the finalizer helper).
pub async fn reconcile(d: Arc<LlmDeployment>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = Instant::now();
    let labels = vec![("controller", "llmdeployment".to_string())];
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let ns = d.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let api: Api<LlmDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let backoff_key = super::Backoff::key("llmdeployment", &d.metadata);
    let result = finalizer::finalizer(&api, FINALIZER, d, |event| async {
        match event {
            Finalizer::Apply(d) => apply(d, &ctx).await,
            Finalizer::Cleanup(d) => cleanup(d, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        other => Error::Finalizer(other.to_string()),
    });
    if result.is_ok() {
        ctx.backoff.reset(&backoff_key);
    }
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    result
}

pub(super) async fn publish(
    ctx: &Context,
    d: &LlmDeployment,
    warning: bool,
    reason: &str,
    note: String,
) {
    let severity = if warning {
        Severity::Warning
    } else {
        Severity::Normal
    };
    if let Err(e) = ctx
        .events
        .publish(&d.object_ref(&()), severity, reason, &note)
        .await
    {
        tracing::warn!(deployment = %key(d), "publishing event {reason}: {e}");
    }
}

async fn ssa<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::Missing("child name"))?;
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

async fn choose_plan(d: &LlmDeployment, ctx: &Context, now: Timestamp) -> Planned {
    let k = key(d);
    let current = d.status.as_ref().and_then(|s| s.plan.clone());
    // What the cluster admin forbids is refused before anything is planned or created; groups
    // already running keep their plan.
    if let Err(e) = ctx.settings.admits(&d.spec) {
        let msg = e.to_string();
        let said = d.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Planned" && c.reason == "NotAllowed" && c.message == msg)
        });
        if !said {
            publish(ctx, d, true, "NotAllowed", msg.clone()).await;
        }
        return Planned {
            plan: current,
            condition: (false, "NotAllowed", msg),
            reduced: None,
        };
    }
    let pool_name = &d.spec.gpu_pool;
    let Some(pool) = ctx
        .pools
        .get(&kube::runtime::reflector::ObjectRef::new(pool_name))
    else {
        return Planned {
            plan: current,
            condition: (
                false,
                "GpuPoolNotFound",
                format!(
                    "GpuPool {pool_name:?} does not exist; create it or fix spec.gpuPool (kubectl get gpool lists them)"
                ),
            ),
            reduced: None,
        };
    };
    if pool.status.is_none() {
        return Planned {
            plan: current,
            condition: (
                false,
                "GpuPoolNotObserved",
                format!("GpuPool {pool_name:?} has no status yet"),
            ),
            reduced: None,
        };
    }
    // Our own status write may not be in the watch cache yet: reuse the plan this process
    // chose for this generation rather than planning and announcing it twice.
    let stale = !planned_at_generation(d);
    if stale && let Some(plan) = ctx.ledger.recent(&k, d.metadata.generation) {
        let mut fresh = d.clone();
        let status = fresh.status.get_or_insert_with(Default::default);
        status.plan = Some(plan.clone());
        status.conditions = vec![condition(
            "Planned",
            true,
            "PlanChosen",
            String::new(),
            d.metadata.generation,
            &[],
            now,
        )];
        if !needs_plan(&fresh, &pool, now) {
            return Planned {
                condition: (true, "PlanChosen", plan_summary(&plan)),
                plan: Some(plan),
                reduced: None,
            };
        }
    }
    if !needs_plan(d, &pool, now) {
        if let Some(plan) = &current
            && ctx.ledger.set(pool_name, &k, plan)
        {
            ctx.pool_changed();
        }
        ctx.metrics
            .plans
            .get_or_create(&vec![("outcome", "unchanged".to_string())])
            .inc();
        let msg = current.as_ref().map(plan_summary).unwrap_or_default();
        return Planned {
            plan: current,
            condition: (true, "PlanChosen", msg),
            reduced: None,
        };
    }
    let request = match PlanRequest::from_spec(&d.spec) {
        Ok(mut r) => {
            // A status is read by people and stored per object: the most relevant rejected
            // options, not every one (`whaleflux plan -o json` lists them all).
            r.settings.max_rejected = STATUS_REJECTED;
            r
        }
        Err(e) => {
            ctx.metrics
                .plans
                .get_or_create(&vec![("outcome", "impossible".to_string())])
                .inc();
            return Planned {
                plan: current,
                condition: (false, "InvalidSpec", e.to_string()),
                reduced: None,
            };
        }
    };
    // Plan under the ledger's view of the pool: every node's GPUs minus what other deployments
    // hold. Planning and recording happen under one lock so concurrent reconciles never hand
    // out the same GPUs twice.
    // When the pool lost GPUs under a running plan, the most groups that still fit
    // (failover's reduced capacity). A spec the pool never could hold is refused instead.
    let may_reduce = planned_at_generation(d);
    let mut reduced = None;
    let outcome = ctx.ledger.plan_and_record(pool_name, &k, |used| {
        let mut view = Pool::from_gpu_pool(&pool);
        for n in &mut view.nodes {
            n.allocatable = (n.gpu_count - used.get(&n.name).copied().unwrap_or(0)).max(0);
        }
        let (mut plan, short) = if may_reduce {
            planner::plan_within_capacity(&request, &view, now)?
        } else {
            (planner::plan(&request, &view, now)?, None)
        };
        reduced = short.map(|e| e.to_string());
        if let Some(previous) = &current {
            planner::keep_placements(&mut plan, previous);
        }
        Ok::<_, planner::PlanError>(plan)
    });
    match outcome {
        Ok((plan, changed)) => {
            if changed {
                ctx.pool_changed();
            }
            ctx.metrics
                .plans
                .get_or_create(&vec![("outcome", "chosen".to_string())])
                .inc();
            ctx.ledger.remember(&k, d.metadata.generation, &plan);
            let msg = plan_summary(&plan);
            let same = current.as_ref().is_some_and(|c| plan_summary(c) == msg);
            if !same {
                match &reduced {
                    Some(why) => {
                        let note = format!("{msg}; fewer groups than spec.replicas: {why}");
                        publish(ctx, d, true, "ReducedCapacity", note).await;
                    }
                    None => publish(ctx, d, false, "PlanChosen", msg.clone()).await,
                }
                tracing::info!(deployment = %k, reduced = reduced.is_some(), "plan chosen: {msg}");
            }
            Planned {
                plan: Some(plan),
                condition: (true, "PlanChosen", msg),
                reduced,
            }
        }
        Err(e) => {
            ctx.metrics
                .plans
                .get_or_create(&vec![("outcome", "impossible".to_string())])
                .inc();
            let was = condition_of(d.status.as_ref(), "Planned");
            let msg = e.to_string();
            if was.is_none_or(|c| c.message != msg) {
                publish(ctx, d, true, "PlanImpossible", msg.clone()).await;
                tracing::warn!(deployment = %k, "no plan: {msg}");
            }
            Planned {
                plan: current,
                condition: (false, "NoPlanFits", msg),
                reduced: None,
            }
        }
    }
}

/// The deployment's group secret, and whether it is already stored.
/// Create the deployment's group secret once, with a value generated here (32 random bytes,
/// hex). The operator never reads Secrets (its role grants no `get` on them): a secret that
/// already exists (409) is kept as it is, since running groups depend on its value.
async fn ensure_group_secret(
    api: &Api<Secret>,
    ctx: &Context,
    d: &LlmDeployment,
    plan: &whaleflux_crds::Plan,
) -> Result<(), Error> {
    let k = key(d);
    if ctx
        .secrets_made
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&k)
    {
        return Ok(());
    }
    let bytes: [u8; 32] = rand::random();
    let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret = children::build(d, plan, &value, &ctx.settings)?.secret;
    let pp = kube::api::PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..kube::api::PostParams::default()
    };
    match api.create(&pp, &secret).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.secrets_made
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(k);
    Ok(())
}

async fn apply(d: Arc<LlmDeployment>, ctx: &Context) -> Result<Requeue, Error> {
    let now = Timestamp::now();
    let name = d.name_any();
    let ns = d.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let k = key(&d);
    let planned = choose_plan(&d, ctx, now).await;
    let client = ctx.client.clone();
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let existing = existing_groups(ctx, &d, &ns, &k);

    let mut groups: Vec<GroupState> = Vec::new();
    let mut rolling = false;
    let mut created_now = false;
    if let (true, Some(plan)) = (planned.condition.0, planned.plan.as_ref()) {
        let secret_api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        ensure_group_secret(&secret_api, ctx, &d, plan).await?;
        // The secret's value is not known here (it is never read back): the built Secret
        // is not applied, the pods only reference it by name.
        let built: Children = children::build(&d, plan, "", &ctx.settings)?;
        let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
        let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
        let np_api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
        let states: BTreeMap<i32, GroupState> =
            existing.iter().map(|(i, (_, s))| (*i, s.clone())).collect();
        let hashes: Vec<(i32, &str)> = built
            .groups
            .iter()
            .map(|g| (g.index, g.config_hash.as_str()))
            .collect();
        let steps = rollout(&hashes, &states);
        for (g, step) in built.groups.iter().zip(steps) {
            let state = states.get(&g.index).cloned();
            match step {
                Rollout::Create => {
                    publish(
                        ctx,
                        &d,
                        false,
                        "GroupCreated",
                        format!(
                            "replica group {} created: StatefulSet {} with {} pod(s)",
                            g.index,
                            children::group_name(&name, g.index),
                            plan.pipeline_parallel
                        ),
                    )
                    .await;
                    created_now = true;
                }
                Rollout::Replace => {
                    publish(
                        ctx,
                        &d,
                        false,
                        "GroupReplaced",
                        format!(
                            "replica group {} replaced with the new plan ({})",
                            g.index,
                            plan_summary(plan)
                        ),
                    )
                    .await;
                }
                Rollout::Keep | Rollout::Wait => {}
            }
            let write = step != Rollout::Wait;
            if write {
                // The group's config first: its pods read it when they start.
                ssa(&cm_api, &g.config_map).await?;
                ssa(&svc_api, &g.headless).await?;
                ssa(&np_api, &g.network_policy).await?;
                ssa(&sts_api, &g.statefulset).await?;
            }
            // A group still on the old configuration keeps serving until its turn; the one
            // just replaced is not ready until its new pods are (its listed status is stale).
            let outdated = state.as_ref().is_some_and(|s| s.hash != g.config_hash);
            rolling |= outdated;
            groups.push(GroupState {
                index: g.index,
                // What the group's StatefulSet now asks for: failover replaces older pods.
                hash: if write {
                    g.config_hash.clone()
                } else {
                    state.as_ref().map(|s| s.hash.clone()).unwrap_or_default()
                },
                ready: !(write && outdated) && state.is_some_and(|s| s.ready),
                fault: None,
            });
        }
        ssa(&svc_api, &built.api_service).await?;
        ssa(&pdb_api, &built.pdb).await?;
        // Groups beyond the plan's go (scale down, or capacity lost).
        for (index, (sts, _)) in existing.range(plan.replicas.min(d.spec.replicas).max(0)..) {
            let dp = DeleteParams::background();
            let sts_name = sts.name_any();
            ignore_not_found(sts_api.delete(&sts_name, &dp).await)?;
            ignore_not_found(svc_api.delete(&sts_name, &dp).await)?;
            ignore_not_found(np_api.delete(&sts_name, &dp).await)?;
            ignore_not_found(
                cm_api
                    .delete(&children::config_map_name(&name, *index), &dp)
                    .await,
            )?;
            publish(
                ctx,
                &d,
                false,
                "GroupDeleted",
                format!(
                    "replica group {index} deleted ({} planned, spec.replicas is {})",
                    plan.replicas, d.spec.replicas
                ),
            )
            .await;
        }
    } else {
        // No usable plan: leave running groups alone, report them as they are.
        for (_, s) in existing.range(..d.spec.replicas.max(0)) {
            groups.push(s.1.clone());
        }
    }

    // Failover: recreate faulty groups, quarantine nodes whose GPU failed, clear dead nodes.
    let specs: Vec<GroupSpec> = groups
        .iter()
        .map(|g| GroupSpec {
            index: g.index,
            hash: g.hash.clone(),
        })
        .collect();
    let outcome = failover::run(ctx, &d, &specs, now).await?;
    let recent = now - SignedDuration::from_mins(5);
    for g in &mut groups {
        g.fault = match outcome
            .decision
            .exhausted
            .iter()
            .find(|(i, _)| *i == g.index)
        {
            Some((_, why)) => Some(GroupFault::Exhausted(why.clone())),
            None => outcome
                .decision
                .restarts
                .iter()
                .rfind(|r| r.group == g.index && r.time.0 > recent)
                .map(|r| GroupFault::Recreated(r.reason.clone())),
        };
        if outcome.decision.actions.iter().any(
            |a| matches!(a, Action::Recreate { group, counted: true, .. } if *group == g.index),
        ) {
            g.ready = false;
        }
    }
    let mut status = deployment_status(&d, &planned, &groups, rolling, created_now, now);
    status.restarts = outcome.decision.restarts.clone();
    let ready = status.ready_replicas;
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .map(|c| (c.status == "True", c.reason.as_str()));
    ctx.metrics
        .record_deployment(&ns, &name, d.spec.replicas, ready, degraded);
    if d.status.as_ref() != Some(&status) {
        let api: Api<LlmDeployment> = Api::namespaced(client, &ns);
        super::apply_status(&api, &name, &status).await?;
        tracing::debug!(deployment = %k, phase = ?status.phase, ready, "status updated");
    }
    // Progress arrives as events (the groups' StatefulSets, the pool), so no polling while
    // groups start; the requeues are safety nets.
    let wait = if !planned.condition.0 {
        Duration::from_secs(30)
    } else if rolling {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(300)
    };
    Ok(Requeue::requeue(
        outcome.recheck.map_or(wait, |r| r.min(wait)),
    ))
}

/// The deployment's groups as the StatefulSet cache has them (the same watch that wakes this
/// reconcile when a group's pods change), looked up by name: the groups the spec asks for and
/// those the index knows of (scaled away, not deleted yet).
fn existing_groups(
    ctx: &Context,
    d: &LlmDeployment,
    ns: &str,
    key: &str,
) -> BTreeMap<i32, (Arc<StatefulSet>, GroupState)> {
    let name = d.name_any();
    let want = children::worker_selector(&name);
    let mut indices: Vec<i32> = (0..d.spec.replicas.max(0)).collect();
    indices.extend(ctx.groups.indices(key));
    indices.sort_unstable();
    indices.dedup();
    let mut out = BTreeMap::new();
    for i in indices {
        let sts_ref = ObjectRef::new(&children::group_name(&name, i)).within(ns);
        let found = ctx.statefulsets.get(&sts_ref).filter(|s| {
            s.labels()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str)
                == Some(MANAGED_BY)
                && want.iter().all(|(k, v)| s.labels().get(k) == Some(v))
        });
        match found.and_then(|s| group_state(&s).map(|g| (s, g))) {
            Some((s, g)) if g.index == i => {
                out.insert(i, (s, g));
            }
            _ => ctx.groups.forget(key, i),
        }
    }
    out
}

pub(super) fn ignore_not_found<T>(r: Result<T, kube::Error>) -> Result<(), Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn cleanup(d: Arc<LlmDeployment>, ctx: &Context) -> Result<Requeue, Error> {
    let name = d.name_any();
    let ns = d.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let client = ctx.client.clone();
    let owned =
        format!("app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={MANAGED_BY}");
    let lp = ListParams::default().labels(&owned);
    let dp = DeleteParams::background();
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .delete_collection(&dp, &lp)
        .await?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete_collection(&dp, &lp)
        .await?;
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .delete_collection(&dp, &lp)
        .await?;
    Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
        .delete_collection(&dp, &lp)
        .await?;
    Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
        .delete_collection(&dp, &lp)
        .await?;
    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete_collection(&dp, &lp)
        .await?;
    // The pods go with their StatefulSets (garbage collection); wait until they have. A pod on a
    // node that has been down past the grace period never confirms its deletion (no kubelet
    // runs there): force-delete it, as failover does, or the finalizer would wait for ever.
    let pod_api = Api::<Pod>::namespaced(client, &ns);
    let pods = pod_api
        .list(&ListParams::default().labels(&children::worker_selector_string(&name)))
        .await?
        .items;
    let now = Timestamp::now();
    for p in &pods {
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        let view = node.as_ref().and_then(|n| {
            ctx.nodes
                .get(&ObjectRef::new(n))
                .map(|n| crate::status::failover::NodeView::of(&n))
        });
        if let Some(v) = view
            && v.dead(now, ctx.node_grace)
        {
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            ignore_not_found(pod_api.delete(&p.name_any(), &dp).await)?;
            tracing::warn!(pod = %p.name_any(), node = %v.name, "force-deleted a pod of a dead node so the deletion can finish");
        }
    }
    if !pods.is_empty() {
        return Err(Error::ChildrenRemain(pods.len()));
    }
    if ctx.ledger.remove(&key(&d)) {
        ctx.pool_changed();
    }
    ctx.metrics.forget_deployment(&ns, &name);
    failover::forget(ctx, &key(&d));
    ctx.secrets_made
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key(&d));
    tracing::info!(deployment = %key(&d), "children removed; releasing the finalizer");
    Ok(Requeue::await_change())
}
