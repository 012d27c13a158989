//! The pool as the planner sees it: nodes with GPU model, free GPUs, NVLink domain and health,
//! and the links between them. Built from a GpuPool's status or from a `--gpus` string.

use k8s_openapi::jiff::Timestamp;
use whaleflux_crds::{GpuPool, InterNodeNetwork, IntraNodeLink, PoolNode};

use super::PlanError;
use super::catalog::{self, GpuSpec};

/// Most nodes a `--gpus` string may describe.
pub const MAX_SPEC_NODES: usize = 100_000;
/// Most GPUs per node a `--gpus` string may give (an NVL72 rack counts as one domain, not one node).
pub const MAX_SPEC_GPUS_PER_NODE: i32 = 1024;

/// Nodes and links the planner places stages on.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Every node, healthy or not.
    pub nodes: Vec<PoolNode>,
    /// GPU model for nodes whose status names none (the pool's `spec.gpu.model`).
    pub gpu_override: Option<String>,
    /// Link between GPUs of one node.
    pub intra_node: IntraNodeLink,
    /// Network between nodes.
    pub network: InterNodeNetwork,
    /// Per-node network bandwidth, Gbit/s.
    pub network_gbps: f64,
}

impl Pool {
    /// The pool described by a GpuPool object: its `status.nodes` and `spec.interconnect`.
    pub fn from_gpu_pool(pool: &GpuPool) -> Self {
        let ic = &pool.spec.interconnect;
        Self {
            nodes: pool
                .status
                .as_ref()
                .map(|s| s.nodes.clone())
                .unwrap_or_default(),
            gpu_override: pool.spec.gpu.as_ref().map(|g| g.model.clone()),
            intra_node: ic.intra_node,
            network: ic.inter_node,
            network_gbps: f64::from(ic.bandwidth_gbps.unwrap_or(ic.inter_node.default_gbps())),
        }
    }

    /// A pool from `NODESxGPUSxMODEL[,...]`, e.g. `2x8xH100` (two nodes of eight H100) or
    /// `1x8xH100,4x4xRTX4090`; `GPUSxMODEL` means one node. Nodes are named `node-0`, `node-1`,
    /// ...; all are Ready with every GPU free.
    pub fn from_gpus_spec(spec: &str, network: InterNodeNetwork) -> Result<Self, PlanError> {
        let bad = |part: &str, why: &str| {
            PlanError::InvalidGpus(format!(
                "--gpus {spec:?}: {part:?} {why}; write NODESxGPUSxMODEL such as 2x8xH100 (models: {})",
                catalog::short_names().join(", ")
            ))
        };
        let mut nodes = Vec::new();
        for part in spec.split(',').map(str::trim) {
            let (count, gpus, model) = match split_number(part) {
                Some((first, rest)) => match split_number(rest) {
                    Some((second, model)) => (first, second, model),
                    None => ("1", first, rest),
                },
                None => return Err(bad(part, "is not NODESxGPUSxMODEL")),
            };
            let count: usize = count
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| bad(part, "has no positive node count"))?;
            if nodes.len() + count > MAX_SPEC_NODES {
                return Err(bad(
                    part,
                    &format!("makes more than {MAX_SPEC_NODES} nodes"),
                ));
            }
            let gpus: i32 = gpus
                .parse()
                .ok()
                .filter(|&n| (1..=MAX_SPEC_GPUS_PER_NODE).contains(&n))
                .ok_or_else(|| {
                    bad(
                        part,
                        &format!("has no GPU count between 1 and {MAX_SPEC_GPUS_PER_NODE}"),
                    )
                })?;
            let gpu =
                catalog::lookup(model).map_err(|_| bad(part, "names an unknown GPU model"))?;
            for _ in 0..count {
                nodes.push(PoolNode {
                    name: format!("node-{}", nodes.len()),
                    gpu_model: gpu.short_name.to_string(),
                    gpu_count: gpus,
                    allocatable: gpus,
                    nvlink_domain: None,
                    ready: true,
                    quarantined_until: None,
                    reason: None,
                });
            }
        }
        Ok(Self {
            nodes,
            gpu_override: None,
            intra_node: IntraNodeLink::Auto,
            network,
            network_gbps: f64::from(network.default_gbps()),
        })
    }

    /// Replaces the network (and its bandwidth with the network's typical figure).
    pub fn with_network(mut self, network: InterNodeNetwork) -> Self {
        self.network = network;
        self.network_gbps = f64::from(network.default_gbps());
        self
    }
}

