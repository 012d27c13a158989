//! Pure builders: a Plan and an LlmDeployment in, Kubernetes objects and worker configuration out.

pub mod children;
pub mod pod;
pub mod settings;
pub mod worker_config;
