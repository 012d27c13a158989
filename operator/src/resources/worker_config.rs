//! The one place a worker's configuration is rendered. Pods get it through the deployment's
//! ConfigMap (one document for every pod of a group; the pod's ordinal picks its stage), and
//! `whaleflux run` writes one file per local process from the same document.

use whaleflux_crds::{
    LlmDeployment, PeerAddress, Plan, WorkerConfig, WorkerModel, WorkerPorts, WorkerServing,
};

/// Port every worker listens on for peer traffic inside a pod.
pub const PEER_PORT: i32 = 29500;

/// Requests a stage-0 worker lets wait for a batch slot, per concurrent sequence.
const QUEUE_PER_SEQUENCE: i32 = 8;

/// How the processes of a group find each other.
#[derive(Debug, Clone, PartialEq)]
pub enum Addressing {
    /// Pods of one StatefulSet behind a headless Service: stage `s` is
    /// `<statefulset>-<s>.<service>.<namespace>.svc.cluster.local`, each pod runs its stage's TP
    /// ranks as threads.
    Pods {
        /// Namespace of the deployment.
        namespace: String,
        /// Headless Service giving the pods DNS names.
        headless_service: String,
        /// StatefulSet of the replica group.
        statefulset: String,
    },
    /// Local processes on one host: one process per (stage, TP rank) when `tp_processes`, else
    /// one per stage; peer ports count up from `base_peer_port`.
    Local {
        /// Address every process binds and dials (e.g. 127.0.0.1).
        host: String,
        /// First peer port; process `i` (stage-major) uses `base_peer_port + i`.
        base_peer_port: u16,
        /// Run each TP rank as its own process (TCP all-reduce) instead of threads.
        tp_processes: bool,
    },
}

/// Render the configuration shared by every process of replica group `group`.
///
/// `model_path` is the GGUF path as the worker sees it (inside the pod, or on this machine).
/// In pod addressing `stage` and `tpRank` stay unset (the ordinal decides); use
/// [`for_local_process`] to pin them for a local process.
pub fn render(
    deployment: &LlmDeployment,
    plan: &Plan,
    group: i32,
    model_path: &str,
    addressing: &Addressing,
) -> WorkerConfig {
    let name = deployment.metadata.name.clone().unwrap_or_default();
    let serving = &deployment.spec.serving;
    let served_name = deployment
        .spec
        .model
        .preset
        .clone()
        .unwrap_or_else(|| name.clone());
    let peers = match addressing {
        Addressing::Pods {
            namespace,
            headless_service,
            statefulset,
        } => plan
            .stages
            .iter()
            .map(|s| PeerAddress {
                stage: s.index,
                tp_rank: None,
                host: format!(
                    "{statefulset}-{}.{headless_service}.{namespace}.svc.cluster.local",
                    s.index
                ),
                port: PEER_PORT,
            })
            .collect(),
        Addressing::Local {
            host,
            base_peer_port,
            tp_processes,
        } => local_ranks(plan, *tp_processes)
            .enumerate()
            .map(|(i, (stage, tp_rank))| PeerAddress {
                stage,
                tp_rank,
                host: host.clone(),
                port: i32::from(*base_peer_port) + i as i32,
            })
            .collect(),
    };
    WorkerConfig {
        deployment: name,
        model: WorkerModel {
            path: model_path.to_string(),
            served_name,
            sha256: deployment.spec.model.weights.source.sha256.clone(),
        },
        plan: plan.clone(),
        group,
        stage: None,
        tp_rank: None,
        peers,
        ports: WorkerPorts {
            http: serving.port,
            peer: PEER_PORT,
        },
        serving: WorkerServing {
            max_context_length: serving.max_context_length,
            max_concurrent_sequences: serving.max_concurrent_sequences,
            max_queue: serving
                .max_concurrent_sequences
                .saturating_mul(QUEUE_PER_SEQUENCE),
        },
        threads: 0,
        peer_timeout_ms: 30_000,
        formation_timeout_ms: whaleflux_crds::worker::formation_timeout_ms(plan),
    }
}

/// The (stage, TP rank) of every process of a local group, stage-major; TP rank is `None` when
/// a stage's ranks are threads of one process.
pub fn local_ranks(plan: &Plan, tp_processes: bool) -> impl Iterator<Item = (i32, Option<i32>)> {
    let tp = plan.tensor_parallel.max(1);
    plan.stages.iter().flat_map(move |s| {
        let ranks: Vec<Option<i32>> = if tp_processes {
            (0..tp).map(Some).collect()
        } else {
            vec![None]
        };
        ranks.into_iter().map(move |r| (s.index, r))
    })
}

/// Pin a group configuration to one local process: its stage, TP rank, peer port (from the
/// peer list) and HTTP port (`http_port`; stage 0 / rank 0 serves the API there).
pub fn for_local_process(
    group: &WorkerConfig,
    stage: i32,
    tp_rank: Option<i32>,
    http_port: i32,
) -> WorkerConfig {
    let peer = group
        .peers
        .iter()
        .find(|p| p.stage == stage && p.tp_rank == tp_rank)
        .map_or(group.ports.peer, |p| p.port);
    WorkerConfig {
        stage: Some(stage),
        tp_rank,
        ports: WorkerPorts {
            http: http_port,
            peer,
        },
        ..group.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        serde_yaml::from_str(include_str!("../../tests/fixtures/plan-llama-3.1-70b.yaml"))
            .expect("plan fixture")
    }

    fn deployment() -> LlmDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "whaleflux.io/v1alpha1", "kind": "LlmDeployment",
            "metadata": {"name": "chat", "namespace": "ml"},
            "spec": {"model": {"preset": "llama-3.1-70b", "weights": {"source": {"path": "/m.gguf"}}},
                     "gpuPool": "pool"}
        }))
        .expect("deployment")
    }

    #[test]
    fn local_processes_are_numbered_stage_major_and_pinned_one_by_one() {
        // TP 4 x PP 2: one process per stage with TP threads, or one per (stage, rank).
        let p = plan();
        assert_eq!(
            local_ranks(&p, false).collect::<Vec<_>>(),
            [(0, None), (1, None)]
        );
        let all: Vec<_> = local_ranks(&p, true).collect();
        let want: Vec<_> = (0..2)
            .flat_map(|s| (0..4).map(move |r| (s, Some(r))))
            .collect();
        assert_eq!(all, want);
        let local = Addressing::Local {
            host: "127.0.0.1".into(),
            base_peer_port: 7000,
            tp_processes: true,
        };
        let g = render(&deployment(), &p, 0, "/m.gguf", &local);
        let peers: Vec<_> = g
            .peers
            .iter()
            .map(|a| (a.stage, a.tp_rank, a.host.as_str(), a.port))
            .collect();
        assert_eq!(peers.len(), 8);
        assert_eq!(peers[0], (0, Some(0), "127.0.0.1", 7000));
        assert_eq!(peers[6], (1, Some(2), "127.0.0.1", 7006));
        let one = for_local_process(&g, 1, Some(2), 8001);
        assert_eq!(
            (one.stage, one.tp_rank, one.ports.http, one.ports.peer),
            (Some(1), Some(2), 8001, 7006)
        );
        assert_eq!(one.peers, g.peers);
        // A process the group does not list keeps the group's peer port.
        let stray = for_local_process(&g, 5, Some(0), 8002);
        assert_eq!(stray.ports.peer, g.ports.peer);
        let rank_mismatch = for_local_process(&g, 1, None, 8003);
        assert_eq!(rank_mismatch.ports.peer, g.ports.peer);
    }
}
