//! Cluster-wide settings a platform admin owns (the Helm chart's values reach the operator as a
//! YAML file, `whaleflux operator --config`): the default worker image, the image of the
//! weights-download init container, the pull secrets and the tolerations of tainted GPU nodes
//! every worker pod gets. Pure data: the builders read it, the binary loads it once at start.

use k8s_openapi::api::core::v1::Toleration;
use serde::Deserialize;

use super::children::{DEFAULT_IMAGE, DOWNLOAD_IMAGE};

/// What an admin sets once for every LlmDeployment; each field is optional in the file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// Worker image for deployments without `spec.image`.
    pub worker_image: String,
    /// Image of the init container that downloads URL-sourced weights (`spec.model.weights.
    /// source.url`): any image whose entrypoint is curl; `repository@sha256:...` pins it.
    pub download_image: String,
    /// Secrets for pulling the worker image, added to every worker pod.
    pub image_pull_secrets: Vec<String>,
    /// Tolerations added to every worker pod before the deployment's own (GPU nodes are often
    /// tainted `nvidia.com/gpu:NoSchedule`).
    pub gpu_tolerations: Vec<Toleration>,
    /// Directories on the nodes whose files `spec.model.weights.source.path` may name (a
    /// hostPath volume reads the node's file system, so only where an admin says). Empty: no
    /// hostPath weights at all.
    pub allowed_host_paths: Vec<String>,
    /// Who may reach every worker's HTTP port besides the deployment's clients, for scraping
    /// `/metrics` (NetworkPolicyPeer objects, e.g. the monitoring namespace). Empty: no one.
    pub worker_metrics_from: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,
    /// Image repositories `spec.image` may name (`registry.example/team/worker` allows that
    /// repository at any tag or digest; a trailing `/` allows everything under it). Empty: any.
    pub allowed_images: Vec<String>,
}

/// The directory the defaults let hostPath weights come from (the README's examples use it).
pub const DEFAULT_HOST_PATH: &str = "/models";

/// Why an LlmDeployment may not run under these settings; the message names the fix.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    /// A hostPath outside the allowed directories.
    #[error(
        "spec.model.weights.source.path {path} is not under a directory the cluster admin allows for weights on nodes ({allowed}); use a PVC or a URL, or ask for the directory to be added to the operator's allowedHostPaths"
    )]
    HostPath {
        /// The path asked for.
        path: String,
        /// The allowed directories, for the message.
        allowed: String,
    },
    /// An image from a repository not on the list.
    #[error(
        "spec.image {image} is not from a repository the cluster admin allows ({allowed}); remove spec.image to use the default worker image, or ask for the repository to be added to the operator's allowedImages"
    )]
    Image {
        /// The image asked for.
        image: String,
        /// The allowed repositories, for the message.
        allowed: String,
    },
}

/// Whether `path` lies under `dir`, comparing whole components (`/models` covers
/// `/models/a.gguf`, not `/models-x/a.gguf`); a path with `..` or `.` components lies nowhere.
fn under(path: &str, dir: &str) -> bool {
    let clean = |p: &str| -> Option<Vec<String>> {
        p.split('/')
            .filter(|c| !c.is_empty())
            .map(|c| (c != ".." && c != ".").then(|| c.to_string()))
            .collect()
    };
    match (clean(path), clean(dir)) {
        (Some(p), Some(d)) => path.starts_with('/') && p.len() > d.len() && p.starts_with(&d),
        _ => false,
    }
}

/// The repository part of an image reference (no tag, no digest).
fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    // A tag follows the last ':' after the last '/' (a registry port comes before a '/').
    match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

impl ClusterSettings {
    /// Whether `spec` may run here: its hostPath weights under an allowed directory, its image
    /// from an allowed repository.
    pub fn admits(&self, spec: &whaleflux_crds::LlmDeploymentSpec) -> Result<(), PolicyError> {
        let list = |l: &[String]| {
            if l.is_empty() {
                "none".to_string()
            } else {
                l.join(", ")
            }
        };
        if let Some(path) = &spec.model.weights.source.path
            && !self.allowed_host_paths.iter().any(|d| under(path, d))
        {
            return Err(PolicyError::HostPath {
                path: path.clone(),
                allowed: list(&self.allowed_host_paths),
            });
        }
        if let Some(image) = &spec.image
            && !self.allowed_images.is_empty()
            && !self
                .allowed_images
                .iter()
                .any(|a| match a.strip_suffix('/') {
                    Some(prefix) => repository(image).starts_with(&format!("{prefix}/")),
                    None => repository(image) == a,
                })
        {
            return Err(PolicyError::Image {
                image: image.clone(),
                allowed: list(&self.allowed_images),
            });
        }
        Ok(())
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            worker_image: DEFAULT_IMAGE.into(),
            download_image: DOWNLOAD_IMAGE.into(),
            image_pull_secrets: Vec::new(),
            gpu_tolerations: Vec::new(),
            allowed_host_paths: vec![DEFAULT_HOST_PATH.into()],
            allowed_images: Vec::new(),
            worker_metrics_from: Vec::new(),
        }
    }
}

