//! The verdict table: one GPU sample (and the one before it) in, healthy / degrading / fatal
//! out. Pure, so every row is a table test. The rows follow DCGM's health watches (memory:
//! uncorrectable ECC and a failed row remapping are failures, pages pending retirement and a
//! row remapping pending a reset are warnings; thermal and power:
//! slowdown is a warning; NVLink and PCIe: rising error / replay counters are a warning) and NVML's own answers (`GPU_IS_LOST`: the GPU fell off the
//! bus, XID 79 in NVIDIA's XID catalogue); XIDs have their own table, [`classify_xid`].

use super::GpuSample;

/// What a sample says about its GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing wrong.
    Healthy,
    /// Serving works but slower or at risk: the reasons, most serious first.
    Degrading(Vec<&'static str>),
    /// The GPU cannot be trusted with work: the reason.
    Fatal(&'static str),
}

/// What an XID (an error the driver reports, NVIDIA's XID catalogue) says about the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XidClass {
    /// The GPU needs a reset or replacing: stop using it.
    Fatal,
    /// Worth a warning; the GPU keeps working.
    Degrading,
    /// A fault of the program running on the GPU, not of the GPU (the Kubernetes device
    /// plugin ignores these when it decides a GPU's health).
    Application,
}

/// The XID table. Fatal: 48 (double-bit ECC), 64 (row-remapping failure), 74 (NVLink error),
/// 79 (fell off the bus), 94 and 95 (contained / uncontained ECC error), 119 and 120 (GSP
/// timeout / error), 140 (unrecovered ECC). Application: the NVIDIA device plugin's default
/// ignored XIDs 13, 31, 43, 45, 68 and 109. Anything else degrades, as DCGM warns on XIDs it
/// does not know.
pub fn classify_xid(code: u64) -> XidClass {
    match code {
        48 | 64 | 74 | 79 | 94 | 95 | 119 | 120 | 140 => XidClass::Fatal,
        13 | 31 | 43 | 45 | 68 | 109 => XidClass::Application,
        _ => XidClass::Degrading,
    }
}

/// Every reason [`Verdict::Fatal`] gives, so each GPU's fault series exist (at 0) before a fault.
pub const FATAL_REASONS: [&str; 4] = [
    "gpu_lost",
    "ecc_uncorrected",
    "row_remap_failure",
    "over_shutdown_temperature",
];

/// NVML's throttle reasons that mean the hardware slowed the GPU down (not an idle or
/// application clock setting): `nvmlClocksThrottleReason*`.
pub const THROTTLE_REASONS: [(u64, &str); 5] = [
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x20, "sw_thermal"),
    (0x40, "hw_thermal"),
    (0x80, "hw_power_brake"),
];

