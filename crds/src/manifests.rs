//! The generated CustomResourceDefinitions, rendered once so `whaleflux crd`, the committed
//! `crds/manifests/*.yaml` and the chart all carry the same bytes.

use kube::CustomResourceExt;

use crate::{GpuPool, LlmDeployment};

/// One generated CRD: the file it is committed as under `crds/manifests/` and its YAML.
pub struct CrdManifest {
    /// File name under `crds/manifests/`.
    pub file: &'static str,
    /// The CRD as YAML.
    pub yaml: String,
}

/// Error rendering a CRD; only a bug in the types can cause it.
#[derive(Debug, thiserror::Error)]
#[error("rendering the {kind} CRD as YAML: {source}")]
pub struct RenderError {
    kind: &'static str,
    #[source]
    source: serde_yaml::Error,
}

/// Both CRDs, LlmDeployment first.
pub fn crds() -> Result<Vec<CrdManifest>, RenderError> {
    Ok(vec![
        CrdManifest {
            file: "llmdeployments.whaleflux.io.yaml",
            yaml: serde_yaml::to_string(&LlmDeployment::crd()).map_err(|source| RenderError {
                kind: "LlmDeployment",
                source,
            })?,
        },
        CrdManifest {
            file: "gpupools.whaleflux.io.yaml",
            yaml: serde_yaml::to_string(&GpuPool::crd()).map_err(|source| RenderError {
                kind: "GpuPool",
                source,
            })?,
        },
    ])
}

/// Both CRDs as one multi-document YAML stream, as `whaleflux crd` prints it.
pub fn crds_yaml() -> Result<String, RenderError> {
    Ok(crds()?
        .into_iter()
        .map(|m| m.yaml)
        .collect::<Vec<_>>()
        .join("---\n"))
}
