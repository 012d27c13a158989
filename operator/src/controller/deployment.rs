//! LlmDeployment controller: dereference the GpuPool → validate → plan → build → apply (one
//! field manager, server-side apply) → status. Spec changes re-plan and replace the replica
//! groups one at a time; a finalizer removes every child before the object goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use whaleflux_crds::{GpuPool, LlmDeployment, LlmDeploymentStatus, Phase, Plan};

use super::events::Severity;
use super::pool::condition;
use super::{Context, Error};
use crate::planner::{self, PlanRequest, Pool};
use crate::resources::children::{
    self, CONFIG_HASH_ANNOTATION, Children, FIELD_MANAGER, GROUP_LABEL, MANAGED_BY, SECRET_KEY,
};

/// Rejected options kept in `status.plan.rejected`.
pub const STATUS_REJECTED: usize = 8;

/// Finalizer the operator puts on every LlmDeployment.
pub const FINALIZER: &str = "whaleflux.io/cleanup";

/// `namespace/name`, the ledger's and backoff's key.
pub fn key(d: &LlmDeployment) -> String {
    format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any())
}

/// Reconciles one LlmDeployment (through the finalizer helper).
pub async fn reconcile(d: Arc<LlmDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let labels = vec![("controller", "llmdeployment".to_string())];
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let ns = d.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let api: Api<LlmDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let k = key(&d);
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
        ctx.backoff.reset(&format!("llmdeployment/{k}"));
    }
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn publish(ctx: &Context, d: &LlmDeployment, warning: bool, reason: &str, note: String) {
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

fn condition_of<'a>(status: Option<&'a LlmDeploymentStatus>, t: &str) -> Option<&'a Condition> {
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
}

fn group_state(sts: &StatefulSet) -> Option<GroupState> {
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
    Some(GroupState { index, hash, ready })
}

/// Whether the plan must be (re)computed: no plan yet, the spec changed since it was planned,
/// the last attempt failed, or a node it uses left the pool or became unusable.
fn needs_plan(d: &LlmDeployment, pool: &GpuPool, now: Timestamp) -> bool {
    let status = d.status.as_ref();
    let Some(plan) = status.and_then(|s| s.plan.as_ref()) else {
        return true;
    };
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

fn plan_summary(plan: &Plan) -> String {
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

struct Planned {
    plan: Option<Plan>,
    /// Planned condition: (status, reason, message).
    condition: (bool, &'static str, String),
}

async fn choose_plan(d: &LlmDeployment, ctx: &Context, now: Timestamp) -> Planned {
    let k = key(d);
    let current = d.status.as_ref().and_then(|s| s.plan.clone());
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
            };
        }
    };
    // Plan under the ledger's view of the pool: every node's GPUs minus what other deployments
    // hold. Planning and recording happen under one lock so concurrent reconciles never hand
    // out the same GPUs twice.
    let outcome = ctx.ledger.plan_and_record(pool_name, &k, |used| {
        let mut view = Pool::from_gpu_pool(&pool);
        for n in &mut view.nodes {
            n.allocatable = (n.gpu_count - used.get(&n.name).copied().unwrap_or(0)).max(0);
        }
        planner::plan(&request, &view, now)
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
                publish(ctx, d, false, "PlanChosen", msg.clone()).await;
                tracing::info!(deployment = %k, "plan chosen: {msg}");
            }
            Planned {
                plan: Some(plan),
                condition: (true, "PlanChosen", msg),
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
            }
        }
    }
}

/// The deployment's group secret, and whether it is already stored.
async fn group_secret(api: &Api<Secret>, name: &str) -> Result<(String, bool), Error> {
    if let Some(s) = api.get_opt(&children::secret_name(name)).await?
        && let Some(v) = s.data.as_ref().and_then(|d| d.get(SECRET_KEY))
        && !v.0.is_empty()
    {
        return Ok((String::from_utf8_lossy(&v.0).into_owned(), true));
    }
    // 32 random bytes, hex: generated here at the IO edge, once per deployment.
    let bytes: [u8; 32] = rand::random();
    Ok((bytes.iter().map(|b| format!("{b:02x}")).collect(), false))
}

