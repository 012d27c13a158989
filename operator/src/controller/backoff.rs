//! Per-object exponential backoff after failed reconciles (timeouts included).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Per-object exponential backoff after failed reconciles: 0.5 s doubling to 5 min, reset by
/// a successful reconcile.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// The key of one object of `controller`: `controller/namespace/name` (no namespace for
    /// cluster-scoped objects). The failure and the reset of an object use the same key.
    pub fn key(controller: &str, meta: &kube::api::ObjectMeta) -> String {
        format!("{controller}/{}", super::object_label(meta))
    }

    /// Records a failure of `key`; returns how long to wait before retrying.
    pub fn failure(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(key.to_string()).or_default();
        *n = n.saturating_add(1);
        let ms = 500u64.saturating_mul(1u64 << (*n - 1).min(20));
        Duration::from_millis(ms.min(300_000))
    }

    /// Forgets the failures of `key`.
    pub fn reset(&self, key: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0.5 s doubling to 5 min per object, reset by success, one object's failures not
    /// touching another's.
    #[test]
    fn backoff_doubles_from_half_a_second_to_five_minutes_per_object() {
        let b = Backoff::default();
        let waits: Vec<u128> = (0..12).map(|_| b.failure("a").as_millis()).collect();
        assert_eq!(
            waits,
            [
                500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000, 300000, 300000
            ]
        );
        for _ in 0..100 {
            assert_eq!(
                b.failure("a"),
                Duration::from_secs(300),
                "capped, never overflowing"
            );
        }
        assert_eq!(b.failure("b"), Duration::from_millis(500), "per object");
        b.reset("a");
        assert_eq!(
            b.failure("a"),
            Duration::from_millis(500),
            "reset by a success"
        );
    }

    #[test]
    fn backoff_keys_name_the_controller_and_the_object() {
        let meta = |ns: Option<&str>| kube::api::ObjectMeta {
            name: Some("x".into()),
            namespace: ns.map(String::from),
            ..Default::default()
        };
        assert_eq!(
            Backoff::key("llmdeployment", &meta(Some("ml"))),
            "llmdeployment/ml/x"
        );
        assert_eq!(Backoff::key("gpupool", &meta(None)), "gpupool/x");
    }
}
