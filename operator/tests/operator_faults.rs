//! The operator under faults, as a cluster produces them: injected 409s and 500s, watches closed
//! and resource versions expired (410 Gone), the operator SIGKILLed in the middle of creating a
//! deployment, two replicas competing for the leader Lease, and an API server that stops
//! answering (the reconcile and API timeouts). Each ends in the same state a clean run reaches,
//! with no duplicate objects.
//!
//! Needs `WHALEFLUX_TEST_MODEL`, `kubectl`, and the worker binary (`cargo build -p
//! whaleflux-worker`).

mod cluster;
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use cluster::{
    Cluster, OPERATOR_B_USER, OPERATOR_USER, bounded, eventually, rtx_nodes, smollm2_children,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, ResourceExt};
use whaleflux_crds::LlmDeployment;
use whaleflux_e2e::RequestMatch;

const WAIT: Duration = Duration::from_secs(90);

/// Every child of `smollm2` not being deleted, as kind/name, sorted.
async fn children(client: &Client) -> Vec<String> {
    smollm2_children(client, false).await
}

/// What a clean run with `groups` replica groups owns.
fn expected(groups: usize) -> Vec<String> {
    let mut v = vec![
        "pdb/smollm2".to_string(),
        "secret/smollm2-group-secret".to_string(),
        "service/smollm2".to_string(),
    ];
    for g in 0..groups {
        v.push(format!("statefulset/smollm2-g{g}"));
        v.push(format!("pod/smollm2-g{g}-0"));
        v.push(format!("service/smollm2-g{g}"));
        v.push(format!("configmap/smollm2-g{g}-config"));
    }
    v.sort();
    v
}

fn manifest(c: &Cluster, replicas: i32) -> String {
    c.smollm2_manifest()
        .replace("replicas: 1", &format!("replicas: {replicas}"))
}

async fn ready_replicas(api: &Api<LlmDeployment>) -> Option<(i32, bool)> {
    let d = api.get("smollm2").await.ok()?;
    let s = d.status?;
    Some((
        s.ready_replicas,
        s.observed_generation == d.metadata.generation,
    ))
}