async fn apply(d: Arc<LlmDeployment>, ctx: &Context) -> Result<Action, Error> {
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
        let (secret, exists) = group_secret(&secret_api, &name).await?;
        let built: Children = children::build(&d, plan, &secret)?;
        // The secret is written once: its value must not change under running groups.
        if !exists {
            ssa(&secret_api, &built.secret).await?;
        }
        let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
        let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
        // One group at a time: a group whose pods run the current config but are not all
        // ready yet is a replacement (or creation) in progress; wait for it.
        let mut slot_free = !built.groups.iter().any(|g| {
            existing
                .get(&g.index)
                .is_some_and(|(_, s)| s.hash == g.config_hash && !s.ready)
        });
        for g in &built.groups {
            let state = existing.get(&g.index).map(|(_, s)| s.clone());
            let write = match &state {
                None => {
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
                    true
                }
                Some(s) if s.hash == g.config_hash => true,
                Some(_) if slot_free => {
                    slot_free = false;
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
                    true
                }
                Some(_) => false,
            };
            if write {
                // The group's config first: its pods read it when they start.
                ssa(&cm_api, &g.config_map).await?;
                ssa(&svc_api, &g.headless).await?;
                ssa(&sts_api, &g.statefulset).await?;
            }
            // A group still on the old configuration keeps serving until its turn; the one
            // just replaced is not ready until its new pods are (its listed status is stale).
            let outdated = state.as_ref().is_some_and(|s| s.hash != g.config_hash);
            rolling |= outdated;
            groups.push(GroupState {
                index: g.index,
                hash: g.config_hash.clone(),
                ready: !(write && outdated) && state.is_some_and(|s| s.ready),
            });
        }
        ssa(&svc_api, &built.api_service).await?;
        ssa(&pdb_api, &built.pdb).await?;
        // Groups beyond spec.replicas go (scale down).
        for (index, (sts, _)) in existing.range(d.spec.replicas.max(0)..) {
            let dp = DeleteParams::background();
            let sts_name = sts.name_any();
            ignore_not_found(sts_api.delete(&sts_name, &dp).await)?;
            ignore_not_found(svc_api.delete(&sts_name, &dp).await)?;
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
                    "replica group {index} deleted (spec.replicas is {})",
                    d.spec.replicas
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

    let status = deployment_status(&d, &planned, &groups, rolling, created_now, now);
    let ready = status.ready_replicas;
    ctx.metrics
        .groups_ready
        .get_or_create(&vec![
            ("namespace", ns.clone()),
            ("deployment", name.clone()),
        ])
        .set(i64::from(ready));
    if d.status.as_ref() != Some(&status) {
        let api: Api<LlmDeployment> = Api::namespaced(client, &ns);
        super::apply_status(&api, &name, &status).await?;
        tracing::debug!(deployment = %k, phase = ?status.phase, ready, "status updated");
    }
    // Progress arrives as events (the groups' StatefulSets, the pool), so no polling while
    // groups start; the requeues are safety nets.
    Ok(if !planned.condition.0 {
        Action::requeue(Duration::from_secs(30))
    } else if rolling {
        Action::requeue(Duration::from_secs(60))
    } else {
        Action::requeue(Duration::from_secs(300))
    })
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

fn ignore_not_found<T>(r: Result<T, kube::Error>) -> Result<(), Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn deployment_status(
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
    let want = d.spec.replicas.max(0);
    let ready = groups.iter().filter(|g| g.ready).count() as i32;
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
        } else if rolling {
            "ReplacingGroups"
        } else if settled {
            "Complete"
        } else {
            "StartingGroups"
        },
        if settled {
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
    let degraded_c = if !plan_ok && groups.iter().any(|g| g.ready) {
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
    }
}

async fn cleanup(d: Arc<LlmDeployment>, ctx: &Context) -> Result<Action, Error> {
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
    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete_collection(&dp, &lp)
        .await?;
    // The pods go with their StatefulSets (garbage collection); wait until they have.
    let pods = Api::<Pod>::namespaced(client, &ns)
        .list(&ListParams::default().labels(&children::worker_selector_string(&name)))
        .await?
        .items
        .len();
    if pods > 0 {
        return Err(Error::ChildrenRemain(pods));
    }
    if ctx.ledger.remove(&key(&d)) {
        ctx.pool_changed();
    }
    ctx.metrics
        .groups_ready
        .remove(&vec![("namespace", ns), ("deployment", name.clone())]);
    tracing::info!(deployment = %key(&d), "children removed; releasing the finalizer");
    Ok(Action::await_change())
}
