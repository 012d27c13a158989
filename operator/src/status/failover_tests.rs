//! Table tests of the failover decisions.

use super::*;

fn at(s: &str) -> Timestamp {
    s.parse().expect("time")
}

fn now() -> Timestamp {
    at("2026-06-01T12:00:00Z")
}

fn pod(name: &str, group: i32, node: &str, created: &str) -> PodView {
    PodView {
        name: name.into(),
        group,
        rank: name
            .rsplit('-')
            .next()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
        node: Some(node.into()),
        created: at(created),
        hash: "h1".into(),
        terminating: false,
        ready: true,
        restarts: 0,
        failed: false,
        exit: None,
    }
}

/// Group 0 on nodes a (rank 0) and b (rank 1), group 1 on c and d, all healthy.
fn healthy() -> Vec<PodView> {
    vec![
        pod("chat-g0-0", 0, "a", "2026-06-01T11:00:00Z"),
        pod("chat-g0-1", 0, "b", "2026-06-01T11:00:00Z"),
        pod("chat-g1-0", 1, "c", "2026-06-01T11:00:01Z"),
        pod("chat-g1-1", 1, "d", "2026-06-01T11:00:01Z"),
    ]
}

fn nodes() -> Vec<NodeView> {
    ["a", "b", "c", "d"]
        .iter()
        .map(|n| NodeView {
            name: (*n).into(),
            ready: true,
            since: Some(at("2026-06-01T10:00:00Z")),
            quarantined_until: None,
        })
        .collect()
}

fn groups() -> Vec<GroupSpec> {
    (0..2)
        .map(|index| GroupSpec {
            index,
            hash: "h1".into(),
        })
        .collect()
}

const POLICY: Policy = Policy {
    budget: 2,
    quarantine: SignedDuration::from_mins(30),
    node_grace: SignedDuration::from_secs(60),
};

fn decide_with(pods: &[PodView], nodes: &[NodeView], history: &[GroupRestart]) -> Decision {
    decide(&Inputs {
        groups: &groups(),
        pods,
        nodes,
        history,
        policy: POLICY,
        now: now(),
    })
}

fn restart(group: i32, time: &str) -> GroupRestart {
    GroupRestart {
        group,
        time: Time(at(time)),
        reason: "earlier".into(),
    }
}

fn recreated(d: &Decision) -> Vec<(i32, Vec<String>, bool)> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::Recreate {
                group,
                pods,
                counted,
                ..
            } => Some((*group, pods.clone(), *counted)),
            _ => None,
        })
        .collect()
}

fn drains(d: &Decision) -> Vec<bool> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::Recreate { drain, .. } => Some(*drain),
            _ => None,
        })
        .collect()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

#[test]
fn healthy_groups_need_nothing() {
    let d = decide_with(&healthy(), &nodes(), &[]);
    assert_eq!(d, Decision::default());
}

/// One rank restarted (SIGKILL, crash): the whole group is recreated, counted, with the exit
/// named; the other group is untouched.
#[test]
fn a_restarted_rank_recreates_its_whole_group() {
    let mut pods = healthy();
    pods[1].restarts = 1;
    pods[1].exit = Some(Exit {
        code: 137,
        message: String::new(),
    });
    let d = decide_with(&pods, &nodes(), &[]);
    assert_eq!(
        recreated(&d),
        vec![(0, names(&["chat-g0-0", "chat-g0-1"]), true)]
    );
    assert_eq!(d.restarts.len(), 1);
    assert_eq!(d.restarts[0].group, 0);
    assert_eq!(
        d.restarts[0].reason,
        "pod chat-g0-1 (rank 1) restarted, exit code 137 (signal 9)"
    );
    assert!(d.exhausted.is_empty());
}

/// A failed pod and a replaced pod (deleted by someone, made again by the StatefulSet) are
/// faults too; a pod created with its group is not.
#[test]
fn failed_and_replaced_pods_are_faults() {
    let mut pods = healthy();
    pods[0].failed = true;
    let d = decide_with(&pods, &nodes(), &[]);
    assert_eq!(recreated(&d).len(), 1);
    assert!(d.restarts[0].reason.contains("failed"), "{d:?}");

    let mut pods = healthy();
    pods[3].created = at("2026-06-01T11:00:10Z");
    let d = decide_with(&pods, &nodes(), &[]);
    assert!(recreated(&d).is_empty(), "9 s apart is the same start");
    pods[3].created = at("2026-06-01T11:00:11Z");
    let d = decide_with(&pods, &nodes(), &[]);
    assert_eq!(
        recreated(&d),
        vec![(1, names(&["chat-g1-0", "chat-g1-1"]), true)]
    );
    assert_eq!(
        d.restarts[0].reason,
        "pod chat-g1-1 (rank 1) was deleted and replaced"
    );
}

