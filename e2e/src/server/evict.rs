//! `POST pods/{name}/eviction` (policy/v1 Eviction): a pod is deleted, gracefully, only if no
//! PodDisruptionBudget selecting it would be broken, as `kubectl drain` and the cluster
//! autoscaler rely on; otherwise 429 naming the budget.
//!
//! The budget is computed at the request (kube-apiserver reads the disruption controller's
//! `status.disruptionsAllowed`): expected = the replicas of the StatefulSets whose pods the PDB
//! selects plus any other selected pod (as the disruption controller counts its controllers'
//! scale, so a pod being replaced still counts), healthy = selected pods Ready and not being
//! deleted; `maxUnavailable` allows `max - (expected - healthy)` more disruptions,
//! `minAvailable` allows `healthy - min`. Integers and percentages (of expected, rounded up) are
//! accepted.

use std::sync::Arc;

use serde_json::{Value, json};

use super::delete::{Propagation, delete_one};
use super::{Answer, AppState, Req, Result, Target};
use crate::error::ApiError;
use crate::selectors::LabelSelector;

fn ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// `IntOrString` of a PDB against `expected` pods.
fn amount(v: &Value, expected: i64) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => match s.strip_suffix('%') {
            Some(p) => p.parse::<i64>().ok().map(|p| (p * expected + 99) / 100),
            None => s.parse().ok(),
        },
        _ => None,
    }
}

/// (disruptions allowed, healthy, desired healthy) for a PDB over the `pods` it selects, of
/// which `expected` should exist.
fn budget(pdb: &Value, pods: &[&Value], expected: i64) -> (i64, i64, i64) {
    let healthy = pods.iter().filter(|p| ready(p)).count() as i64;
    let spec = &pdb["spec"];
    let desired = if let Some(max) = amount(&spec["maxUnavailable"], expected) {
        expected - max
    } else {
        amount(&spec["minAvailable"], expected).unwrap_or(expected)
    };
    ((healthy - desired).max(0), healthy, desired.max(0))
}

pub(super) fn evict(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let name = t.name.clone().unwrap_or_default();
    let ns = t.namespace.clone().unwrap_or_default();
    let key = t.key(&name);
    let pod = st
        .store
        .get(&key)
        .ok_or_else(|| ApiError::not_found(&t.info, &name))?;
    let body: Value = if req.body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding Eviction: {e}")))?
    };
    let (pdbs, _) = st.store.list("policy", "poddisruptionbudgets", Some(&ns));
    let matching: Vec<&Arc<Value>> = pdbs
        .iter()
        .map(|(_, p)| p)
        .filter(|p| {
            let sel = &p["spec"]["selector"];
            !sel.is_null() && LabelSelector::from_object(sel).matches(&pod)
        })
        .collect();
    if matching.len() > 1 {
        return Err(ApiError::new(
            500,
            "InternalError",
            "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
        ));
    }
    // A pod that is not Ready takes nothing from the budget.
    if let Some(pdb) = matching.first()
        && ready(&pod)
    {
        let sel = LabelSelector::from_object(&pdb["spec"]["selector"]);
        let (pods, _) = st.store.list("", "pods", Some(&ns));
        let selected: Vec<&Value> = pods
            .iter()
            .map(|(_, p)| p.as_ref())
            .filter(|p| sel.matches(p))
            .collect();
        // Expected: the scale of the StatefulSets whose pods the PDB selects, plus selected
        // pods that no such StatefulSet controls.
        let (sets, _) = st.store.list("apps", "statefulsets", Some(&ns));
        let controllers: Vec<(&str, i64)> = sets
            .iter()
            .map(|(_, s)| s)
            .filter(|s| sel.matches(&json!({"metadata": s["spec"]["template"]["metadata"]})))
            .map(|s| {
                (
                    s["metadata"]["uid"].as_str().unwrap_or_default(),
                    s["spec"]["replicas"].as_i64().unwrap_or(1),
                )
            })
            .collect();
        let loose = selected
            .iter()
            .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
            .filter(|p| {
                !crate::store::owner_uids(p).any(|u| controllers.iter().any(|(c, _)| *c == u))
            })
            .count() as i64;
        let expected = controllers.iter().map(|(_, r)| r).sum::<i64>() + loose;
        let (allowed, healthy, desired) = budget(pdb, &selected, expected);
        if allowed < 1 {
            let pdb_name = pdb["metadata"]["name"].as_str().unwrap_or_default();
            let mut e = ApiError::new(
                429,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.",
            );
            e.details = Some(json!({"causes": [{"reason": "DisruptionBudget",
                "message": format!("The disruption budget {pdb_name} needs {desired} healthy pods and has {healthy} currently")}]}));
            return Err(e);
        }
    }
    let options = body["deleteOptions"].clone();
    let options = if options.is_null() {
        json!({})
    } else {
        options
    };
    let pods_info = t.info.clone();
    delete_one(
        st,
        &pods_info,
        &key,
        Propagation::Background,
        &options,
        false,
    )?;
    Ok((
        201,
        Arc::new(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        ),
        vec![],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ready: bool, deleting: bool) -> Value {
        let mut p = json!({"metadata": {"labels": {"app": "x"}}, "status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}});
        if deleting {
            p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        p
    }

    #[test]
    fn budgets_count_healthy_pods_against_the_limit() {
        let two = [pod(true, false), pod(true, false)];
        let refs: Vec<&Value> = two.iter().collect();
        let max1 = json!({"spec": {"maxUnavailable": 1}});
        assert_eq!(budget(&max1, &refs, 2), (1, 2, 1));
        let one_down = [pod(true, false), pod(true, true)];
        let refs: Vec<&Value> = one_down.iter().collect();
        assert_eq!(
            budget(&max1, &refs, 2),
            (0, 1, 1),
            "a pod going counts as disrupted"
        );
        let refs: Vec<&Value> = two[..1].iter().collect();
        assert_eq!(
            budget(&max1, &refs, 2),
            (0, 1, 1),
            "a pod not replaced yet counts too"
        );
        let min_pct = json!({"spec": {"minAvailable": "50%"}});
        let four = [
            pod(true, false),
            pod(true, false),
            pod(false, false),
            pod(true, false),
        ];
        let refs: Vec<&Value> = four.iter().collect();
        assert_eq!(budget(&min_pct, &refs, 4), (1, 3, 2));
    }
}
