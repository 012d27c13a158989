//! The GPU metric families (`whaleflux_gpu_*`), one series per GPU labelled with its index,
//! UUID and model; named after DCGM's fields with Prometheus units. NVML's cumulative counts
//! (ECC, NVLink) become counters that grow by what NVML's counts grew.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::verdict::{FATAL_REASONS, THROTTLE_REASONS, XidClass};
use super::{GpuSample, Verdict};

/// Label set: name/value pairs.
pub type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Every GPU family the worker exports.
#[derive(Default)]
pub struct GpuMetrics {
    temperature: Family<Labels, Gauge>,
    slowdown_temperature: Family<Labels, Gauge>,
    power: Family<Labels, FloatGauge>,
    power_limit: Family<Labels, FloatGauge>,
    memory_used: Family<Labels, Gauge>,
    memory_total: Family<Labels, Gauge>,
    utilization: Family<Labels, FloatGauge>,
    xid_errors: Family<Labels, Counter>,
    ecc_uncorrected: Family<Labels, Counter>,
    nvlink_errors: Family<Labels, Counter>,
    pcie_replays: Family<Labels, Counter>,
    retired_pages_pending: Family<Labels, Gauge>,
    remapped_rows: Family<Labels, Gauge>,
    row_remap_pending: Family<Labels, Gauge>,
    row_remap_failure: Family<Labels, Gauge>,
    throttled: Family<Labels, Gauge>,
    healthy: Family<Labels, Gauge>,
    fatal: Family<Labels, Gauge>,
    /// What the sampler found (`2 GPU(s)`, `no GPU (NVML: ...)`), for `/healthz`.
    status: Mutex<String>,
    /// Faults seen, latched per GPU: a lost GPU stays lost until the process restarts.
    latched: Mutex<HashMap<String, String>>,
    first_fault: std::sync::OnceLock<String>,
}

