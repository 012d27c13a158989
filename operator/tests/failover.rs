//! Failover end to end: the real `whaleflux operator`, real `whaleflux-worker` processes run by
//! the process kubelet, real kubectl. (a) a SIGKILLed rank of a pipeline-parallel group gets
//! its whole group recreated, counted; (d) once the restart budget is spent the deployment is
//! Degraded and the group left alone while the other serves; (b) an XID 79 from a node's fake
//! NVML stops the rank with its reason, quarantines the node and the group comes up on another;
//! the quarantine is lifted by hand with `kubectl annotate`; (c) a node that loses power has
//! its pods force-deleted after the grace period and the group moves; (e) with too few GPUs
//! left the deployment runs fewer groups (`ReducedCapacity`) and grows back when they return.
//!
//! Needs `WHALEFLUX_TEST_MODEL`, `kubectl`, a C compiler (the fake NVML) and the worker binary.

mod cluster;
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use cluster::{Cluster, OPERATOR_USER, bounded, nvml_state, rtx_nodes, with_fake_nvml};
use common::complete;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, Client, ResourceExt};
use whaleflux_crds::{GpuPool, LlmDeployment, LlmDeploymentStatus};
use whaleflux_e2e::fake_nvml::FakeNode;

const PROMPT: &str = "The capital of France is";
const WAIT: Duration = Duration::from_secs(180);

/// The smollm2 example with `replicas` groups of a fixed TP `tp` × PP `pp` split and the
/// given failover settings.
fn manifest(
    c: &Cluster,
    replicas: i32,
    (tp, pp): (i32, i32),
    budget: i32,
    quarantine: i32,
) -> String {
    let text = c.smollm2_manifest();
    let fixed = text.replace(
        "  replicas: 1\n",
        &format!(
            "  replicas: {replicas}\n  parallelism:\n    tensorParallel: {tp}\n    pipelineParallel: {pp}\n  failover:\n    restartBudget: {budget}\n    quarantineMinutes: {quarantine}\n"
        ),
    );
    assert_ne!(fixed, text, "the example's `replicas: 1` line moved");
    fixed
}

async fn status(client: &Client) -> LlmDeploymentStatus {
    Api::<LlmDeployment>::namespaced(client.clone(), "default")
        .get("smollm2")
        .await
        .ok()
        .and_then(|d| d.status)
        .unwrap_or_default()
}

