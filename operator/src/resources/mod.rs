//! Pure builders: a Plan and an LlmDeployment in, Kubernetes objects and worker configuration out.

pub mod worker_config;
