//! The Deployment controller of the process kubelet: what a chart's operator Deployment needs
//! to run and to roll. Pods are owned by the Deployment directly (no ReplicaSet objects), named
//! `<deployment>-<template hash>-<n>` and labelled `pod-template-hash` as the ReplicaSet
//! controller labels them. A changed template rolls like `RollingUpdate` with `maxSurge: 100%`:
//! the new pods start beside the old ones, and the old ones go once every new pod is Ready (or at
//! once with `strategy.type: Recreate`). Status carries what `kubectl rollout status` and Helm's
//! wait read.

use std::sync::Arc;

use serde_json::{Value, json};

use super::{
    condition_true, delete_pod, key, modify, now, owned_pods, set_condition, template_hash,
};
use crate::error::ApiError;
use crate::selectors::LabelSelector;
use crate::server::AppState;
use crate::store::Write;

/// One pass over every Deployment.
pub(crate) fn reconcile(st: &AppState) {
    let (deployments, _) = st.store.list("apps", "deployments", None);
    for (k, d) in deployments {
        if !d["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        reconcile_one(st, &k.namespace, &k.name, &d);
    }
}

fn reconcile_one(st: &AppState, ns: &str, name: &str, d: &Value) {
    let replicas = d["spec"]["replicas"].as_u64().unwrap_or(1);
    let template = &d["spec"]["template"];
    let hash = template_hash(template);
    let uid = d["metadata"]["uid"].as_str().unwrap_or_default();
    let recreate = d["spec"]["strategy"]["type"] == json!("Recreate");
    let owned = owned_pods(st, ns, uid);
    let live = |p: &&Arc<Value>| p["metadata"]["deletionTimestamp"].is_null();
    let is_new = |p: &&Arc<Value>| p["metadata"]["labels"]["pod-template-hash"] == json!(hash);
    let old: Vec<&Arc<Value>> = owned.iter().filter(live).filter(|p| !is_new(p)).collect();
    let new: Vec<&Arc<Value>> = owned.iter().filter(live).filter(is_new).collect();

    // Recreate waits for the old pods to go before starting new ones.
    let may_start = !recreate || old.is_empty();
    for n in 0..replicas {
        let pod_name = format!("{name}-{hash}-{n}");
        if !may_start || new.iter().any(|p| p["metadata"]["name"] == json!(pod_name)) {
            continue;
        }
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": template["metadata"].clone(), "spec": template["spec"].clone()});
        let meta = &mut pod["metadata"];
        meta["name"] = json!(pod_name);
        meta["namespace"] = json!(ns);
        meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
        meta["creationTimestamp"] = json!(now());
        meta["labels"]["pod-template-hash"] = json!(hash);
        meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "Deployment",
            "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
        if pod["spec"]["restartPolicy"].is_null() {
            pod["spec"]["restartPolicy"] = json!("Always");
        }
        pod["status"] = json!({"phase": "Pending"});
        let _ = st.store.write(
            &key("pods", ns, &pod_name),
            |cur, _| -> Result<Write, ApiError> {
                Ok(if cur.is_some() {
                    Write::Keep
                } else {
                    Write::Put(pod)
                })
            },
        );
    }
    // Surplus new pods (scaled down), then the old template's pods once the new ones serve.
    let new_ready = new.iter().filter(|p| condition_true(p, "Ready")).count() as u64;
    let mut remove: Vec<&Arc<Value>> = new
        .iter()
        .filter(|p| {
            let n = p["metadata"]["name"].as_str().unwrap_or_default();
            n.rsplit('-')
                .next()
                .and_then(|i| i.parse::<u64>().ok())
                .is_none_or(|i| i >= replicas)
        })
        .copied()
        .collect();
    if recreate || new_ready >= replicas {
        remove.extend(old.iter().copied());
    }
    // Deleted gracefully, as the ReplicaSet controller does: the kubelet stops them first.
    for p in remove {
        delete_pod(st, ns, p["metadata"]["name"].as_str().unwrap_or_default());
    }

    let all: Vec<&Arc<Value>> = owned.iter().filter(live).collect();
    let ready = all.iter().filter(|p| condition_true(p, "Ready")).count() as u64;
    let updated = new.len() as u64;
    let generation = d["metadata"]["generation"].clone();
    let selector = LabelSelector::from_object(&d["spec"]["selector"]).to_string_form();
    let available = new_ready >= replicas;
    let progressing = if updated >= replicas && old.is_empty() {
        ("NewReplicaSetAvailable", "the rollout is complete")
    } else {
        ("ReplicaSetUpdated", "the rollout is in progress")
    };
    modify(st, &key("deployments", ns, name), |obj| {
        let conditions = obj["status"]["conditions"].take();
        obj["status"] = json!({
            "observedGeneration": generation,
            "replicas": all.len(),
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": (all.len() as u64).saturating_sub(ready),
            "selector": selector,
            "conditions": conditions,
        });
        set_condition(
            obj,
            "Available",
            available,
            if available {
                "MinimumReplicasAvailable"
            } else {
                "MinimumReplicasUnavailable"
            },
            "",
        );
        set_condition(obj, "Progressing", true, progressing.0, progressing.1);
    });
}