fn condition(s: &LlmDeploymentStatus, t: &str) -> (String, String, String) {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// (uid, node, ready) of a live pod, None when absent or being deleted.
async fn pod(client: &Client, name: &str) -> Option<(String, String, bool)> {
    let p = Api::<Pod>::namespaced(client.clone(), "default")
        .get_opt(name)
        .await
        .ok()
        .flatten()?;
    if p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ready = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    Some((
        p.uid().unwrap_or_default(),
        p.spec.and_then(|s| s.node_name).unwrap_or_default(),
        ready,
    ))
}

/// A greedy completion from the pod's API.
async fn answer(client: &Client, pod_name: &str) -> String {
    let ip = Api::<Pod>::namespaced(client.clone(), "default")
        .get(pod_name)
        .await
        .expect("pod")
        .status
        .and_then(|s| s.pod_ip)
        .expect("pod IP");
    let addr: SocketAddr = format!("{ip}:8000").parse().expect("address");
    tokio::task::spawn_blocking(move || complete(addr, PROMPT, 8))
        .await
        .expect("request thread")
}

/// The reasons of the events about `regarding` (kubectl, as a user reads them).
fn event_notes(c: &Cluster, regarding: &str, reason: &str) -> String {
    c.kubectl_ok(
        &[
            "get",
            "events.events.k8s.io",
            "-A",
            "--field-selector",
            &format!("regarding.name={regarding},reason={reason}"),
            "-o",
            "jsonpath={range .items[*]}{.type} {.note}{\"\\n\"}{end}",
        ],
        None,
    )
}

async fn ready_groups(client: &Client, want: i32) -> bool {
    let s = status(client).await;
    s.ready_replicas == want && s.plan.is_some_and(|p| p.replicas == want)
}

/// (a) and (d): SIGKILL one rank of a PP=2 group; the whole group is recreated, Ready again,
/// answers the same, the restart counted (status, event, metric). With the budget lowered to
/// what is spent, the next fault leaves the group alone: Degraded, RestartBudgetExhausted, and the other
/// group still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_rank_recreates_its_group_until_the_budget_is_spent() {
    let c = Cluster::start(rtx_nodes(2, 4), true).await;
    let op = c.operator("op-failover-a", 6);
    let kubelet = c.kubelet.as_ref().expect("kubelet");
    let body = async {
        c.install_crds_and_pool();
        let client = c.client().await;
        c.kubectl_ok(&["apply", "-f", "-"], Some(&manifest(&c, 2, (1, 2), 5, 30)));
        c.eventually_or_diagnose(&op, "two PP=2 groups ready", WAIT, || {
            ready_groups(&client, 2)
        })
        .await;
        let before = answer(&client, "smollm2-g0-0").await;
        // Restarts already spent while the groups formed (none expected; counted, not assumed).
        let spent = status(&client).await.restarts.len();
        let uid = |name: &'static str| {
            let client = client.clone();
            async move { pod(&client, name).await.map(|p| p.0) }
        };
        let (g0r0, g0r1, g1r0) = (
            uid("smollm2-g0-0").await,
            uid("smollm2-g0-1").await,
            uid("smollm2-g1-0").await,
        );

        assert!(kubelet.kill("default", "smollm2-g0-1"), "rank 1 runs");
        c.eventually_or_diagnose(
            &op,
            "group 0 recreated as a whole and ready again",
            WAIT,
            || async {
                let s = status(&client).await;
                s.restarts.len() == spent + 1
                    && s.ready_replicas == 2
                    && uid("smollm2-g0-0")
                        .await
                        .is_some_and(|u| Some(&u) != g0r0.as_ref())
                    && uid("smollm2-g0-1")
                        .await
                        .is_some_and(|u| Some(&u) != g0r1.as_ref())
            },
        )
        .await;
        let s = status(&client).await;
        let last = s.restarts.last().expect("a restart");
        assert_eq!(last.group, 0);
        assert!(
            last.reason.contains("smollm2-g0-1 (rank 1) restarted"),
            "{:?}",
            s.restarts
        );
        assert_eq!(uid("smollm2-g1-0").await, g1r0, "group 1 untouched");
        assert_eq!(answer(&client, "smollm2-g0-0").await, before);
        let notes = event_notes(&c, "smollm2", "GroupRestarted");
        assert!(
            notes.contains(&format!(
                "Warning replica group 0 recreated (restart {} of 5 this hour)",
                spent + 1
            )),
            "{notes}"
        );
        let (_, metrics) = op.get("/metrics").expect("operator metrics");
        assert!(
            metrics.contains(&format!(
                "whaleflux_group_restarts_total{{namespace=\"default\",deployment=\"smollm2\"}} {}",
                spent + 1
            )),
            "{metrics}"
        );

        // The budget lowered to what is spent: the next fault is reported, not acted on.
        c.kubectl_ok(
            &[
                "patch",
                "llmd",
                "smollm2",
                "--type=merge",
                "-p",
                &format!(
                    r#"{{"spec":{{"failover":{{"restartBudget":{}}}}}}}"#,
                    spent + 1
                ),
            ],
            None,
        );
        c.eventually_or_diagnose(&op, "the operator to see the new budget", WAIT, || async {
            status(&client).await.observed_generation == Some(2)
        })
        .await;
        let g0r1 = uid("smollm2-g0-1").await;
        assert!(kubelet.kill("default", "smollm2-g0-0"), "rank 0 runs");
        c.eventually_or_diagnose(&op, "Degraded: RestartBudgetExhausted", WAIT, || async {
            condition(&status(&client).await, "Degraded").1 == "RestartBudgetExhausted"
        })
        .await;
        let s = status(&client).await;
        let (st, _, msg) = condition(&s, "Degraded");
        assert_eq!(st, "True");
        assert!(
            msg.contains("group 0: pod smollm2-g0-0 (rank 0) restarted"),
            "{msg}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(uid("smollm2-g0-1").await, g0r1, "no more recreations");
        assert_eq!(status(&client).await.restarts.len(), spent + 1);
        assert!(
            !answer(&client, "smollm2-g1-0").await.is_empty(),
            "group 1 serves"
        );
        let notes = event_notes(&c, "smollm2", "RestartBudgetExhausted");
        assert_eq!(notes.lines().count(), 1, "one event: {notes}");

        // Every permission failover used (pod deletion) is granted.
        let used = c.server.audit().permissions_used(OPERATOR_USER);
        assert!(
            used.contains(&("".into(), "pods".into(), "delete".into())),
            "{used:?}"
        );
    };
    bounded(Duration::from_secs(480), body).await;
    drop(op);
}

