//! The StatefulSet controller.

use super::*;

/// The StatefulSet controller: pods `<name>-<ordinal>` from the template (all at once, as
/// `podManagementPolicy: Parallel`), pods of an old template replaced (one by one, but all
/// at once here; left alone under `updateStrategy: OnDelete`), status counted.
pub(super) fn reconcile_statefulsets(st: &AppState) {
    let (sets, _) = st.store.list("apps", "statefulsets", None);
    for (k, sts) in sets {
        if !sts["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        let name = k.name.clone();
        let replicas = sts["spec"]["replicas"].as_u64().unwrap_or(1);
        let template = &sts["spec"]["template"];
        let revision = format!("{name}-{}", template_hash(template));
        let uid = sts["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let owned = owned_pods(st, &k.namespace, &uid);
        for ordinal in 0..replicas {
            let pod_name = format!("{name}-{ordinal}");
            let existing = owned
                .iter()
                .find(|p| p["metadata"]["name"] == json!(pod_name));
            if let Some(p) = existing {
                let stale = p["metadata"]["labels"]["controller-revision-hash"] != json!(revision);
                // `OnDelete`: an old pod stays until someone deletes it (then comes back new).
                let on_delete = sts["spec"]["updateStrategy"]["type"] == json!("OnDelete");
                if stale && !on_delete && p["metadata"]["deletionTimestamp"].is_null() {
                    delete_pod(st, &k.namespace, &pod_name);
                }
                continue;
            }
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"].clone(), "spec": template["spec"].clone()});
            let meta = &mut pod["metadata"];
            meta["name"] = json!(pod_name);
            meta["namespace"] = json!(k.namespace);
            meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
            meta["creationTimestamp"] = json!(now());
            meta["labels"]["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
            meta["labels"]["apps.kubernetes.io/pod-index"] = json!(ordinal.to_string());
            meta["labels"]["controller-revision-hash"] = json!(revision);
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
            pod["spec"]["hostname"] = json!(pod_name);
            if let Some(svc) = sts["spec"]["serviceName"].as_str() {
                pod["spec"]["subdomain"] = json!(svc);
            }
            if pod["spec"]["restartPolicy"].is_null() {
                pod["spec"]["restartPolicy"] = json!("Always");
            }
            pod["status"] = json!({"phase": "Pending"});
            let _ = st.store.write(
                &key("pods", &k.namespace, &pod_name),
                |cur, _| -> Result<Write, ApiError> {
                    Ok(if cur.is_some() {
                        Write::Keep
                    } else {
                        Write::Put(pod)
                    })
                },
            );
        }
        for p in &owned {
            let ordinal = p["metadata"]["labels"]["apps.kubernetes.io/pod-index"]
                .as_str()
                .and_then(|s| s.parse::<u64>().ok());
            if ordinal.is_some_and(|o| o >= replicas)
                && p["metadata"]["deletionTimestamp"].is_null()
            {
                let n = p["metadata"]["name"].as_str().unwrap_or_default();
                delete_pod(st, &k.namespace, n);
            }
        }
        let live: Vec<&Arc<Value>> = owned
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .collect();
        let ready = live.iter().filter(|p| condition_true(p, "Ready")).count();
        let current = live
            .iter()
            .filter(|p| p["metadata"]["labels"]["controller-revision-hash"] == json!(revision))
            .count();
        let generation = sts["metadata"]["generation"].clone();
        let selector = LabelSelector::from_object(&sts["spec"]["selector"]).to_string_form();
        modify(st, &k, |s| {
            s["status"] = json!({"observedGeneration": generation, "replicas": live.len(), "readyReplicas": ready, "availableReplicas": ready,
                "currentReplicas": current, "updatedReplicas": current, "currentRevision": revision, "updateRevision": revision,
                "collisionCount": 0, "selector": selector});
        });
    }
}
