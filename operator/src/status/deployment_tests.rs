//! Tests of the LlmDeployment status decisions.

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
        reduced: None,
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
            fault: None,
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
            ready: true,
            fault: None,
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

/// A running plan cut to the groups the pool still holds: Degraded, ReducedCapacity, counted
/// against the plan's groups; phase Degraded.
#[test]
fn reduced_capacity_is_degraded_and_counts_the_planned_groups() {
    let d = deployment(3, None);
    let mut p = planned(true);
    let mut plan = fixture_plan();
    plan.replicas = 1;
    p.plan = Some(plan);
    p.reduced = Some("3 groups need 3 GPUs; 1 is free".into());
    let s = deployment_status(&d, &p, &groups(&[true]), false, false, now());
    assert_eq!(cond(&s, "Degraded"), ("True", "ReducedCapacity"));
    assert_eq!(s.phase, Phase::Degraded);
    assert_eq!(cond(&s, "Progressing"), ("False", "Complete"));
    let msg = &s
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded")
        .message;
    assert!(
        msg.starts_with("running 1 of 3 replica group(s) (3 groups need"),
        "{msg}"
    );
}

/// A group with its budget spent: Degraded, RestartBudgetExhausted naming it; a group recreated
/// and not ready yet: Progressing, RecreatingGroup.
#[test]
fn failover_faults_show_in_the_conditions() {
    let d = deployment(2, None);
    let mut gs = groups(&[false, true]);
    gs[0].fault = Some(GroupFault::Exhausted(
        "pod chat-g0-1 (rank 1) restarted".into(),
    ));
    let s = deployment_status(&d, &planned(true), &gs, false, false, now());
    assert_eq!(cond(&s, "Degraded"), ("True", "RestartBudgetExhausted"));
    let msg = &s
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded")
        .message;
    assert!(
        msg.contains("group 0: pod chat-g0-1 (rank 1) restarted"),
        "{msg}"
    );
    gs[0].fault = Some(GroupFault::Recreated(
        "pod chat-g0-1 (rank 1) restarted".into(),
    ));
    let s = deployment_status(&d, &planned(true), &gs, false, false, now());
    assert_eq!(cond(&s, "Progressing"), ("True", "RecreatingGroup"));
    assert_eq!(cond(&s, "Degraded").1, "AsPlanned");
}

/// One group at a time: missing groups are created, current ones kept, one outdated group
/// replaced while the others wait; while a group of the current configuration is not ready
/// (a replacement in progress), nothing else is replaced.
#[test]
fn rollout_replaces_one_group_at_a_time() {
    let state = |hash: &str, ready: bool| GroupState {
        index: 0,
        hash: hash.into(),
        ready,
        fault: None,
    };
    let want = [(0, "new"), (1, "new"), (2, "new"), (3, "new")];
    let existing = std::collections::BTreeMap::from([
        (0, state("new", true)),
        (1, state("old", true)),
        (2, state("old", true)),
    ]);
    assert_eq!(
        rollout(&want, &existing),
        [
            Rollout::Keep,
            Rollout::Replace,
            Rollout::Wait,
            Rollout::Create
        ]
    );
    let mut busy = existing.clone();
    busy.insert(0, state("new", false));
    assert_eq!(
        rollout(&want, &busy),
        [Rollout::Keep, Rollout::Wait, Rollout::Wait, Rollout::Create]
    );
    assert!(rollout(&[], &existing).is_empty());
}
