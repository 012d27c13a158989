//! Custom resource admission the way the apiserver orders it: prune (or reject, under
//! `fieldValidation=Strict`) unknown fields, apply schema defaults, validate the structural
//! schema, then evaluate the CEL rules (`x-kubernetes-validations`), transition rules included.

use jsonschema::error::ValidationErrorKind;
use kube::core::cel::{CompiledSchema, Validator, apply_defaults, compile_schema};
use serde_json::{Map, Value, json};

use crate::error::Cause;

/// Translate the OpenAPI v3 dialect of a CRD schema into JSON Schema: `nullable`,
/// `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`.
fn to_json_schema(schema: &Value, root: bool) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (k, v) in map {
        let v = match k.as_str() {
            "properties" => Value::Object(
                v.as_object()
                    .map(|props| {
                        props
                            .iter()
                            .map(|(pk, pv)| (pk.clone(), to_json_schema(pv, false)))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            "items" | "additionalProperties" if v.is_object() => to_json_schema(v, false),
            "allOf" | "anyOf" | "oneOf" => Value::Array(
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| to_json_schema(s, false))
                    .collect(),
            ),
            "not" => to_json_schema(v, false),
            "default" | "example" | "x-kubernetes-validations" | "description" => continue,
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    if out.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        out.remove("type");
        out.insert("type".into(), json!(["integer", "string"]));
    }
    if out.get("nullable") == Some(&Value::Bool(true))
        && let Some(Value::String(t)) = out.get("type").cloned()
    {
        out.insert("type".into(), json!([t, "null"]));
    }
    if root {
        let props = out.entry("properties").or_insert_with(|| json!({}));
        if let Some(p) = props.as_object_mut() {
            p.insert("apiVersion".into(), json!({"type": "string"}));
            p.insert("kind".into(), json!({"type": "string"}));
            p.insert("metadata".into(), json!({"type": "object"}));
        }
    }
    Value::Object(out)
}

/// Remove fields the schema does not declare; returns their dotted paths.
pub fn prune(obj: &mut Value, schema: &Value) -> Vec<String> {
    let mut unknown = Vec::new();
    prune_at(obj, schema, "", true, &mut unknown);
    unknown
}

fn prune_at(obj: &mut Value, schema: &Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        && schema.get("properties").is_none()
    {
        return;
    }
    match obj {
        Value::Object(m) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                let preserve =
                    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
                let keys: Vec<String> = m.keys().cloned().collect();
                for k in keys {
                    if root && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                        continue;
                    }
                    let child_path = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match props.get(&k) {
                        Some(s) => {
                            if let Some(v) = m.get_mut(&k) {
                                prune_at(v, s, &child_path, false, unknown);
                            }
                        }
                        None if preserve => {}
                        None => {
                            m.remove(&k);
                            unknown.push(child_path);
                        }
                    }
                }
            } else if let Some(ap) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (k, v) in m.iter_mut() {
                    prune_at(v, ap, &format!("{path}.{k}"), false, unknown);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    prune_at(v, s, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn value_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn lookup<'a>(obj: &'a Value, dotted: &str) -> &'a Value {
    let mut cur = obj;
    for seg in dotted.split('.').filter(|s| !s.is_empty()) {
        let (name, index) = match seg.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        cur = &cur[name];
        if let Some(i) = index {
            cur = &cur[i];
        }
    }
    cur
}

/// A CRD version's schema compiled once: the structural schema as JSON Schema and the CEL
/// rules, so admitting an object costs its validation, not a compilation.
pub struct Compiled {
    schema: Value,
    checker: jsonschema::Validator,
    cel: CompiledSchema,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").finish_non_exhaustive()
    }
}

impl Compiled {
    /// Compile `schema` (an `openAPIV3Schema`); the error says why it does not compile.
    pub fn new(schema: &Value) -> Result<Self, String> {
        let checker = jsonschema::validator_for(&to_json_schema(schema, true))
            .map_err(|e| format!("schema does not compile: {e}"))?;
        Ok(Self {
            schema: schema.clone(),
            checker,
            cel: compile_schema(schema),
        })
    }
}

thread_local! {
    /// The CEL function library, registered once per thread rather than per request.
    static CEL: Validator = Validator::new();
}

/// Outcome of admitting a custom resource.
#[derive(Debug)]
pub struct Admitted {
    /// The object after pruning and defaulting.
    pub object: Value,
    /// `unknown field "..."` warnings (for the `Warning` header) when not strict.
    pub warnings: Vec<String>,
}

/// Admit a custom resource: unknown fields (error when `strict`), defaults, schema, CEL.
pub fn admit(
    compiled: &Compiled,
    object: &Value,
    old: Option<&Value>,
    strict: bool,
) -> Result<Admitted, Vec<Cause>> {
    let schema = &compiled.schema;
    let mut obj = object.clone();
    let unknown = prune(&mut obj, schema);
    if strict && !unknown.is_empty() {
        return Err(unknown
            .into_iter()
            .map(|f| Cause {
                reason: "FieldValueInvalid",
                field: String::new(),
                message: format!("unknown field \"{f}\""),
            })
            .collect());
    }
    let warnings = unknown
        .into_iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    let mut defaulted = apply_defaults(schema, &obj);
    // Defaulting must not touch metadata; the apiserver defaults only the schema'd body.
    defaulted["metadata"] = obj["metadata"].clone();
    let mut causes: Vec<Cause> = compiled
        .checker
        .iter_errors(&defaulted)
        .map(|e| {
            let field = e
                .instance_path()
                .to_string()
                .trim_start_matches('/')
                .replace('/', ".");
            let value = lookup(&defaulted, &field);
            let shown = if value.is_object() || value.is_array() {
                format!("\"{}\"", value_type(value))
            } else {
                value.to_string()
            };
            // Worded as kube-apiserver words its OpenAPI validation errors.
            match e.kind() {
                ValidationErrorKind::Required { property } => Cause {
                    reason: "FieldValueRequired",
                    field: join(&field, property.as_str().unwrap_or_default()),
                    message: "Required value".into(),
                },
                ValidationErrorKind::Enum { options } => {
                    let supported: Vec<String> = options
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(Value::to_string)
                        .collect();
                    Cause {
                        reason: "FieldValueNotSupported",
                        field,
                        message: format!(
                            "Unsupported value: {shown}: supported values: {}",
                            supported.join(", ")
                        ),
                    }
                }
                ValidationErrorKind::Type { kind } => {
                    let want = format!("{kind:?}")
                        .to_ascii_lowercase()
                        .replace("single(", "")
                        .replace(')', "");
                    let message = format!(
                        "Invalid value: \"{}\": {field} in body must be of type {want}: {shown}",
                        value_type(value)
                    );
                    Cause {
                        reason: "FieldValueTypeInvalid",
                        field,
                        message,
                    }
                }
                _ => Cause {
                    reason: "FieldValueInvalid",
                    field,
                    message: format!("Invalid value: {shown}: {e}"),
                },
            }
        })
        .collect();
    if causes.is_empty()
        && let Err(errs) = CEL.with(|cel| cel.validate_compiled(&compiled.cel, &defaulted, old))
    {
        causes.extend(errs.iter().map(|e| {
            let v = lookup(&defaulted, &e.field_path);
            Cause {
                reason: "FieldValueInvalid",
                field: e.field_path.clone(),
                message: format!("Invalid value: \"{}\": {}", value_type(v), e.message),
            }
        }));
    }
    if causes.is_empty() {
        Ok(Admitted {
            object: defaulted,
            warnings,
        })
    } else {
        Err(causes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "replicas": {"type": "integer", "default": 1, "x-kubernetes-validations": [{"rule": "self >= 0", "message": "must be 0 or more"}]},
            "image": {"type": "string", "nullable": true}}}}})
    }

    #[test]
    fn defaults_prunes_and_validates() {
        let obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"}, "spec": {"image": null, "bogus": 1}});
        let schema = Compiled::new(&schema()).expect("compiles");
        let ok = admit(&schema, &obj, None, false).expect("admitted");
        assert_eq!(ok.object["spec"]["replicas"], 1);
        assert_eq!(
            ok.warnings,
            vec!["unknown field \"spec.bogus\"".to_string()]
        );
        assert!(
            admit(&schema, &obj, None, true).is_err(),
            "strict rejects unknown fields"
        );
        let bad = json!({"metadata": {"name": "a"}, "spec": {"replicas": -1}});
        let causes = admit(&schema, &bad, None, false).expect_err("CEL rejects");
        assert!(
            causes[0].message.contains("must be 0 or more"),
            "{:?}",
            causes
        );
        let wrong_type = json!({"metadata": {"name": "a"}, "spec": {"replicas": "x"}});
        let causes = admit(&schema, &wrong_type, None, false).expect_err("schema rejects");
        assert_eq!(causes[0].field, "spec.replicas");
        assert_eq!(
            causes[0].message,
            "Invalid value: \"string\": spec.replicas in body must be of type integer: \"x\""
        );
    }
}