/// Why a settings file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Not valid YAML for [`ClusterSettings`] (unknown keys included).
    #[error(
        "operator settings: {0} (keys: workerImage, downloadImage, imagePullSecrets, gpuTolerations, allowedHostPaths, allowedImages, workerMetricsFrom; see the chart's values.yaml)"
    )]
    Parse(#[from] serde_yaml::Error),
    /// An empty `workerImage` would give pods no image.
    #[error("operator settings: workerImage is empty; remove it to use {DEFAULT_IMAGE}")]
    EmptyImage,
    /// An empty `downloadImage` would give the download init container no image.
    #[error("operator settings: downloadImage is empty; remove it to use {DOWNLOAD_IMAGE}")]
    EmptyDownloadImage,
    /// An empty pull-secret name is not a reference.
    #[error("operator settings: imagePullSecrets[{0}] is empty; name a Secret")]
    EmptyPullSecret(usize),
}

impl ClusterSettings {
    /// Reads the settings from YAML text; an empty document is the defaults.
    pub fn from_yaml(text: &str) -> Result<Self, SettingsError> {
        let settings: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str::<Option<Self>>(text)?.unwrap_or_default()
        };
        if settings.worker_image.trim().is_empty() {
            return Err(SettingsError::EmptyImage);
        }
        if settings.download_image.trim().is_empty() {
            return Err(SettingsError::EmptyDownloadImage);
        }
        if let Some(i) = settings
            .image_pull_secrets
            .iter()
            .position(|s| s.trim().is_empty())
        {
            return Err(SettingsError::EmptyPullSecret(i));
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(
            ClusterSettings::from_yaml("").unwrap(),
            ClusterSettings::default()
        );
        assert_eq!(
            ClusterSettings::from_yaml("# nothing\n").unwrap(),
            ClusterSettings::default()
        );
    }

    #[test]
    fn every_key_is_read() {
        let s = ClusterSettings::from_yaml(
            "workerImage: registry.example/wf/worker@sha256:abc\ndownloadImage: mirror.example/curl@sha256:def\nimagePullSecrets: [regcred]\ngpuTolerations:\n  - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}\n",
        )
        .unwrap();
        assert_eq!(s.worker_image, "registry.example/wf/worker@sha256:abc");
        assert_eq!(s.download_image, "mirror.example/curl@sha256:def");
        assert_eq!(s.image_pull_secrets, vec!["regcred".to_string()]);
        assert_eq!(s.gpu_tolerations.len(), 1);
        assert_eq!(s.gpu_tolerations[0].key.as_deref(), Some("nvidia.com/gpu"));
        assert_eq!(s.gpu_tolerations[0].effect.as_deref(), Some("NoSchedule"));
    }

    #[test]
    fn host_paths_and_images_only_where_the_admin_allows() {
        use whaleflux_crds::LlmDeploymentSpec;
        let spec = |path: Option<&str>, image: Option<&str>| -> LlmDeploymentSpec {
            let mut y = String::from(
                "model: {preset: smollm2-135m, weights: {source: {url: 'https://e.x/m.gguf'}}}\ngpuPool: p\n",
            );
            if let Some(p) = path {
                y = y.replace("url: 'https://e.x/m.gguf'", &format!("path: '{p}'"));
            }
            if let Some(i) = image {
                y.push_str(&format!("image: '{i}'\n"));
            }
            serde_yaml::from_str(&y).unwrap()
        };
        let s = ClusterSettings::from_yaml(
            "allowedHostPaths: [/models, /srv/llm/]\nallowedImages: [registry.example/wf/worker, mirror.example/]\n",
        )
        .unwrap();
        for ok in ["/models/a.gguf", "/models/x/b.gguf", "/srv/llm/c.gguf"] {
            assert_eq!(s.admits(&spec(Some(ok), None)), Ok(()), "{ok}");
        }
        for bad in [
            "/models",
            "/models-x/a.gguf",
            "/models/../etc/shadow",
            "/etc/a.gguf",
            "models/a.gguf",
        ] {
            let e = s.admits(&spec(Some(bad), None)).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("/models, /srv/llm/"), "{e}");
        }
        for ok in [
            "registry.example/wf/worker:1.2",
            "registry.example/wf/worker@sha256:abc",
            "mirror.example/any/thing:3",
        ] {
            assert_eq!(s.admits(&spec(None, Some(ok))), Ok(()), "{ok}");
        }
        for bad in [
            "registry.example/wf/worker-evil:1",
            "evil.example/worker:1",
            "mirror.example.evil/x:1",
        ] {
            let e = s.admits(&spec(None, Some(bad))).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("allowedImages"), "{e}");
        }
        // The defaults: hostPaths under /models only, any image.
        let d = ClusterSettings::default();
        assert_eq!(
            d.admits(&spec(Some("/models/m.gguf"), Some("anything:1"))),
            Ok(())
        );
        assert!(d.admits(&spec(Some("/root/m.gguf"), None)).is_err());
        assert_eq!(repository("host:5000/a/b:tag"), "host:5000/a/b");
        assert_eq!(repository("host:5000/a/b"), "host:5000/a/b");
    }

    #[test]
    fn a_typo_names_the_key_and_the_known_ones() {
        let e = ClusterSettings::from_yaml("workerImag: x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("workerImag"), "{e}");
        assert!(e.contains("keys: workerImage"), "{e}");
    }

    #[test]
    fn empty_values_are_refused() {
        assert!(matches!(
            ClusterSettings::from_yaml("workerImage: ' '\n"),
            Err(SettingsError::EmptyImage)
        ));
        assert!(matches!(
            ClusterSettings::from_yaml("downloadImage: ''\n"),
            Err(SettingsError::EmptyDownloadImage)
        ));
        assert!(matches!(
            ClusterSettings::from_yaml("imagePullSecrets: [a, '']\n"),
            Err(SettingsError::EmptyPullSecret(1))
        ));
    }
}