/// (b): a fake XID 79 on the group's node: the worker exits with the reason in its termination
/// message, the operator quarantines the node (annotations, events, the pool's status), the
/// group comes up on the other node and answers; `kubectl annotate` lifts the quarantine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_xid_79_quarantines_the_node_and_the_group_moves() {
    let tmp = std::env::temp_dir().join(format!("wf-failover-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let nodes = with_fake_nvml(&tmp, rtx_nodes(2, 4));
    let state = |n: &str| nvml_state(&tmp, n);
    let c = Cluster::start(nodes, true).await;
    let op = c.operator("op-failover-b", 6);
    let body = async {
        c.install_crds_and_pool();
        let client = c.client().await;
        c.kubectl_ok(&["apply", "-f", "-"], Some(&manifest(&c, 1, (3, 1), 3, 30)));
        c.eventually_or_diagnose(&op, "the group ready", WAIT, || ready_groups(&client, 1))
            .await;
        let (_, first, _) = pod(&client, "smollm2-g0-0").await.expect("pod");
        let before = answer(&client, "smollm2-g0-0").await;

        let mut faulty = FakeNode::h100s(1);
        faulty.xids.push((0, 79));
        faulty.write(&state(&first)).expect("write the XID");
        let nodes: Api<Node> = Api::all(client.clone());
        c.eventually_or_diagnose(
            &op,
            "the node quarantined and the group moved",
            WAIT,
            || async {
                let quarantined = nodes.get(&first).await.ok().is_some_and(|n| {
                    n.annotations()
                        .contains_key("whaleflux.io/quarantined-until")
                });
                quarantined
                    && ready_groups(&client, 1).await
                    && pod(&client, "smollm2-g0-0")
                        .await
                        .is_some_and(|(_, node, ready)| node != first && ready)
            },
        )
        .await;
        let node = nodes.get(&first).await.expect("node");
        let why = &node.annotations()["whaleflux.io/quarantine-reason"];
        assert!(
            why.contains("exit code 4: fatal GPU fault on GPU 0") && why.contains("79"),
            "{why}"
        );
        let notes = event_notes(&c, &first, "NodeQuarantined");
        assert!(notes.contains("Warning node"), "{notes}");
        let s = status(&client).await;
        assert_eq!(s.restarts.len(), 1, "{:?}", s.restarts);
        assert!(
            s.restarts[0].reason.contains("exit code 4"),
            "{:?}",
            s.restarts
        );
        assert_eq!(answer(&client, "smollm2-g0-0").await, before);
        let pools: Api<GpuPool> = Api::all(client.clone());
        let quarantined_in_pool = |want: bool| {
            let pools = pools.clone();
            let first = first.clone();
            async move {
                pools
                    .get("rtx4090-pcie")
                    .await
                    .ok()
                    .and_then(|p| p.status)
                    .is_some_and(|s| {
                        s.nodes
                            .iter()
                            .any(|n| n.name == first && n.quarantined_until.is_some() == want)
                    })
            }
        };
        c.eventually_or_diagnose(&op, "the pool shows the quarantine", WAIT, || {
            quarantined_in_pool(true)
        })
        .await;

        // Lifted by hand.
        c.kubectl_ok(
            &[
                "annotate",
                "node",
                &first,
                "whaleflux.io/quarantined-until-",
                "whaleflux.io/quarantine-reason-",
            ],
            None,
        );
        c.eventually_or_diagnose(&op, "the pool takes the node back", WAIT, || {
            quarantined_in_pool(false)
        })
        .await;
        let used = c.server.audit().permissions_used(OPERATOR_USER);
        assert!(
            used.contains(&("".into(), "nodes".into(), "patch".into())),
            "{used:?}"
        );
    };
    bounded(Duration::from_secs(420), body).await;
    drop(op);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// (c) and (e): three nodes of four GPUs, two TP=3 groups (one per node). A node loses power:
/// after the grace period its pod is force-deleted and the group starts on the spare node. A
/// second node goes: one node is left, so one group runs (Degraded, ReducedCapacity); power
/// back, two groups again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_node_moves_its_group_and_lost_capacity_comes_back() {
    let c = Cluster::start(rtx_nodes(3, 4), true).await;
    let op = c.operator_with("op-failover-c", 6, &["--node-grace-seconds", "3"]);
    let kubelet = c.kubelet.as_ref().expect("kubelet");
    let body = async {
        c.install_crds_and_pool();
        let client = c.client().await;
        c.kubectl_ok(&["apply", "-f", "-"], Some(&manifest(&c, 2, (3, 1), 5, 30)));
        c.eventually_or_diagnose(&op, "two groups ready", WAIT, || ready_groups(&client, 2))
            .await;
        let (_, dead, _) = pod(&client, "smollm2-g0-0").await.expect("group 0");
        let (_, other, _) = pod(&client, "smollm2-g1-0").await.expect("group 1");

        kubelet.power_off(&dead);
        c.eventually_or_diagnose(&op, "group 0 on the spare node", WAIT, || async {
            ready_groups(&client, 2).await
                && pod(&client, "smollm2-g0-0")
                    .await
                    .is_some_and(|(_, node, ready)| node != dead && node != other && ready)
        })
        .await;
        let notes = event_notes(&c, "smollm2", "PodForceDeleted");
        assert!(
            notes.contains(&format!("its node {dead} has not been ready for 3 s")),
            "{notes}"
        );
        assert!(!answer(&client, "smollm2-g0-0").await.is_empty());

        kubelet.power_off(&other);
        c.eventually_or_diagnose(&op, "one group: ReducedCapacity", WAIT, || async {
            let s = status(&client).await;
            condition(&s, "Degraded").1 == "ReducedCapacity" && ready_groups(&client, 1).await
        })
        .await;
        let (_, _, msg) = condition(&status(&client).await, "Degraded");
        assert!(msg.starts_with("running 1 of 2 replica group(s)"), "{msg}");
        assert!(!answer(&client, "smollm2-g0-0").await.is_empty());

        kubelet.power_on(&dead);
        kubelet.power_on(&other);
        c.eventually_or_diagnose(&op, "two groups again", WAIT, || async {
            let s = status(&client).await;
            condition(&s, "Degraded").0 == "False" && ready_groups(&client, 2).await
        })
        .await;

        // Deleting the deployment while a node of it is dead: its pod there stays Terminating
        // (no kubelet confirms), and the finalizer must not wait for it for ever.
        let (_, gone, _) = pod(&client, "smollm2-g1-0").await.expect("group 1");
        kubelet.power_off(&gone);
        c.kubectl_ok(&["delete", "llmd", "smollm2", "--wait=false"], None);
        let llmds: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
        c.eventually_or_diagnose(&op, "the deployment deleted", WAIT, || async {
            llmds.get_opt("smollm2").await.is_ok_and(|d| d.is_none())
        })
        .await;
    };
    bounded(Duration::from_secs(480), body).await;
    drop(op);
}
