//! Fault injection and the audit log, both driven from Rust tests: fail or delay chosen
//! requests, cut watches, expire resource versions; and read back every request made.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// One request as RBAC sees it (plus who made it and what it got).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditEvent {
    /// User from the bearer token or basic auth; `system:anonymous` without credentials.
    pub user: String,
    /// RBAC verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// API group (`""` for core).
    pub group: String,
    /// Plural resource; empty for non-resource URLs.
    pub resource: String,
    /// `status`, `scale` or empty.
    pub subresource: String,
    /// Namespace, empty when cluster-scoped or across namespaces.
    pub namespace: String,
    /// Object name, empty for collections.
    pub name: String,
    /// Request path (useful for non-resource URLs like `/version`).
    pub path: String,
    /// HTTP status code of the response (0 for watches still open when read).
    pub code: u16,
}

/// The audit log, in request order.
#[derive(Debug, Default)]
pub struct Audit {
    events: Mutex<Vec<AuditEvent>>,
}

impl Audit {
    pub(crate) fn record(&self, e: AuditEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    /// Every request so far.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resource requests only (no discovery, OpenAPI or /version).
    pub fn resource_events(&self) -> Vec<AuditEvent> {
        self.events()
            .into_iter()
            .filter(|e| !e.resource.is_empty())
            .collect()
    }

    /// The RBAC permissions `user`'s requests needed, as (API group, resource or
    /// `resource/subresource`, verb) — compare with the rules a Role or ClusterRole grants.
    pub fn permissions_used(
        &self,
        user: &str,
    ) -> std::collections::BTreeSet<(String, String, String)> {
        self.resource_events()
            .into_iter()
            .filter(|e| e.user == user)
            .map(|e| {
                let resource = if e.subresource.is_empty() {
                    e.resource
                } else {
                    format!("{}/{}", e.resource, e.subresource)
                };
                (e.group, resource, e.verb)
            })
            .collect()
    }

    /// Forget everything recorded so far.
    pub fn clear(&self) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// Which requests a fault applies to; `None` fields match anything.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    /// RBAC verb.
    pub verb: Option<String>,
    /// Plural resource.
    pub resource: Option<String>,
    /// Subresource (`status`, `scale`).
    pub subresource: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// Object name.
    pub name: Option<String>,
}

impl RequestMatch {
    /// Match requests with this verb on this resource.
    pub fn verb_resource(verb: &str, resource: &str) -> Self {
        Self {
            verb: Some(verb.into()),
            resource: Some(resource.into()),
            ..Self::default()
        }
    }

    fn matches(&self, e: &AuditEvent) -> bool {
        let ok = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        !e.resource.is_empty()
            && ok(&self.verb, &e.verb)
            && ok(&self.resource, &e.resource)
            && ok(&self.subresource, &e.subresource)
            && ok(&self.namespace, &e.namespace)
            && ok(&self.name, &e.name)
    }
}

/// What a fault does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this HTTP code and its usual `Status` (409 Conflict, 429 TooManyRequests,
    /// 500 InternalError, ...), without touching the store.
    Fail(u16),
    /// Hold the request this long before serving it.
    Delay(Duration),
}

#[derive(Debug, Clone)]
struct Rule {
    matcher: RequestMatch,
    action: FaultAction,
    remaining: Option<u32>,
}

/// Handle for injecting faults into a running server.
#[derive(Debug)]
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
    close: watch::Sender<u64>,
    store: Arc<Store>,
}

impl Faults {
    pub(crate) fn new(store: Arc<Store>) -> Self {
        Self {
            rules: Mutex::new(Vec::new()),
            close: watch::channel(0).0,
            store,
        }
    }

    /// Fail the next `times` matching requests (`None` = every one until cleared) with `code`.
    pub fn fail(&self, matcher: RequestMatch, code: u16, times: Option<u32>) {
        self.push(Rule {
            matcher,
            action: FaultAction::Fail(code),
            remaining: times,
        });
    }

    /// Delay the next `times` matching requests by `delay`.
    pub fn delay(&self, matcher: RequestMatch, delay: Duration, times: Option<u32>) {
        self.push(Rule {
            matcher,
            action: FaultAction::Delay(delay),
            remaining: times,
        });
    }

    fn push(&self, rule: Rule) {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rule);
    }

    /// Remove every rule.
    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// End every open watch stream now (clients see the connection end, as after an
    /// apiserver restart or a load balancer timeout).
    pub fn close_watches(&self) {
        self.close.send_modify(|n| *n += 1);
    }

    /// Compact the history and close watches: clients resuming from any version they hold get
    /// `410 Gone` and must relist.
    pub fn expire_resource_versions(&self) {
        self.store.compact();
        self.close_watches();
    }

    pub(crate) fn closer(&self) -> watch::Receiver<u64> {
        self.close.subscribe()
    }

    /// The actions for this request, consuming counted rules.
    pub(crate) fn take(&self, e: &AuditEvent) -> Vec<FaultAction> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for r in rules.iter_mut() {
            if r.remaining != Some(0) && r.matcher.matches(e) {
                if let Some(n) = r.remaining.as_mut() {
                    *n -= 1;
                }
                out.push(r.action.clone());
            }
        }
        rules.retain(|r| r.remaining != Some(0));
        out
    }
}