/// The verdict on `now`, given the sample `before` it of the same GPU (for rising counters).
pub fn verdict(now: &GpuSample, before: Option<&GpuSample>) -> Verdict {
    if now.lost {
        return Verdict::Fatal("gpu_lost");
    }
    if now.ecc_uncorrected.is_some_and(|n| n > 0) {
        return Verdict::Fatal("ecc_uncorrected");
    }
    if now.row_remap.is_some_and(|r| r.failed) {
        return Verdict::Fatal("row_remap_failure");
    }
    if let (Some(t), Some(limit)) = (now.temperature_c, now.shutdown_c)
        && t >= limit
    {
        return Verdict::Fatal("over_shutdown_temperature");
    }
    let mut why = Vec::new();
    if let (Some(t), Some(limit)) = (now.temperature_c, now.slowdown_c)
        && t >= limit
    {
        why.push("thermal_slowdown");
    }
    let bits = now.throttle_reasons.unwrap_or(0);
    why.extend(
        THROTTLE_REASONS
            .iter()
            .filter(|(bit, name)| bits & bit != 0 && *name != "sw_power_cap")
            .map(|(_, name)| *name),
    );
    // DCGM's memory and PCIe watches: pages pending retirement need a reset; a PCIe link
    // that keeps replaying is failing.
    if now.retired_pages_pending == Some(true) {
        why.push("retired_pages_pending");
    }
    if now.row_remap.is_some_and(|r| r.pending) {
        why.push("row_remap_pending");
    }
    if let Some(before) = before {
        if let (Some(n), Some(was)) = (now.pcie_replays, before.pcie_replays)
            && n > was
        {
            why.push("pcie_replays_rising");
        }
        for link in &now.links {
            let was = before.links.iter().find(|l| l.link == link.link);
            if was.is_some_and(|w| w.active && !link.active) {
                why.push("nvlink_down");
            }
            if was.is_some_and(|w| link.errors > w.errors) {
                why.push("nvlink_errors_rising");
            }
        }
    }
    why.dedup();
    if why.is_empty() {
        Verdict::Healthy
    } else {
        Verdict::Degrading(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{LinkSample, RowRemap};

    fn h100() -> GpuSample {
        GpuSample {
            index: 0,
            uuid: "GPU-0".into(),
            model: "NVIDIA H100 80GB HBM3".into(),
            temperature_c: Some(45),
            slowdown_c: Some(87),
            shutdown_c: Some(92),
            ecc_uncorrected: Some(0),
            throttle_reasons: Some(0),
            pcie_replays: Some(0),
            retired_pages_pending: Some(false),
            row_remap: Some(RowRemap::default()),
            links: vec![LinkSample {
                link: 0,
                active: true,
                errors: 3,
            }],
            ..GpuSample::default()
        }
    }

    #[test]
    fn the_xid_table() {
        for code in [48, 64, 74, 79, 94, 95, 119, 120, 140] {
            assert_eq!(classify_xid(code), XidClass::Fatal, "XID {code}");
        }
        for code in [13, 31, 43, 45, 68, 109] {
            assert_eq!(classify_xid(code), XidClass::Application, "XID {code}");
        }
        for code in [0, 32, 63, 92, 999] {
            assert_eq!(classify_xid(code), XidClass::Degrading, "XID {code}");
        }
    }

    #[test]
    fn the_table() {
        let ok = h100();
        let with = |f: fn(&mut GpuSample)| {
            let mut s = h100();
            f(&mut s);
            s
        };
        let cases: Vec<(&str, GpuSample, Verdict)> = vec![
            ("healthy", ok.clone(), Verdict::Healthy),
            ("lost", with(|s| s.lost = true), Verdict::Fatal("gpu_lost")),
            (
                "uncorrected ECC",
                with(|s| s.ecc_uncorrected = Some(1)),
                Verdict::Fatal("ecc_uncorrected"),
            ),
            (
                "at the shutdown temperature",
                with(|s| s.temperature_c = Some(92)),
                Verdict::Fatal("over_shutdown_temperature"),
            ),
            (
                "at the slowdown temperature",
                with(|s| s.temperature_c = Some(87)),
                Verdict::Degrading(vec!["thermal_slowdown"]),
            ),
            (
                "one below slowdown",
                with(|s| s.temperature_c = Some(86)),
                Verdict::Healthy,
            ),
            (
                "hardware thermal and power brake",
                with(|s| s.throttle_reasons = Some(0x40 | 0x80)),
                Verdict::Degrading(vec!["hw_thermal", "hw_power_brake"]),
            ),
            (
                "a software power cap is normal operation",
                with(|s| s.throttle_reasons = Some(0x4 | 0x1)),
                Verdict::Healthy,
            ),
            (
                "link errors rising",
                with(|s| s.links[0].errors = 4),
                Verdict::Degrading(vec!["nvlink_errors_rising"]),
            ),
            (
                "link went down",
                with(|s| s.links[0].active = false),
                Verdict::Degrading(vec!["nvlink_down"]),
            ),
            (
                "pages pending retirement",
                with(|s| s.retired_pages_pending = Some(true)),
                Verdict::Degrading(vec!["retired_pages_pending"]),
            ),
            (
                "a row remapping failed",
                with(|s| {
                    s.row_remap = Some(RowRemap {
                        uncorrectable: 3,
                        failed: true,
                        ..RowRemap::default()
                    })
                }),
                Verdict::Fatal("row_remap_failure"),
            ),
            (
                "a row remapping waits for a reset",
                with(|s| {
                    s.row_remap = Some(RowRemap {
                        correctable: 1,
                        pending: true,
                        ..RowRemap::default()
                    })
                }),
                Verdict::Degrading(vec!["row_remap_pending"]),
            ),
            (
                "rows remapped in the past, nothing pending",
                with(|s| {
                    s.row_remap = Some(RowRemap {
                        correctable: 5,
                        uncorrectable: 1,
                        ..RowRemap::default()
                    })
                }),
                Verdict::Healthy,
            ),
            (
                "PCIe replays rising",
                with(|s| s.pcie_replays = Some(9)),
                Verdict::Degrading(vec!["pcie_replays_rising"]),
            ),
            (
                "no thresholds known",
                with(|s| {
                    s.temperature_c = Some(120);
                    s.slowdown_c = None;
                    s.shutdown_c = None;
                }),
                Verdict::Healthy,
            ),
        ];
        for (name, sample, want) in cases {
            assert_eq!(verdict(&sample, Some(&ok)), want, "{name}");
        }
        // The first sample has nothing to compare counters with.
        assert_eq!(
            verdict(&with(|s| s.links[0].errors = 100), None),
            Verdict::Healthy
        );
    }
}
