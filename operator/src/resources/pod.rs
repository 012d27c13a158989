//! The worker pod's parts that concern what runs in it and with which rights: where the weights
//! come from, the restricted Pod Security profile every container meets, and how a stopping pod
//! drains (a pause for the endpoints to drop it, then the worker's own drain).

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, HostPathVolumeSource,
    Lifecycle, LifecycleHandler, PersistentVolumeClaimVolumeSource, PodSecurityContext,
    SeccompProfile, SecretKeySelector, SecurityContext, SleepAction, Volume, VolumeMount,
};
use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use whaleflux_crds::{LlmDeployment, ServingSpec};

use super::children::MODEL_DIR;

/// The user and group workers run as: the images' `nonroot` (65532), set explicitly so images
/// that default to root (the curl image) run unprivileged too.
pub const RUN_AS: i64 = 65532;
/// Seconds a stopping pod waits before its worker is told to stop, so the Service's endpoints
/// (and load balancers watching them) drop the pod first and send it no new requests.
pub const PRE_STOP_SECONDS: i64 = 5;
/// Seconds left after the drain for the process to exit before the kubelet kills it.
const EXIT_MARGIN_SECONDS: i64 = 5;
/// The worker's scratch directory (the root file system is read-only).
pub const SCRATCH_DIR: &str = "/tmp";
/// The environment variable the worker reads its API keys from.
pub const API_KEY_ENV: &str = "WHALEFLUX_API_KEY";

/// Every container's security context: the restricted Pod Security Standard (no privilege
/// escalation, no capabilities, non-root, a read-only root file system).
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        ..SecurityContext::default()
    }
}

/// The pod's security context: non-root, the runtime's default seccomp profile, and volumes
/// (a downloaded model, a PVC) writable by the workers' group.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// The pause before the worker's SIGTERM (the kubelet's own sleep action: the worker image
/// has no shell).
pub fn pre_stop() -> Lifecycle {
    Lifecycle {
        pre_stop: Some(LifecycleHandler {
            sleep: Some(SleepAction {
                seconds: PRE_STOP_SECONDS,
            }),
            ..LifecycleHandler::default()
        }),
        ..Lifecycle::default()
    }
}

/// The pod's grace period: the pause, the drain, and time to exit.
pub fn grace_seconds(serving: &ServingSpec) -> i64 {
    PRE_STOP_SECONDS + i64::from(serving.drain_seconds.max(0)) + EXIT_MARGIN_SECONDS
}

/// The API keys from the deployment's Secret, when it names one.
pub fn api_key_env(serving: &ServingSpec) -> Option<EnvVar> {
    serving.api_key_secret.as_ref().map(|s| EnvVar {
        name: API_KEY_ENV.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: s.name.clone(),
                key: s.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    })
}

/// Who may reach one replica group's pods: the peer port only its own pods (activations and
/// all-reduce carry the model's state), the API port the clients the deployment names (this
/// namespace's pods when it names none) and whoever the admin lets scrape metrics. Egress is
/// left alone.
pub fn network_policy(
    meta: ObjectMeta,
    group_pods: &BTreeMap<String, String>,
    serving: &ServingSpec,
    metrics_from: &[NetworkPolicyPeer],
) -> NetworkPolicy {
    let port = |name: &str| NetworkPolicyPort {
        port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        end_port: None,
    };
    let group = LabelSelector {
        match_labels: Some(group_pods.clone()),
        match_expressions: None,
    };
    let clients = NetworkPolicyPeer {
        pod_selector: Some(serving.allowed_clients.clone().unwrap_or_default()),
        ..NetworkPolicyPeer::default()
    };
    let mut ingress = vec![
        NetworkPolicyIngressRule {
            ports: Some(vec![port("peer")]),
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(group.clone()),
                ..NetworkPolicyPeer::default()
            }]),
        },
        NetworkPolicyIngressRule {
            ports: Some(vec![port("http")]),
            from: Some(vec![clients]),
        },
    ];
    if !metrics_from.is_empty() {
        ingress.push(NetworkPolicyIngressRule {
            ports: Some(vec![port("http")]),
            from: Some(metrics_from.to_vec()),
        });
    }
    NetworkPolicy {
        metadata: meta,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(group),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }
}

/// The scratch volume and its mount.
pub fn scratch() -> (Volume, VolumeMount) {
    (
        Volume {
            name: "scratch".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        VolumeMount {
            name: "scratch".into(),
            mount_path: SCRATCH_DIR.into(),
            ..VolumeMount::default()
        },
    )
}

/// How the weights reach the worker: the volume, its mount and the file path inside the pod.
pub(super) struct ModelVolume {
    pub volume: Volume,
    pub mount: VolumeMount,
    pub path: String,
    pub init: Option<Container>,
}

pub(super) fn model_volume(deployment: &LlmDeployment, download_image: &str) -> ModelVolume {
    let source = &deployment.spec.model.weights.source;
    let mount = |path: &str| VolumeMount {
        name: "model".into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    if let Some(pvc) = &source.pvc {
        return ModelVolume {
            volume: Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: pvc.claim_name.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            },
            mount: mount(MODEL_DIR),
            path: format!("{MODEL_DIR}/{}", pvc.path.trim_start_matches('/')),
            init: None,
        };
    }
    if let Some(url) = &source.url {
        // The worker reads a local file; an init container downloads it into an emptyDir once
        // per pod start (curl retries; a failed download fails the init container, which the
        // kubelet retries with backoff).
        let file_name = url
            .rsplit('/')
            .next()
            .map(|s| s.split(['?', '#']).next().unwrap_or(s))
            .filter(|s| !s.is_empty())
            .unwrap_or("model.gguf");
        let path = format!("{MODEL_DIR}/{file_name}");
        return ModelVolume {
            volume: Volume {
                name: "model".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
            mount: mount(MODEL_DIR),
            init: Some(Container {
                name: "download-weights".into(),
                image: Some(download_image.into()),
                args: Some(vec![
                    "--fail".into(),
                    "--location".into(),
                    "--retry".into(),
                    "5".into(),
                    "--output".into(),
                    path.clone(),
                    url.clone(),
                ]),
                volume_mounts: Some(vec![VolumeMount {
                    name: "model".into(),
                    mount_path: MODEL_DIR.into(),
                    ..VolumeMount::default()
                }]),
                security_context: Some(container_security()),
                ..Container::default()
            }),
            path,
        };
    }
    // A file on the node: mount exactly that file at the same path, so the worker config's path
    // is the same inside and outside the pod.
    let path = source.path.clone().unwrap_or_default();
    ModelVolume {
        volume: Volume {
            name: "model".into(),
            host_path: Some(HostPathVolumeSource {
                path: path.clone(),
                type_: Some("File".into()),
            }),
            ..Volume::default()
        },
        mount: mount(&path),
        path,
        init: None,
    }
}
