//! API errors shaped as kube-apiserver `Status` objects, because kubectl and kube-rs print and
//! branch on `reason`, `code` and `details` exactly.

use serde_json::{Value, json};

use crate::registry::ResourceInfo;

/// One failure returned to a client as a `kind: Status` body with its HTTP code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code (also `Status.code`).
    pub code: u16,
    /// `Status.reason`, e.g. `NotFound`, `Conflict`, `Invalid`.
    pub reason: &'static str,
    /// `Status.message`.
    pub message: String,
    /// `Status.details`, when the apiserver would send them.
    pub details: Option<Value>,
}

/// One field error inside an `Invalid` status.
#[derive(Debug, Clone)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    /// Dotted field path, e.g. `spec.replicas`.
    pub field: String,
    /// The message after the field path.
    pub message: String,
}

impl ApiError {
    /// A plain error with no details.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 404 for a path the server does not serve at all.
    pub fn not_found_path() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details(json!({}))
    }

    /// 404 NotFound for a named object, as `pods "x" not found`.
    pub fn not_found(info: &ResourceInfo, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", info.qualified()),
        )
        .with_details(details(info, name))
    }

    /// 409 AlreadyExists on create.
    pub fn already_exists(info: &ResourceInfo, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", info.qualified()),
        )
        .with_details(details(info, name))
    }

    /// 409 Conflict on a stale `resourceVersion` (optimistic concurrency).
    pub fn conflict(info: &ResourceInfo, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                info.qualified()
            ),
        )
        .with_details(details(info, name))
    }

    /// 409 Conflict for server-side apply, naming the fields and their managers.
    pub fn apply_conflict(info: &ResourceInfo, name: &str, conflicts: &[(String, String)]) -> Self {
        let mut lines = Vec::new();
        let mut causes = Vec::new();
        for (manager, field) in conflicts {
            lines.push(format!("- {manager}: {field}"));
            causes.push(json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with \"{manager}\""),
                "field": field,
            }));
        }
        let n = conflicts.len();
        let head = if n == 1 {
            "Apply failed with 1 conflict".to_string()
        } else {
            format!("Apply failed with {n} conflicts")
        };
        let message = format!("{head}: conflict with managers:\n{}", lines.join("\n"));
        let mut d = details(info, name);
        d["causes"] = Value::Array(causes);
        Self::new(409, "Conflict", message).with_details(d)
    }

    /// 422 Invalid with one cause per field error.
    pub fn invalid(info: &ResourceInfo, name: &str, causes: &[Cause]) -> Self {
        let list: Vec<String> = causes
            .iter()
            .map(|c| {
                if c.field.is_empty() {
                    c.message.clone()
                } else {
                    format!("{}: {}", c.field, c.message)
                }
            })
            .collect();
        let joined = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        let group_kind = if info.group.is_empty() {
            info.kind.clone()
        } else {
            format!("{}.{}", info.kind, info.group)
        };
        let message = format!("{group_kind} \"{name}\" is invalid: {joined}");
        let mut d = json!({"name": name, "kind": info.kind});
        if !info.group.is_empty() {
            d["group"] = json!(info.group);
        }
        d["causes"] = causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect();
        Self::new(422, "Invalid", message).with_details(d)
    }

    /// 410 Expired: a watch or continue token older than the retained history.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// 415 UnsupportedMediaType for an unknown patch type.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type})"
            ),
        )
    }

    /// 500 InternalError.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `Status` object for the body.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

fn details(info: &ResourceInfo, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": info.resource});
    if !info.group.is_empty() {
        d["group"] = json!(info.group);
    }
    d
}

/// A success `Status`, as returned by some deletes.
pub fn success_status(info: &ResourceInfo, name: &str, uid: &str) -> Value {
    let mut d = details(info, name);
    d["uid"] = json!(uid);
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d})
}
