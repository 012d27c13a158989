//! Events (`events.k8s.io/v1`) on the objects the operator reconciles.
//!
//! The controllers publish an event only when something changes (a plan chosen, a group
//! created or replaced, a plan that became impossible), never once per reconcile, so there is
//! nothing to aggregate. kube-runtime's `Recorder` keeps every event it published for six
//! minutes to count repeats into a series; at thousands of deployments that cache was the
//! operator's largest memory use, so events are created directly, one call each, and nothing is
//! kept.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

/// Who reports the events: the controller name and this replica (the pod's name).
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    controller: String,
    instance: String,
}

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Something happened as it should.
    Normal,
    /// Something the user should look at.
    Warning,
}

impl Publisher {
    /// Events reported by `controller` from replica `instance`.
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_string(),
            instance: instance.to_string(),
        }
    }

    /// The event a publish creates (pure, for tests).
    pub fn event(
        &self,
        regarding: &ObjectReference,
        severity: Severity,
        reason: &str,
        note: &str,
        now: Timestamp,
    ) -> Event {
        let name = regarding.name.clone().unwrap_or_default();
        Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}.")),
                namespace: regarding.namespace.clone(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some("Reconcile".into()),
            reason: Some(reason.into()),
            // events.k8s.io caps the note at 1 kB.
            note: Some(note.chars().take(1024).collect()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(match severity {
                Severity::Normal => "Normal".into(),
                Severity::Warning => "Warning".into(),
            }),
            ..Event::default()
        }
    }

    /// Creates the event in the regarded object's namespace.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        severity: Severity,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let ns = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let ev = self.event(regarding, severity, reason, note, Timestamp::now());
        Api::<Event>::namespaced(self.client.clone(), &ns)
            .create(&PostParams::default(), &ev)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_event_names_the_object_reporter_and_severity() {
        // A client that is never used: building the event needs no server.
        let config = kube::Config::new("http://127.0.0.1:1".parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        let p = Publisher::new(client, "whaleflux-operator", "pod-a");
        let regarding = ObjectReference {
            kind: Some("LlmDeployment".into()),
            namespace: Some("ml".into()),
            name: Some("llama".into()),
            ..ObjectReference::default()
        };
        let now: Timestamp = "2026-12-04T00:00:00Z".parse().expect("time");
        let long = "x".repeat(5000);
        let ev = p.event(&regarding, Severity::Warning, "PlanImpossible", &long, now);
        assert_eq!(ev.metadata.generate_name.as_deref(), Some("llama."));
        assert_eq!(ev.metadata.namespace.as_deref(), Some("ml"));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.reason.as_deref(), Some("PlanImpossible"));
        assert_eq!(
            ev.reporting_controller.as_deref(),
            Some("whaleflux-operator")
        );
        assert_eq!(ev.reporting_instance.as_deref(), Some("pod-a"));
        assert_eq!(
            ev.note.map(|n| n.len()),
            Some(1024),
            "notes are capped at 1 kB"
        );
        assert_eq!(ev.event_time, Some(MicroTime(now)));
        assert_eq!(ev.regarding, Some(regarding));
    }
}