/// Splits `12xREST` into `("12", "REST")`; `None` when `s` does not start with digits and `x`.
fn split_number(s: &str) -> Option<(&str, &str)> {
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    let rest = s[digits..].strip_prefix(['x', 'X'])?;
    (digits > 0).then_some((&s[..digits], rest))
}

/// A node the planner may use.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UsableNode<'d> {
    pub name: String,
    pub gpu: &'d GpuSpec,
    pub free: u32,
    pub domain: Option<String>,
}

/// The pool split into usable nodes (sorted by name) and one remark per node left out.
pub(crate) struct Health<'d> {
    pub usable: Vec<UsableNode<'d>>,
    pub left_out: Vec<String>,
}

/// Leaves out nodes that are not Ready, are quarantined past `now`, or have no free GPU;
/// resolves the device model of the rest, first among `devices` (devices the caller describes,
/// such as a local machine's CPU slots), then in the catalog (an unknown model is an error).
pub(crate) fn usable_nodes<'d>(
    pool: &Pool,
    devices: &'d [GpuSpec],
    now: Timestamp,
) -> Result<Health<'d>, PlanError> {
    let mut nodes: Vec<&PoolNode> = pool.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut usable = Vec::new();
    let mut left_out = Vec::new();
    for n in nodes {
        let why = n
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        if !n.ready {
            left_out.push(format!("{} left out: not Ready{why}", n.name));
            continue;
        }
        if let Some(until) = &n.quarantined_until
            && until.0 > now
        {
            left_out.push(format!(
                "{} left out: quarantined until {}{why}",
                n.name, until.0
            ));
            continue;
        }
        let free = n.allocatable.min(n.gpu_count).max(0) as u32;
        if free == 0 {
            left_out.push(format!("{} left out: no free GPU", n.name));
            continue;
        }
        let label = if n.gpu_model.trim().is_empty() {
            pool.gpu_override.as_deref().unwrap_or("")
        } else {
            &n.gpu_model
        };
        usable.push(UsableNode {
            name: n.name.clone(),
            gpu: match devices.iter().find(|d| d.matches(label)) {
                Some(d) => d,
                None => catalog::lookup(label)?,
            },
            free,
            domain: n.nvlink_domain.clone().filter(|d| !d.is_empty()),
        });
    }
    Ok(Health { usable, left_out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_spec_reads_groups() {
        let p = Pool::from_gpus_spec(
            "2x8xH100, 4xNVIDIA-GeForce-RTX-4090",
            InterNodeNetwork::RoCE,
        )
        .expect("spec");
        let names: Vec<_> = p
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.gpu_model.as_str(), n.gpu_count))
            .collect();
        assert_eq!(
            names,
            vec![
                ("node-0", "H100", 8),
                ("node-1", "H100", 8),
                ("node-2", "RTX4090", 4)
            ]
        );
        assert_eq!(p.network_gbps, 200.0);
    }

    #[test]
    fn gpus_spec_errors_say_what_is_wrong() {
        for (spec, want) in [
            ("2x8xB300", "unknown GPU model"),
            ("0x8xH100", "node count"),
            ("2x0xH100", "GPU count between 1 and 1024"),
            ("200000x8xH100", "more than 100000 nodes"),
            ("2xfourxH100", "unknown GPU model"),
            ("H100", "NODESxGPUSxMODEL"),
            ("x8xH100", "NODESxGPUSxMODEL"),
            ("99999x1xH100,2x1xH100", "more than 100000 nodes"),
        ] {
            let err = Pool::from_gpus_spec(spec, InterNodeNetwork::Ethernet)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{spec}: {err}");
        }
        // Exactly the limit is allowed.
        let pool = Pool::from_gpus_spec("99999x1xH100,1x1xH100", InterNodeNetwork::Ethernet)
            .expect("100000 nodes");
        assert_eq!(pool.nodes.len(), MAX_SPEC_NODES);
    }

    #[test]
    fn a_quarantine_ending_now_is_over_and_an_empty_domain_is_none() {
        let mut pool = Pool::from_gpus_spec("2x8xH100", InterNodeNetwork::Ethernet).expect("pool");
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().expect("time");
        pool.nodes[0].quarantined_until =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        pool.nodes[1].nvlink_domain = Some(String::new());
        let health = usable_nodes(&pool, &[], now).expect("usable");
        assert_eq!(health.usable.len(), 2, "{:?}", health.left_out);
        assert_eq!(health.usable[1].domain, None);
    }
}
