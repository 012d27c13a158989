//! Reading the GPUs through NVML (`nvml-wrapper`, the library loaded at run time). Each field a
//! GPU does not support stays `None`; a device that answers `GPU_IS_LOST` is a lost sample.

use std::path::Path;

use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    EccCounter, MemoryError, TemperatureSensor, TemperatureThreshold,
};
use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::{Device, EventSet, Nvml};

use super::{GpuSample, LinkSample, RowRemap, Visible};

/// NVML's `NVML_NVLINK_MAX_LINKS`.
const MAX_LINKS: u32 = 18;

/// Loads NVML (the given library, else the driver's) and checks it sees a GPU.
pub fn open(library: Option<&Path>) -> Result<Nvml, String> {
    let nvml = match library {
        Some(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
        None => Nvml::init(),
    }
    .map_err(|e| format!("NVML: {e}"))?;
    match nvml.device_count() {
        Ok(0) => Err("NVML sees no GPU".into()),
        Ok(_) => Ok(nvml),
        Err(e) => Err(format!("NVML device count: {e}")),
    }
}

/// The NVML indices of this process's GPUs, decided once while they can still say who they
/// are (a GPU lost later answers nothing, not even its UUID).
pub fn indices(nvml: &Nvml, visible: &Visible) -> Vec<u32> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter(|&i| {
            let uuid = nvml
                .device_by_index(i)
                .and_then(|d| d.uuid())
                .unwrap_or_default();
            visible.admits(i, &uuid)
        })
        .collect()
}

/// Samples the GPUs at `indices`.
pub fn sample(nvml: &Nvml, indices: &[u32]) -> Vec<GpuSample> {
    indices.iter().map(|&i| sample_one(nvml, i)).collect()
}

fn sample_one(nvml: &Nvml, index: u32) -> GpuSample {
    let lost = |s: GpuSample| GpuSample { lost: true, ..s };
    let mut s = GpuSample {
        index,
        ..GpuSample::default()
    };
    let device = match nvml.device_by_index(index) {
        Ok(d) => d,
        Err(NvmlError::GpuLost) => return lost(s),
        Err(e) => {
            tracing::warn!(gpu = index, "NVML cannot open the GPU: {e}");
            return s;
        }
    };
    // A lost GPU answers GpuLost to everything; the identity query tells first.
    match device.uuid() {
        Ok(u) => s.uuid = u,
        Err(NvmlError::GpuLost) => return lost(s),
        Err(_) => s.uuid = format!("gpu-{index}"),
    }
    s.model = device.name().unwrap_or_default();
    let lost_now = std::cell::Cell::new(false);
    let ok = |r: Result<u64, NvmlError>| match r {
        Ok(v) => Some(v),
        Err(NvmlError::GpuLost) => {
            lost_now.set(true);
            None
        }
        Err(_) => None,
    };
    s.temperature_c =
        ok(device.temperature(TemperatureSensor::Gpu).map(u64::from)).map(|v| v as u32);
    s.slowdown_c = ok(device
        .temperature_threshold(TemperatureThreshold::Slowdown)
        .map(u64::from))
    .map(|v| v as u32);
    s.shutdown_c = ok(device
        .temperature_threshold(TemperatureThreshold::Shutdown)
        .map(u64::from))
    .map(|v| v as u32);
    s.power_w = ok(device.power_usage().map(u64::from)).map(|mw| mw as f64 / 1000.0);
    s.power_limit_w = ok(device.enforced_power_limit().map(u64::from)).map(|mw| mw as f64 / 1000.0);
    if let Some(m) = ok(device.memory_info().map(|m| m.used)) {
        s.memory_used_bytes = Some(m);
        s.memory_total_bytes = device.memory_info().ok().map(|m| m.total);
    }
    s.utilization =
        ok(device.utilization_rates().map(|u| u64::from(u.gpu))).map(|pct| pct as f64 / 100.0);
    s.ecc_uncorrected = ok(device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile));
    s.throttle_reasons = ok(device.current_throttle_reasons().map(|r| r.bits()));
    s.pcie_replays = ok(device.pcie_replay_counter().map(u64::from));
    s.retired_pages_pending = ok(device.are_pages_pending_retired().map(u64::from)).map(|v| v != 0);
    match remapped_rows(nvml, &device) {
        Ok(rows) => s.row_remap = Some(rows),
        Err(NvmlError::GpuLost) => lost_now.set(true),
        Err(_) => {}
    }
    for link in 0..MAX_LINKS {
        let l = device.link_wrapper_for(link);
        let Ok(active) = l.is_active() else { break };
        let errors = [
            ErrorCounter::DlReplay,
            ErrorCounter::DlRecovery,
            ErrorCounter::DlCrcFlit,
            ErrorCounter::DlCrcData,
        ]
        .into_iter()
        .filter_map(|c| l.error_counter(c).ok())
        .sum();
        s.links.push(LinkSample {
            link,
            active,
            errors,
        });
    }
    s.lost = lost_now.get();
    s
}

/// `nvmlDeviceGetRemappedRows` through the raw binding, which nvml-wrapper 0.13 has no safe
/// call for. Drivers before R450 lack the symbol and GPUs before Ampere answer
/// `NOT_SUPPORTED`: both are an error here, so the field stays unknown.
fn remapped_rows(nvml: &Nvml, device: &Device<'_>) -> Result<RowRemap, NvmlError> {
    let get = nvml
        .lib()
        .nvmlDeviceGetRemappedRows
        .as_ref()
        .map_err(|_| NvmlError::FunctionNotFound)?;
    let (mut correctable, mut uncorrectable, mut pending, mut failed) = (0, 0, 0, 0);
    // SAFETY: the handle belongs to this initialised library, and the four out-pointers are
    // live `c_uint`s for the length of the call, as nvml.h's signature asks.
    nvml_try(unsafe {
        get(
            device.handle(),
            &mut correctable,
            &mut uncorrectable,
            &mut pending,
            &mut failed,
        )
    })?;
    Ok(RowRemap {
        correctable: u64::from(correctable),
        uncorrectable: u64::from(uncorrectable),
        pending: pending != 0,
        failed: failed != 0,
    })
}

/// An event set with the GPUs at `indices` registered for critical XID errors; `None` (logged)
/// when NVML cannot deliver them (a GPU that does not support events loses the whole set).
pub fn xid_events<'n>(nvml: &'n Nvml, indices: &[u32]) -> Option<EventSet<'n>> {
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no XID events: NVML event set: {e}");
            return None;
        }
    };
    for &index in indices {
        let registered = nvml
            .device_by_index(index)
            .map_err(Into::into)
            .and_then(|d| d.register_events(EventTypes::CRITICAL_XID_ERROR, set));
        match registered {
            Ok(s) => set = s,
            Err(e) => {
                tracing::warn!(gpu = index, "no XID events: {}", e.error);
                return None;
            }
        }
    }
    Some(set)
}

/// Waits up to `timeout` for the next XID: (GPU index, XID code; 999 when NVML does not know).
pub fn next_xid(set: &EventSet<'_>, timeout: Duration) -> Option<(u32, u64)> {
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let event = set.wait(ms).ok()?;
    let code = match event.event_data? {
        XidError::Value(v) => v,
        XidError::Unknown => 999,
    };
    Some((event.device.index().ok()?, code))
}
