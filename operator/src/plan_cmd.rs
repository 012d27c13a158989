//! `whaleflux plan`: reading the manifests and rendering a plan for people (table) or tools
//! (JSON/YAML). Pure: the binary reads the files and prints.

use std::fmt::Write;

use serde::{Deserialize, Serialize};
use whaleflux_crds::{GpuPool, LlmDeployment, Plan, RejectedOption};

use crate::planner::memory::gib;

/// A manifest that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML, or not the expected shape.
    #[error("not a valid {kind} manifest")]
    Yaml {
        /// Expected kind.
        kind: &'static str,
        /// What the parser said.
        #[source]
        source: serde_yaml::Error,
    },
    /// A different kind than expected.
    #[error("expected kind {expected}, found {found:?}")]
    WrongKind {
        /// Expected kind.
        expected: &'static str,
        /// Kind in the file.
        found: String,
    },
    /// A `kind: List` that does not hold exactly one item.
    #[error("a List must hold exactly one {kind}, this one holds {count}")]
    ListSize {
        /// Expected kind.
        kind: &'static str,
        /// Items found.
        count: usize,
    },
}

#[derive(Deserialize)]
struct KindOnly {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    items: Vec<serde_yaml::Value>,
}

/// Reads one object of `expected` kind from YAML; a `kind: List` of exactly one such object
/// (as `kubectl get -o yaml` prints for a list query) is accepted too.
fn read_one<T: serde::de::DeserializeOwned>(
    text: &str,
    expected: &'static str,
) -> Result<T, ManifestError> {
    let yaml = |source| ManifestError::Yaml {
        kind: expected,
        source,
    };
    let head: KindOnly = serde_yaml::from_str(text).map_err(yaml)?;
    let value = match head.kind.as_str() {
        "List" => match head.items.as_slice() {
            [one] => one.clone(),
            items => {
                return Err(ManifestError::ListSize {
                    kind: expected,
                    count: items.len(),
                });
            }
        },
        k if k == expected => serde_yaml::from_str(text).map_err(yaml)?,
        other => {
            return Err(ManifestError::WrongKind {
                expected,
                found: other.to_string(),
            });
        }
    };
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    if kind != expected {
        return Err(ManifestError::WrongKind {
            expected,
            found: kind.to_string(),
        });
    }
    serde_yaml::from_value(value).map_err(yaml)
}

/// Parses an LlmDeployment manifest.
pub fn parse_deployment(text: &str) -> Result<LlmDeployment, ManifestError> {
    read_one(text, "LlmDeployment")
}

/// Parses a GpuPool manifest (with `status.nodes`).
pub fn parse_pool(text: &str) -> Result<GpuPool, ManifestError> {
    read_one(text, "GpuPool")
}

/// The `-o json` / `-o yaml` document: the plan without its rejected list as `chosen`, and the
/// rejected options beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanDocument {
    /// The chosen plan (its `rejected` list is empty here).
    pub chosen: Plan,
    /// Options the planner did not choose, most relevant first.
    pub rejected: Vec<RejectedOption>,
}

impl PlanDocument {
    /// Splits a plan into the chosen part and its rejected options.
    pub fn new(plan: &Plan) -> Self {
        let mut chosen = plan.clone();
        let rejected = std::mem::take(&mut chosen.rejected);
        Self { chosen, rejected }
    }
}

/// The plan as a table for people.
pub fn render_table(plan: &Plan) -> String {
    let mut s = String::new();
    let m = &plan.memory_per_gpu_bytes;
    let _ = writeln!(
        s,
        "Plan for {} ({}) on {} — objective {:?}",
        plan.model,
        plan.dtype.as_str(),
        plan.gpu_model,
        plan.objective
    );
    let _ = writeln!(
        s,
        "  tensor parallel {} x pipeline parallel {} = {} GPU(s) per replica group, {} replica group(s), {} GPU(s) in all{}",
        plan.tensor_parallel,
        plan.pipeline_parallel,
        plan.gpus_per_replica,
        plan.replicas,
        i64::from(plan.gpus_per_replica) * i64::from(plan.replicas),
        if plan.crosses_nodes {
            " — tensor parallel CROSSES NODES"
        } else {
            ""
        }
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:<6} {:<10} {:<5} {:<28} NODE (group 0)",
        "STAGE", "LAYERS", "GPUS", "HOLDS"
    );
    for st in &plan.stages {
        let mut holds = vec![format!("{} layers", st.layer_count())];
        if st.embedding {
            holds.push("embedding".into());
        }
        if st.head {
            holds.push("head".into());
        }
        let _ = writeln!(
            s,
            "  {:<6} {:<10} {:<5} {:<28} {}",
            st.index,
            format!("[{}, {})", st.layers[0], st.layers[1]),
            st.gpus,
            holds.join(", "),
            st.node
        );
    }
    if plan.groups.len() > 1 {
        let _ = writeln!(s);
        let _ = writeln!(s, "  {:<6} NODES BY STAGE", "GROUP");
        for g in &plan.groups {
            let _ = writeln!(s, "  {:<6} {}", g.index, g.nodes.join(", "));
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "  Memory per GPU (most loaded GPU)");
    for (name, v) in [
        ("weights", m.weights),
        ("KV cache", m.kv_cache),
        ("activations", m.activations),
        ("overhead", m.overhead),
    ] {
        let _ = writeln!(s, "    {:<12} {:>9.2} GiB", name, gib(v as f64));
    }
    let _ = writeln!(
        s,
        "    {:<12} {:>9.2} GiB of {:.2} GiB usable ({:.0}%)",
        "total",
        gib(m.total as f64),
        gib(m.usable as f64),
        if m.usable > 0 {
            m.total as f64 * 100.0 / m.usable as f64
        } else {
            0.0
        }
    );
    let _ = writeln!(s);
    let e = &plan.estimate;
    let _ = writeln!(
        s,
        "  Estimated (cost model, not measured) at {} concurrent sequences per group:",
        e.concurrency
    );
    let _ = writeln!(s, "    time per token      {:.2} ms", e.time_per_token_ms);
    let _ = writeln!(
        s,
        "    decode throughput   {:.0} tokens/s per replica group, {:.0} per GPU",
        e.decode_tokens_per_second, e.decode_tokens_per_second_per_gpu
    );
    if !plan.notes.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "  Notes");
        for n in &plan.notes {
            let _ = writeln!(s, "    - {n}");
        }
    }
    if !plan.rejected.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "  Rejected options (most relevant first)");
        let _ = writeln!(s, "    {:<4} {:<4} REASON", "TP", "PP");
        for r in plan.rejected.iter().take(TABLE_REJECTED) {
            let _ = writeln!(
                s,
                "    {:<4} {:<4} {}",
                r.tensor_parallel, r.pipeline_parallel, r.reason
            );
        }
        if plan.rejected.len() > TABLE_REJECTED {
            let _ = writeln!(
                s,
                "    ... {} more in -o json / -o yaml",
                plan.rejected.len() - TABLE_REJECTED
            );
        }
    }
    s
}

/// Rejected options the table shows; JSON and YAML carry the plan's whole list.
const TABLE_REJECTED: usize = 10;