async fn lease_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), "default")
        .get_opt("whaleflux-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injected_conflicts_errors_and_expired_watches_converge_without_duplicates() {
    let c = Cluster::start(rtx_nodes(2, 4), true).await;
    c.install_crds_and_pool();
    let faults = c.server.faults();
    // The operator's writes fail for a while: 500s on StatefulSet applies, 409s on status
    // writes, 429s on ConfigMap applies.
    faults.fail(
        RequestMatch::verb_resource("patch", "statefulsets"),
        500,
        Some(3),
    );
    faults.fail(
        RequestMatch {
            subresource: Some("status".into()),
            ..RequestMatch::verb_resource("patch", "llmdeployments")
        },
        409,
        Some(3),
    );
    faults.fail(
        RequestMatch::verb_resource("patch", "configmaps"),
        429,
        Some(2),
    );
    let op = c.operator("op-faults", 6);
    let client = c.client().await;
    let api: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
    bounded(Duration::from_secs(240), async {
        c.kubectl_ok(&["apply", "-f", "-"], Some(&manifest(&c, 2)));
        // Watches drop and every version the operator holds expires, twice, while it works:
        // each time every one of its watchers must relist (a 410 cannot be resumed).
        let audit = c.server.audit();
        let count = |verb: &str, resource: &str| {
            audit
                .events()
                .iter()
                .filter(|e| e.user == OPERATOR_USER && e.verb == verb && e.resource == resource)
                .count()
        };
        let watched = [
            "llmdeployments",
            "statefulsets",
            "gpupools",
            "nodes",
            "pods",
        ];
        eventually("the operator to be watching and applying", WAIT, || async {
            watched.iter().all(|r| count("watch", r) > 0) && count("patch", "statefulsets") > 0
        })
        .await;
        for round in 0..2 {
            let before: Vec<usize> = watched.iter().map(|r| count("list", r)).collect();
            faults.expire_resource_versions();
            eventually(
                &format!("every watcher to relist after 410 (round {round})"),
                WAIT,
                || async {
                    watched
                        .iter()
                        .zip(&before)
                        .all(|(r, b)| count("list", r) > *b)
                },
            )
            .await;
        }
        c.wait_smollm2("jsonpath={.status.readyReplicas}=2", "90s", &op);
        assert_eq!(children(&client).await, expected(2));
        // A change made while watches are broken is still seen (relist after 410).
        faults.close_watches();
        faults.expire_resource_versions();
        c.kubectl_ok(&["scale", "llmd/smollm2", "--replicas=1"], None);
        eventually("the scale-down to converge", WAIT, || async {
            ready_replicas(&api).await == Some((1, true)) && children(&client).await == expected(1)
        })
        .await;
        let (_, metrics) = op.get("/metrics").expect("metrics");
        for reason in ["server_error", "conflict"] {
            assert!(
                metrics.contains(&format!("reason=\"{reason}\"")),
                "no {reason} errors counted:\n{metrics}"
            );
        }
        // The two 429s were served, then retried inside the client (honouring Retry-After),
        // never reaching the reconciler.
        let cm: Vec<u16> = audit
            .events()
            .iter()
            .filter(|e| e.user == OPERATOR_USER && e.verb == "patch" && e.resource == "configmaps")
            .map(|e| e.code)
            .collect();
        assert_eq!(&cm[..2], &[429, 429], "ConfigMap applies: {cm:?}");
        assert!(
            cm.get(2).is_some_and(|c| (200..300).contains(c)),
            "the retry succeeds: {cm:?}"
        );
        assert!(
            !metrics.contains("reason=\"throttled\""),
            "429s reached the reconciler:\n{metrics}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_killed_mid_reconcile_restarts_to_the_same_end_state() {
    let c = Cluster::start(rtx_nodes(2, 4), true).await;
    c.install_crds_and_pool();
    let client = c.client().await;
    let api: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
    // Slow applies so the kill lands between the first and the last child.
    c.server.faults().delay(
        RequestMatch::verb_resource("patch", "statefulsets"),
        Duration::from_millis(400),
        None,
    );
    let mut first = c.operator("op-first", 3);
    bounded(Duration::from_secs(240), async {
        c.kubectl_ok(&["apply", "-f", "-"], Some(&manifest(&c, 2)));
        let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
        eventually("the first StatefulSet", WAIT, || async {
            sts.get_opt("smollm2-g0").await.ok().flatten().is_some()
        })
        .await;
        first.kill();
        let partial = children(&client).await;
        assert_ne!(
            partial,
            expected(2),
            "the kill should land before the deployment is complete"
        );
        c.server.faults().clear();
        // A fresh process (new identity): it takes the Lease once the old one's expires.
        let second = c.operator("op-second", 3);
        c.wait_smollm2("jsonpath={.status.readyReplicas}=2", "90s", &second);
        assert_eq!(children(&client).await, expected(2));
        let d = api.get("smollm2").await.expect("llmd");
        assert_eq!(
            d.finalizers(),
            &["whaleflux.io/cleanup".to_string()],
            "one finalizer, not two"
        );
        assert_eq!(lease_holder(&client).await.as_deref(), Some("op-second"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_one_leader_and_takeover_when_it_dies() {
    let c = Cluster::start(rtx_nodes(2, 4), true).await;
    c.install_crds_and_pool();
    let client = c.client().await;
    let api: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
    let mut a = c.operator("op-a", 3);
    bounded(Duration::from_secs(240), async {
        eventually("op-a to lead", WAIT, || async {
            lease_holder(&client).await.as_deref() == Some("op-a")
        })
        .await;
        let b = c.operator_b("op-b", 3);
        eventually("op-b to answer /readyz as a standby", WAIT, || async {
            b.get("/readyz").is_some_and(|(code, _)| code == 200)
        })
        .await;
        c.kubectl_ok(&["apply", "-f", "-"], Some(&c.smollm2_manifest()));
        c.wait_smollm2("condition=Ready", "90s", &a);
        // Exactly one reconciled: the standby only read the Lease.
        let b_calls = c.server.audit().permissions_used(OPERATOR_B_USER);
        let b_resources: BTreeSet<&str> = b_calls.iter().map(|(_, r, _)| r.as_str()).collect();
        assert_eq!(
            b_resources,
            BTreeSet::from(["leases"]),
            "the standby must not touch anything but the Lease: {b_calls:?}"
        );
        assert!(
            b.get("/metrics")
                .is_some_and(|(_, m)| m.contains("whaleflux_leader 0")),
            "the standby reports it does not lead"
        );
        assert!(
            c.server
                .audit()
                .permissions_used(OPERATOR_USER)
                .iter()
                .any(|(_, r, v)| r == "statefulsets" && v == "patch")
        );

        // The leader dies without releasing the Lease; the standby takes over after it
        // expires and carries on reconciling.
        a.kill();
        eventually(
            "op-b to take the Lease",
            Duration::from_secs(30),
            || async { lease_holder(&client).await.as_deref() == Some("op-b") },
        )
        .await;
        c.kubectl_ok(&["scale", "llmd/smollm2", "--replicas=2"], None);
        c.wait_smollm2("jsonpath={.status.readyReplicas}=2", "90s", &b);
        assert!(
            c.server
                .audit()
                .permissions_used(OPERATOR_B_USER)
                .iter()
                .any(|(_, r, v)| r == "statefulsets" && v == "patch"),
            "the new leader reconciles"
        );
        assert_eq!(children(&client).await, expected(2));
        let lease = Api::<Lease>::namespaced(client.clone(), "default")
            .get("whaleflux-operator")
            .await
            .expect("lease");
        assert_eq!(
            lease.spec.and_then(|s| s.lease_transitions),
            Some(1),
            "one takeover"
        );
        eventually("the new leader's status to be current", WAIT, || async {
            ready_replicas(&api).await == Some((2, true))
        })
        .await;
    })
    .await;
}

/// `whaleflux_reconcile_errors_total` of the deployment controller with `reason`, as the
/// operator's /metrics shows it (0 when absent).
fn deployment_errors(op: &cluster::Operator, reason: &str) -> u64 {
    let Some((_, text)) = op.get("/metrics") else {
        return 0;
    };
    text.lines()
        .filter(|l| {
            l.starts_with("whaleflux_reconcile_errors_total{")
                && l.contains("controller=\"llmdeployment\"")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_api_server_times_reconciles_out_and_they_converge_once_it_answers() {
    let c = Cluster::start(rtx_nodes(2, 4), true).await;
    c.install_crds_and_pool();
    let client = c.client().await;
    let faults = c.server.faults_handle();
    // Every StatefulSet apply is held for two minutes: the API server has gone silent for them.
    faults.delay(
        RequestMatch::verb_resource("patch", "statefulsets"),
        Duration::from_secs(120),
        None,
    );
    bounded(Duration::from_secs(240), async {
        c.kubectl_ok(&["apply", "-f", "-"], Some(&manifest(&c, 1)));
        // First a reconcile timeout shorter than the API timeout: the whole reconcile is
        // cancelled.
        let mut slow = c.operator_with(
            "op-reconcile-timeout",
            3,
            &["--reconcile-timeout-seconds", "1"],
        );
        c.eventually_or_diagnose(&slow, "a reconcile to time out", WAIT, || async {
            deployment_errors(&slow, "timeout") >= 2
        })
        .await;
        let (code, body) = slow.get("/healthz").expect("healthz");
        assert_eq!(
            (code, body.as_str()),
            (200, "ok"),
            "cancelled reconciles are not stuck ones"
        );
        assert!(
            slow.log_text().contains("did not finish within 1s"),
            "the log says the reconcile timed out:\n{}",
            slow.log_text()
        );
        assert!(slow.terminate().success(), "SIGTERM exits 0");
        // Then an API timeout shorter than the reconcile timeout: the call fails, and with it
        // the reconcile.
        let op = c.operator_with("op-api-timeout", 3, &["--api-timeout-seconds", "2"]);
        c.eventually_or_diagnose(&op, "an API call to time out", WAIT, || async {
            deployment_errors(&op, "api_timeout") >= 1
        })
        .await;
        assert_eq!(
            deployment_errors(&op, "timeout"),
            0,
            "the API timeout came first"
        );
        let (code, _) = op.get("/healthz").expect("healthz");
        assert_eq!(code, 200);
        // The API server answers again: the next retry (backoff, not a restart) converges.
        faults.clear();
        c.wait_smollm2("condition=Ready", "90s", &op);
        assert_eq!(children(&client).await, expected(1));
        assert!(
            !op.log_text().contains("lost leadership"),
            "{}",
            op.log_text()
        );
    })
    .await;
}