/// The budget counts the last hour: two earlier restarts (budget 2) exhaust the group, one
/// older than an hour does not count, and the other group keeps its own budget.
#[test]
fn the_budget_counts_the_last_hour_per_group() {
    let mut pods = healthy();
    pods[0].restarts = 3;
    pods[2].restarts = 1;
    let history = [
        restart(0, "2026-06-01T11:10:00Z"),
        restart(0, "2026-06-01T11:20:00Z"),
        restart(1, "2026-06-01T10:59:59Z"),
    ];
    // Pods made after the last restart of their group (else they are the deleted ones).
    for p in &mut pods {
        p.created = at("2026-06-01T11:30:00Z");
    }
    let d = decide_with(&pods, &nodes(), &history);
    assert_eq!(
        recreated(&d),
        vec![(1, names(&["chat-g1-0", "chat-g1-1"]), true)]
    );
    assert_eq!(d.exhausted.len(), 1);
    assert_eq!(d.exhausted[0].0, 0);
    assert!(d.exhausted[0].1.contains("chat-g0-0"), "{:?}", d.exhausted);
    // The hour-old restart fell out of the window; the new one is kept.
    assert_eq!(
        d.restarts.iter().map(|r| r.group).collect::<Vec<_>>(),
        [0, 0, 1]
    );
    // Budget 0: never recreated.
    let d = decide(&Inputs {
        groups: &groups(),
        pods: &pods,
        nodes: &nodes(),
        history: &[],
        policy: Policy {
            budget: 0,
            ..POLICY
        },
        now: now(),
    });
    assert!(recreated(&d).is_empty());
    assert_eq!(d.exhausted.len(), 2);
}

/// Pods older than their group's last recreation are the ones it deleted, still in a cache
/// that has not caught up: one fault is counted once.
#[test]
fn pods_the_last_recreation_deleted_are_ignored() {
    let mut pods = healthy();
    pods[1].restarts = 1;
    let history = [restart(0, "2026-06-01T11:59:59.500Z")];
    let d = decide_with(&pods, &nodes(), &history);
    assert!(recreated(&d).is_empty(), "{d:?}");
    // A pod made in the same second as the recreation is a new one (timestamps are seconds).
    for p in &mut pods[..2] {
        p.created = at("2026-06-01T11:59:59Z");
    }
    let d = decide_with(&pods, &nodes(), &history);
    assert_eq!(recreated(&d).len(), 1, "{d:?}");
}

/// A rank stopped by a fatal GPU fault quarantines its node (once) and recreates the group.
#[test]
fn a_gpu_fault_quarantines_the_node() {
    let mut pods = healthy();
    pods[0].restarts = 1;
    pods[0].exit = Some(Exit {
        code: EXIT_GPU_FAULT,
        message: "fatal GPU fault on GPU 0 (GPU-1, NVIDIA H100): xid 79".into(),
    });
    let d = decide_with(&pods, &nodes(), &[]);
    assert_eq!(
        d.actions[0],
        Action::Quarantine {
            node: "a".into(),
            until: at("2026-06-01T12:30:00Z"),
            reason:
                "pod chat-g0-0: exit code 4: fatal GPU fault on GPU 0 (GPU-1, NVIDIA H100): xid 79"
                    .into(),
        }
    );
    assert_eq!(recreated(&d).len(), 1);
    // Already quarantined: not again. quarantineMinutes 0: never.
    let mut ns = nodes();
    ns[0].quarantined_until = Some(at("2026-06-01T12:10:00Z"));
    let d = decide_with(&pods, &ns, &[]);
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::Quarantine { .. }))
    );
    ns[0].quarantined_until = Some(at("2026-06-01T11:10:00Z"));
    let d = decide_with(&pods, &ns, &[]);
    assert!(
        d.actions
            .iter()
            .any(|a| matches!(a, Action::Quarantine { .. })),
        "expired"
    );
    let d = decide(&Inputs {
        groups: &groups(),
        pods: &pods,
        nodes: &nodes(),
        history: &[],
        policy: Policy {
            quarantine: SignedDuration::ZERO,
            ..POLICY
        },
        now: now(),
    });
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::Quarantine { .. }))
    );
    // Another exit code is no GPU fault.
    pods[0].exit.as_mut().expect("exit").code = 1;
    let d = decide_with(&pods, &nodes(), &[]);
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::Quarantine { .. }))
    );
}

