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
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            worker_image: DEFAULT_IMAGE.into(),
            download_image: DOWNLOAD_IMAGE.into(),
            image_pull_secrets: Vec::new(),
            gpu_tolerations: Vec::new(),
        }
    }
}

/// Why a settings file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Not valid YAML for [`ClusterSettings`] (unknown keys included).
    #[error(
        "operator settings: {0} (keys: workerImage, downloadImage, imagePullSecrets, gpuTolerations; see the chart's values.yaml)"
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