impl GpuMetrics {
    /// Registers the families under `registry` (prefix `whaleflux_gpu`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "temperature_celsius",
            "GPU die temperature (DCGM_FI_DEV_GPU_TEMP)",
            self.temperature.clone(),
        );
        registry.register(
            "slowdown_temperature_celsius",
            "Temperature where the GPU starts hardware slowdown",
            self.slowdown_temperature.clone(),
        );
        registry.register(
            "power_watts",
            "Power draw (DCGM_FI_DEV_POWER_USAGE)",
            self.power.clone(),
        );
        registry.register(
            "power_limit_watts",
            "Enforced power limit",
            self.power_limit.clone(),
        );
        registry.register(
            "memory_used_bytes",
            "Frame buffer in use (DCGM_FI_DEV_FB_USED)",
            self.memory_used.clone(),
        );
        registry.register(
            "memory_total_bytes",
            "Frame buffer installed",
            self.memory_total.clone(),
        );
        registry.register(
            "utilization_ratio",
            "Share of the last sample period a kernel ran (DCGM_FI_DEV_GPU_UTIL / 100)",
            self.utilization.clone(),
        );
        registry.register(
            "xid_errors",
            "XID errors by code (DCGM_FI_DEV_XID_ERRORS)",
            self.xid_errors.clone(),
        );
        registry.register(
            "ecc_uncorrected_errors",
            "Uncorrected ECC errors since the driver loaded (DCGM_FI_DEV_ECC_DBE_VOL_TOTAL)",
            self.ecc_uncorrected.clone(),
        );
        registry.register(
            "nvlink_errors",
            "NVLink replay, recovery and CRC errors by link",
            self.nvlink_errors.clone(),
        );
        registry.register(
            "pcie_replays",
            "PCIe link replays (DCGM_FI_DEV_PCIE_REPLAY_COUNTER)",
            self.pcie_replays.clone(),
        );
        registry.register(
            "retired_pages_pending",
            "1 while memory pages wait to be retired at the next GPU reset (DCGM_FI_DEV_RETIRED_PENDING)",
            self.retired_pages_pending.clone(),
        );
        registry.register(
            "remapped_rows",
            "Memory rows remapped over the GPU's life, by the error that caused it (DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS, DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS)",
            self.remapped_rows.clone(),
        );
        registry.register(
            "row_remap_pending",
            "1 while a row remapping waits for the next GPU reset (DCGM_FI_DEV_ROW_REMAP_PENDING)",
            self.row_remap_pending.clone(),
        );
        registry.register(
            "row_remap_failure",
            "1 once a row remapping failed: no spare row left (DCGM_FI_DEV_ROW_REMAP_FAILURE)",
            self.row_remap_failure.clone(),
        );
        registry.register(
            "throttled",
            "1 while a hardware or power reason slows the clocks (DCGM_FI_DEV_CLOCK_THROTTLE_REASONS)",
            self.throttled.clone(),
        );
        registry.register(
            "healthy",
            "0 once a fatal fault was seen on the GPU",
            self.healthy.clone(),
        );
        registry.register(
            "fatal_fault",
            "1 once a fatal fault of this reason was seen on the GPU",
            self.fatal.clone(),
        );
    }

    /// What the sampler found.
    pub fn status(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn set_status(&self, status: String) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// Publishes one sample and its verdict (`before`: the previous sample, for counters).
    pub fn record(&self, s: &GpuSample, before: Option<&GpuSample>, v: &Verdict) {
        let id = labels(s);
        let with = |k: &'static str, v: String| {
            let mut l = id.clone();
            l.push((k, v));
            l
        };
        let set = |f: &Family<Labels, Gauge>, v: Option<u64>| {
            if let Some(v) = v {
                f.get_or_create(&id).set(v as i64);
            }
        };
        let setf = |f: &Family<Labels, FloatGauge>, v: Option<f64>| {
            if let Some(v) = v {
                f.get_or_create(&id).set(v);
            }
        };
        set(&self.temperature, s.temperature_c.map(u64::from));
        set(&self.slowdown_temperature, s.slowdown_c.map(u64::from));
        setf(&self.power, s.power_w);
        setf(&self.power_limit, s.power_limit_w);
        set(&self.memory_used, s.memory_used_bytes);
        set(&self.memory_total, s.memory_total_bytes);
        setf(&self.utilization, s.utilization);
        // Counters grow by what NVML's count grew since the last sample (all of it at first).
        if let Some(n) = s.ecc_uncorrected {
            let was = before.and_then(|b| b.ecc_uncorrected).unwrap_or(0);
            self.ecc_uncorrected
                .get_or_create(&id)
                .inc_by(n.saturating_sub(was));
        }
        if let Some(n) = s.pcie_replays {
            let was = before.and_then(|b| b.pcie_replays).unwrap_or(0);
            self.pcie_replays
                .get_or_create(&id)
                .inc_by(n.saturating_sub(was));
        }
        set(
            &self.retired_pages_pending,
            s.retired_pages_pending.map(u64::from),
        );
        if let Some(r) = s.row_remap {
            for (cause, rows) in [
                ("correctable", r.correctable),
                ("uncorrectable", r.uncorrectable),
            ] {
                self.remapped_rows
                    .get_or_create(&with("cause", cause.into()))
                    .set(rows as i64);
            }
            set(&self.row_remap_pending, Some(u64::from(r.pending)));
            set(&self.row_remap_failure, Some(u64::from(r.failed)));
        }
        for link in &s.links {
            let was = before
                .and_then(|b| b.links.iter().find(|l| l.link == link.link))
                .map_or(0, |l| l.errors);
            self.nvlink_errors
                .get_or_create(&with("link", link.link.to_string()))
                .inc_by(link.errors.saturating_sub(was));
        }
        if let Some(bits) = s.throttle_reasons {
            for (bit, reason) in THROTTLE_REASONS {
                self.throttled
                    .get_or_create(&with("reason", reason.into()))
                    .set(i64::from(bits & bit != 0));
            }
        }
        if let Verdict::Fatal(reason) = v {
            self.latch(s, reason);
        }
        self.publish_fault(s, &id);
    }

    /// Counts an XID the driver reported for `s`'s GPU; a fatal one latches its fault.
    pub fn record_xid(&self, s: &GpuSample, code: u64, class: XidClass) {
        let id = labels(s);
        let mut with_xid = id.clone();
        with_xid.push(("xid", code.to_string()));
        self.xid_errors.get_or_create(&with_xid).inc();
        if class == XidClass::Fatal {
            self.latch(s, &format!("xid_{code}"));
        }
        self.publish_fault(s, &id);
    }

    /// Latches `reason` as the GPU's fault unless it has one; logs a new one and remembers it
    /// as the process's first fault.
    fn latch(&self, s: &GpuSample, reason: &str) {
        let mut latched = self.latched.lock().unwrap_or_else(|e| e.into_inner());
        if !latched.contains_key(&s.uuid) {
            tracing::error!(gpu = s.index, uuid = %s.uuid, reason, "fatal GPU fault");
            latched.insert(s.uuid.clone(), reason.to_string());
            let _ = self
                .first_fault
                .set(whaleflux_crds::worker::gpu_fault_message(
                    s.index, &s.uuid, &s.model, reason,
                ));
        }
    }

    /// The first fatal fault this process saw, in words naming the GPU; readiness and the
    /// termination message say it.
    pub fn fatal(&self) -> Option<&str> {
        self.first_fault.get().map(String::as_str)
    }

    /// `healthy` and `fatal_fault` from the latched fault (every known reason at 0 or 1).
    fn publish_fault(&self, s: &GpuSample, id: &Labels) {
        let fault = self
            .latched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&s.uuid)
            .cloned();
        self.healthy
            .get_or_create(id)
            .set(i64::from(fault.is_none()));
        let with_reason = |r: &str| {
            let mut l = id.clone();
            l.push(("reason", r.to_string()));
            l
        };
        for reason in FATAL_REASONS {
            self.fatal
                .get_or_create(&with_reason(reason))
                .set(i64::from(fault.as_deref() == Some(reason)));
        }
        if let Some(f) = fault.filter(|f| !FATAL_REASONS.contains(&f.as_str())) {
            self.fatal.get_or_create(&with_reason(&f)).set(1);
        }
    }
}

/// A GPU's identity labels.
fn labels(s: &GpuSample) -> Labels {
    vec![
        ("gpu", s.index.to_string()),
        ("uuid", s.uuid.clone()),
        ("model", s.model.clone()),
    ]
}
