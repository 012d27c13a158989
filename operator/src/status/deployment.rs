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
    Some(GroupState { index, hash, ready })
}

/// Whether the plan must be (re)computed: no plan yet, the spec changed since it was planned,
/// the last attempt failed, or a node it uses left the pool or became unusable.
pub fn needs_plan(d: &LlmDeployment, pool: &GpuPool, now: Timestamp) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(replicas: i32, previous: Option<LlmDeploymentStatus>) -> LlmDeployment {
        let mut d: LlmDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "whaleflux.io/v1alpha1", "kind": "LlmDeployment",
            "metadata": {"name": "chat", "namespace": "ml", "generation": 3},
            "spec": {"model": {"preset": "smollm2-135m", "weights": {"dtype": "q4_1", "source": {"path": "/m.gguf"}}},
                     "gpuPool": "pool", "replicas": replicas}
        }))
        .expect("deployment");
        d.status = previous;
        d
    }

    fn planned(ok: bool) -> Planned {
        Planned {
            plan: None,
            condition: if ok {
                (true, "PlanChosen", "TP 1 x PP 1".into())
            } else {
                (false, "NoPlanFits", "no split fits".into())
            },
        }
    }

    fn groups(ready: &[bool]) -> Vec<GroupState> {
        ready
            .iter()
            .enumerate()
            .map(|(i, r)| GroupState {
                index: i as i32,
                hash: "h".into(),
                ready: *r,
            })
            .collect()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().expect("time")
    }

    fn cond<'a>(s: &'a LlmDeploymentStatus, t: &str) -> (&'a str, &'a str) {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| panic!("no {t} condition"));
        (c.status.as_str(), c.reason.as_str())
    }

    fn now() -> Timestamp {
        at("2026-06-01T00:00:00Z")
    }

    /// Every group ready with the current plan: Ready, settled, counts and the HPA selector.
    #[test]
    fn all_groups_ready_is_ready_and_complete() {
        let d = deployment(2, None);
        let s = deployment_status(
            &d,
            &planned(true),
            &groups(&[true, true]),
            false,
            false,
            now(),
        );
        assert_eq!(s.phase, Phase::Ready);
        assert_eq!(cond(&s, "Planned"), ("True", "PlanChosen"));
        assert_eq!(cond(&s, "Progressing"), ("False", "Complete"));
        assert_eq!(cond(&s, "Ready"), ("True", "GroupsReady"));
        assert_eq!(cond(&s, "Degraded"), ("False", "AsPlanned"));
        assert_eq!((s.replicas, s.ready_replicas), (2, 2));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(
            s.selector.as_deref(),
            Some(
                "app.kubernetes.io/component=worker,app.kubernetes.io/instance=chat,app.kubernetes.io/name=whaleflux"
            )
        );
        assert_eq!(
            s.endpoint.as_deref(),
            Some("http://chat.ml.svc.cluster.local:8000/v1")
        );
    }

    /// A settled deployment that loses a group without a change asked for is Degraded; while
    /// groups start or are being replaced, it is not.
    #[test]
    fn a_lost_group_is_degraded_but_a_starting_or_replaced_one_is_not() {
        let settled = deployment_status(
            &deployment(2, None),
            &planned(true),
            &groups(&[true, true]),
            false,
            false,
            now(),
        );
        let d = deployment(2, Some(settled));
        let lost = deployment_status(
            &d,
            &planned(true),
            &groups(&[true, false]),
            false,
            false,
            now(),
        );
        assert_eq!(lost.phase, Phase::Degraded);
        assert_eq!(cond(&lost, "Degraded"), ("True", "GroupsUnavailable"));
        assert_eq!(cond(&lost, "Ready"), ("True", "GroupsReady"));
        assert_eq!(lost.ready_replicas, 1);
        let rolling = deployment_status(
            &d,
            &planned(true),
            &groups(&[true, false]),
            true,
            false,
            now(),
        );
        assert_eq!(rolling.phase, Phase::Progressing);
        assert_eq!(cond(&rolling, "Degraded"), ("False", "AsPlanned"));
        assert_eq!(cond(&rolling, "Progressing"), ("True", "ReplacingGroups"));
        let created = deployment_status(
            &d,
            &planned(true),
            &groups(&[true, false]),
            false,
            true,
            now(),
        );
        assert_eq!(cond(&created, "Degraded"), ("False", "AsPlanned"));
        assert_eq!(cond(&created, "Progressing"), ("True", "StartingGroups"));
        // Never settled before: a group still starting is progress, not a loss.
        let fresh = deployment_status(
            &deployment(2, None),
            &planned(true),
            &groups(&[true, false]),
            false,
            false,
            now(),
        );
        assert_eq!(fresh.phase, Phase::Progressing);
        assert_eq!(cond(&fresh, "Degraded"), ("False", "AsPlanned"));
    }

    /// A spec that no longer plans while the old groups serve is Degraded (serving the previous
    /// plan); with nothing serving, it is Failed.
    #[test]
    fn no_plan_is_degraded_while_serving_and_failed_otherwise() {
        let d = deployment(1, None);
        let serving = deployment_status(&d, &planned(false), &groups(&[true]), false, false, now());
        assert_eq!(serving.phase, Phase::Degraded);
        assert_eq!(cond(&serving, "Degraded"), ("True", "NoPlanForSpec"));
        assert_eq!(cond(&serving, "Planned"), ("False", "NoPlanFits"));
        assert_eq!(cond(&serving, "Progressing"), ("False", "NotPlanned"));
        let none = deployment_status(&d, &planned(false), &groups(&[]), false, false, now());
        assert_eq!(none.phase, Phase::Failed);
        assert_eq!(cond(&none, "Degraded"), ("False", "AsPlanned"));
        assert_eq!(cond(&none, "Ready"), ("False", "NoGroupReady"));
    }

    /// Zero replicas asked and none running: settled as asked (phase Ready, Progressing
    /// Complete) while the Ready condition says nothing serves, with its own reason.
    #[test]
    fn scaled_to_zero_is_settled_with_nothing_serving() {
        let s = deployment_status(
            &deployment(0, None),
            &planned(true),
            &groups(&[]),
            false,
            false,
            now(),
        );
        assert_eq!(s.phase, Phase::Ready);
        assert_eq!(cond(&s, "Ready"), ("False", "ScaledToZero"));
        assert_eq!(cond(&s, "Progressing"), ("False", "Complete"));
        assert_eq!((s.replicas, s.ready_replicas), (0, 0));
    }

    /// A condition keeps its transition time while its status stays; a change stamps now.
    #[test]
    fn transition_times_move_only_on_a_change() {
        let first = deployment_status(
            &deployment(1, None),
            &planned(true),
            &groups(&[true]),
            false,
            false,
            now(),
        );
        let later = at("2026-06-01T01:00:00Z");
        let d = deployment(1, Some(first.clone()));
        let same = deployment_status(&d, &planned(true), &groups(&[true]), false, false, later);
        assert_eq!(same, first, "nothing changed, nothing to write");
        let lost = deployment_status(&d, &planned(true), &groups(&[false]), false, false, later);
        let ready = lost
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(ready.last_transition_time.0, later);
        let planned_c = lost
            .conditions
            .iter()
            .find(|c| c.type_ == "Planned")
            .expect("Planned");
        assert_eq!(planned_c.last_transition_time.0, now());
    }

    /// A plan must be recomputed when the spec moved on, the last attempt failed, or a node it
    /// uses left the pool or became unusable; a pool change wakes only such deployments.
    #[test]
    fn needs_plan_follows_spec_failure_and_node_health() {
        let plan: Plan = serde_json::from_value(serde_json::json!({
            "model": "smollm2-135m", "dtype": "q4_1", "gpuModel": "H100", "objective": "MinGpus",
            "tensorParallel": 1, "pipelineParallel": 1, "replicas": 1, "gpusPerReplica": 1,
            "crossesNodes": false,
            "stages": [{"index": 0, "layers": [0, 30], "node": "a", "gpus": 1}],
            "groups": [{"index": 0, "nodes": ["a"]}],
            "memoryPerGpuBytes": {"weights": 0, "kvCache": 0, "activations": 0, "overhead": 0, "total": 0, "usable": 0},
            "estimate": {"timePerTokenMs": 1.0, "decodeTokensPerSecond": 1.0, "concurrency": 1}
        }))
        .expect("plan");
        let mut ok = planned(true);
        ok.plan = Some(plan);
        let status = deployment_status(
            &deployment(1, None),
            &ok,
            &groups(&[true]),
            false,
            false,
            now(),
        );
        let d = deployment(1, Some(status));
        let pool = |ready: bool, quarantined: Option<&str>| -> GpuPool {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "whaleflux.io/v1alpha1", "kind": "GpuPool",
                "metadata": {"name": "pool"},
                "spec": {"nodeSelector": {}},
                "status": {"nodes": [{"name": "a", "gpuModel": "H100", "gpuCount": 8, "allocatable": 7,
                    "ready": ready, "quarantinedUntil": quarantined}]}
            }))
            .expect("pool")
        };
        assert!(!needs_plan(&d, &pool(true, None), now()));
        assert!(!pool_change_matters(&d, &pool(true, None)));
        assert!(needs_plan(&d, &pool(false, None), now()), "node not ready");
        assert!(
            needs_plan(&d, &pool(true, Some("2026-06-01T00:30:00Z")), now()),
            "quarantined"
        );
        assert!(
            !needs_plan(&d, &pool(true, Some("2026-05-01T00:00:00Z")), now()),
            "quarantine over"
        );
        let mut moved = d.clone();
        moved.metadata.generation = Some(4);
        assert!(
            needs_plan(&moved, &pool(true, None), now()),
            "the spec changed"
        );
        // Not reconciled yet: its own creation wakes it, not the pool.
        assert!(!pool_change_matters(
            &deployment(1, None),
            &pool(false, None)
        ));
    }

    fn sts(labels: serde_json::Value, status: serde_json::Value) -> StatefulSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "chat-g2", "generation": 5, "labels": labels},
            "spec": {"replicas": 2, "serviceName": "chat-g2", "selector": {},
                     "template": {"metadata": {"annotations": {CONFIG_HASH_ANNOTATION: "abc"}}}},
            "status": status
        }))
        .expect("statefulset")
    }

    #[test]
    fn a_group_is_ready_only_when_every_pod_of_its_current_template_is() {
        let label = serde_json::json!({GROUP_LABEL: "2"});
        let full = serde_json::json!({"observedGeneration": 5, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2});
        assert_eq!(
            group_state(&sts(label.clone(), full.clone())),
            Some(GroupState {
                index: 2,
                hash: "abc".into(),
                ready: true
            })
        );
        for (field, value) in [
            ("observedGeneration", 4),
            ("replicas", 1),
            ("readyReplicas", 1),
            ("updatedReplicas", 1),
        ] {
            let mut st = full.clone();
            st[field] = value.into();
            let g = group_state(&sts(label.clone(), st)).expect("group");
            assert!(!g.ready, "{field} {value}");
        }
        assert_eq!(group_state(&sts(serde_json::json!({}), full.clone())), None);
        assert_eq!(
            group_state(&sts(serde_json::json!({GROUP_LABEL: "x"}), full)),
            None
        );
    }

    fn planned_status(status: &str, observed: i64, plan: bool) -> LlmDeploymentStatus {
        serde_json::from_value(serde_json::json!({
            "conditions": [{"type": "Planned", "status": status, "reason": "PlanChosen", "message": "",
                            "lastTransitionTime": "2026-06-01T00:00:00Z", "observedGeneration": observed}],
            "plan": if plan {
                serde_json::to_value(fixture_plan()).expect("plan")
            } else {
                serde_json::Value::Null
            }
        }))
        .expect("status")
    }

    fn fixture_plan() -> Plan {
        serde_yaml::from_str(include_str!("../../tests/fixtures/plan-llama-3.1-70b.yaml"))
            .expect("plan fixture")
    }

    #[test]
    fn planned_at_generation_needs_a_plan_and_a_true_condition_of_this_generation() {
        let at = |status, observed, plan| {
            planned_at_generation(&deployment(1, Some(planned_status(status, observed, plan))))
        };
        assert!(at("True", 3, true));
        assert!(!at("True", 2, true));
        assert!(!at("False", 3, true));
        assert!(!at("True", 3, false));
        assert!(!planned_at_generation(&deployment(1, None)));
    }

    fn pool(name: &str) -> GpuPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "whaleflux.io/v1alpha1", "kind": "GpuPool",
            "metadata": {"name": name}, "spec": {}
        }))
        .expect("pool")
    }

    #[test]
    fn a_pool_change_wakes_only_deployments_waiting_on_that_pool() {
        // Planned on nodes this (empty) pool no longer offers: it waits on the pool.
        let waiting = deployment(1, Some(planned_status("True", 3, true)));
        assert!(pool_change_matters(&waiting, &pool("pool")));
        assert!(!pool_change_matters(&waiting, &pool("other")));
        assert!(!pool_change_matters(&deployment(1, None), &pool("pool")));
        let mut leaving = waiting.clone();
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        assert!(!pool_change_matters(&leaving, &pool("pool")));
    }

    #[test]
    fn the_plan_summary_names_split_gpu_and_placement() {
        let mut plan = fixture_plan();
        assert_eq!(
            plan_summary(&plan),
            "TP 4 x PP 2 (8 GPU(s) per group, H100), 2 replica group(s): group 0 on node-0,node-1; group 1 on node-2,node-3"
        );
        plan.groups.clear();
        assert_eq!(
            plan_summary(&plan),
            "TP 4 x PP 2 (8 GPU(s) per group, H100), 2 replica group(s)"
        );
    }
}