/// A node NotReady for longer than the grace period: its pods (Terminating or not) are
/// force-deleted and the group recreated; within the grace period nothing happens.
#[test]
fn pods_of_a_dead_node_are_force_deleted_after_the_grace_period() {
    let mut pods = healthy();
    pods[1].terminating = true;
    let mut ns = nodes();
    ns[1].ready = false;
    ns[1].since = Some(at("2026-06-01T11:59:01Z"));
    let d = decide_with(&pods, &ns, &[]);
    assert_eq!(d, Decision::default(), "59 s: within the grace period");
    ns[1].since = Some(at("2026-06-01T11:59:00Z"));
    let d = decide_with(&pods, &ns, &[]);
    assert_eq!(
        d.actions[0],
        Action::ForceDelete {
            pod: "chat-g0-1".into(),
            node: "b".into()
        }
    );
    assert_eq!(recreated(&d), vec![(0, names(&["chat-g0-0"]), true)]);
    assert_eq!(d.restarts[0].reason, "node b of pod chat-g0-1 is not ready");
    // A group no longer planned (capacity lost) still has its dead pods cleared.
    let d = decide(&Inputs {
        groups: &groups()[1..],
        pods: &pods,
        nodes: &ns,
        history: &[],
        policy: POLICY,
        now: now(),
    });
    assert_eq!(
        d.actions,
        vec![Action::ForceDelete {
            pod: "chat-g0-1".into(),
            node: "b".into()
        }]
    );
}

/// Pods of an older configuration take their whole group with them, at once, not counted.
#[test]
fn pods_of_an_old_configuration_are_replaced_uncounted() {
    let mut pods = healthy();
    pods[0].hash = "h0".into();
    pods[1].hash = "h0".into();
    pods[1].restarts = 0;
    let d = decide_with(&pods, &nodes(), &[]);
    assert_eq!(
        recreated(&d),
        vec![(0, names(&["chat-g0-0", "chat-g0-1"]), false)]
    );
    assert!(d.restarts.is_empty());
    assert_eq!(drains(&d), vec![true], "a serving group drains");
    // A group whose API rank is not Ready (still loading, or just recreated on a node a fault
    // has quarantined since) has nothing to drain: its pods go with no grace.
    pods[0].ready = false;
    let d = decide_with(&pods, &nodes(), &[]);
    assert_eq!(drains(&d), vec![false]);
    // One rank of the old configuration is enough: the whole group goes, so no group ever
    // forms of two configurations.
    let mut pods = healthy();
    pods[1].hash = "h0".into();
    pods[1].restarts = 0;
    let d = decide_with(&pods, &nodes(), &[]);
    assert_eq!(
        recreated(&d),
        vec![(0, names(&["chat-g0-0", "chat-g0-1"]), false)]
    );
}

/// The view of a real pod: group and rank labels, node, hash, restarts and the termination
/// message of its last exit.
#[test]
fn pod_views_read_labels_restarts_and_the_last_exit() {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "chat-g1-1", "creationTimestamp": "2026-06-01T11:00:00Z",
            "labels": {"whaleflux.io/group": "1", "apps.kubernetes.io/pod-index": "1"},
            "annotations": {"whaleflux.io/config-hash": "abc"}},
        "spec": {"nodeName": "gpu-3", "containers": []},
        "status": {"phase": "Running", "containerStatuses": [{"name": "worker", "image": "w", "imageID": "",
            "ready": true, "restartCount": 2,
            "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 4, "message": "fatal GPU fault on GPU 1\n"}}}]}
    }))
    .expect("pod");
    let v = PodView::of(&pod).expect("view");
    assert_eq!((v.group, v.rank, v.restarts, v.ready), (1, 1, 2, true));
    assert_eq!(v.node.as_deref(), Some("gpu-3"));
    assert_eq!(v.hash, "abc");
    assert_eq!(
        v.exit,
        Some(Exit {
            code: 4,
            message: "fatal GPU fault on GPU 1".into()
        })
    );
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "gpu-3", "annotations": {"whaleflux.io/quarantined-until": "2026-06-01T12:30:00Z"}},
        "status": {"conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-06-01T11:59:00Z"}]}
    }))
    .expect("node");
    let n = NodeView::of(&node);
    assert!(!n.ready);
    assert_eq!(n.since, Some(at("2026-06-01T11:59:00Z")));
    assert_eq!(n.quarantined_until, Some(at("2026-06-01T12:30:00Z")));
}

/// The status keeps times in seconds: the same restart from the status and from this process's
/// memory is one entry.
#[test]
fn one_restart_remembered_twice_counts_once() {
    let mut exact = restart(0, "2026-06-01T11:59:30.250Z");
    let from_status = restart(0, "2026-06-01T11:59:30Z");
    exact.reason = from_status.reason.clone();
    let d = decide_with(&healthy(), &nodes(), &[exact, from_status]);
    assert_eq!(d.restarts.len(), 1, "{:?}", d.restarts);
}

/// A rank that stopped because its group failed is not named as the cause: the one that
/// stopped first is.
#[test]
fn the_rank_that_failed_first_is_named() {
    let mut pods = healthy();
    pods[0].restarts = 1;
    pods[0].exit = Some(Exit {
        code: EXIT_GROUP_FAILED,
        message: "peer stage 1 went away".into(),
    });
    pods[1].restarts = 1;
    pods[1].exit = Some(Exit {
        code: 137,
        message: String::new(),
    });
    let d = decide_with(&pods, &nodes(), &[]);
    assert_eq!(
        d.restarts[0].reason,
        "pod chat-g0-1 (rank 1) restarted, exit code 137 (signal 9)"
    );
}
