//! A fake NVIDIA Management Library for end-to-end tests of GPU telemetry and GPU faults on
//! machines without NVIDIA hardware.
//!
//! `e2e/fake-nvml/fake_nvml.c` is a small C shared library that exports the subset of the NVML C
//! API the worker uses (`nvmlInit_v2`, `nvmlDeviceGetTemperature`, `nvmlDeviceGetTotalEccErrors`,
//! `nvmlDeviceGetNvLinkErrorCounter`, ...) with NVML's exact signatures and return codes. The real
//! worker loads it through its ordinary NVML library-path option (nvml-wrapper's
//! `Nvml::builder().lib_path(path).init()`), so product code never knows it is fake.
//!
//! The library answers from a plain-text state file whose path is in [`STATE_ENV`] (in the
//! worker's environment). It re-reads the file on every call, so a test injects a fault while the
//! worker runs by rewriting the file with [`FakeNode::write`] (which replaces it atomically):
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use whaleflux_e2e::fake_nvml::{self, FakeNode, STATE_ENV};
//! let dir = std::env::temp_dir().join("fake-nvml-example");
//! let lib = fake_nvml::build(&dir)?; // pass to the worker as its NVML library path
//! let state = dir.join("gpus.state");
//! let mut node = FakeNode::h100s(8);
//! node.write(&state)?; // start the worker with STATE_ENV=<state>
//! node.gpus[3].temperature_c = 91; // hotter than slowdown_c
//! node.gpus[5].lost = true; // every NVML call on GPU 5 now returns NVML_ERROR_GPU_IS_LOST
//! node.xids.push((2, 79)); // GPU 2 reports XID 79 to the worker's event set
//! node.write(&state)?;
//! # let _ = (lib, STATE_ENV);
//! # Ok(())
//! # }
//! ```
//!
//! Without the variable, or without the file, `nvmlInit_v2` returns
//! `NVML_ERROR_DRIVER_NOT_LOADED`, as on a machine with no NVIDIA driver. The file format is
//! documented at the top of `fake_nvml.c` (the state file is read by `state.c` beside it).

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// Environment variable that holds the state file's path, read by the fake library.
pub const STATE_ENV: &str = "WHALEFLUX_FAKE_NVML_STATE";

/// File name [`build`] gives the library.
pub const LIB_NAME: &str = "libnvidia-ml-fake.so";

/// Most GPUs the fake library serves (extra `gpu.N` entries are ignored).
pub const MAX_GPUS: usize = 64;

/// Most NVLinks per GPU (`NVML_NVLINK_MAX_LINKS`).
pub const MAX_NVLINKS: usize = 18;

/// Longest name or UUID, in bytes, including NVML's terminating NUL (NVML's V2 buffer size).
const MAX_STRING: usize = 96;

/// The C sources in `e2e/fake-nvml/`: `fake_nvml.c` (the exported NVML functions) and
/// `state.c` (the state file and the calls' common prologue); `fake_nvml.h` is beside them.
pub fn sources() -> [PathBuf; 2] {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fake-nvml");
    [dir.join("fake_nvml.c"), dir.join("state.c")]
}

/// Compile the fake library with `$CC` (default `cc`) into `out_dir/libnvidia-ml-fake.so` and
/// return its absolute path (what the worker's NVML library option should get). The file is
/// replaced atomically, so a process that has the old one loaded is not disturbed. The error
/// carries the compiler's stderr.
pub fn build(out_dir: &Path) -> io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);

    std::fs::create_dir_all(out_dir)?;
    let cc = std::env::var("CC")
        .ok()
        .filter(|cc| !cc.trim().is_empty())
        .unwrap_or_else(|| "cc".to_string());
    // $CC may carry arguments ("ccache gcc").
    let mut words = cc.split_whitespace();
    let program = words.next().unwrap_or("cc");
    let sources = sources();
    let out = out_dir.join(LIB_NAME);
    let tmp = out_dir.join(format!(
        ".{LIB_NAME}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let output = Command::new(program)
        .args(words)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-o"])
        .arg(&tmp)
        .args(&sources)
        .arg("-lpthread")
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running C compiler `{cc}`: {e}")))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::other(format!(
            "`{cc}` failed ({}) compiling {}:\n{}",
            output.status,
            sources[0].with_file_name("*.c").display(),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    std::fs::rename(&tmp, &out)?;
    // dlopen searches the library path for a name without a slash, and a relative path would
    // resolve against the worker's working directory: hand back an absolute one.
    std::path::absolute(&out)
}

/// One NVLink of a [`FakeGpu`]. Error counters are NVML's `NVML_NVLINK_ERROR_DL_*` counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLink {
    /// `nvmlDeviceGetNvLinkState`: enabled.
    pub active: bool,
    /// `NVML_NVLINK_ERROR_DL_REPLAY`.
    pub replay_errors: u64,
    /// `NVML_NVLINK_ERROR_DL_RECOVERY`.
    pub recovery_errors: u64,
    /// `NVML_NVLINK_ERROR_DL_CRC_FLIT`.
    pub crc_flit_errors: u64,
    /// `NVML_NVLINK_ERROR_DL_CRC_DATA`.
    pub crc_data_errors: u64,
}

impl FakeLink {
    /// An active link with no errors.
    pub fn healthy() -> Self {
        Self {
            active: true,
            replay_errors: 0,
            recovery_errors: 0,
            crc_flit_errors: 0,
            crc_data_errors: 0,
        }
    }
}

impl Default for FakeLink {
    /// Same as [`FakeLink::healthy`].
    fn default() -> Self {
        Self::healthy()
    }
}

/// One GPU as the fake NVML reports it. Each field is the value of the NVML call named on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeGpu {
    /// `nvmlDeviceGetName` (at most 95 bytes, no line breaks).
    pub name: String,
    /// `nvmlDeviceGetUUID` (at most 95 bytes, no line breaks).
    pub uuid: String,
    /// `nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)`, °C.
    pub temperature_c: u32,
    /// `nvmlDeviceGetTemperatureThreshold(NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)`, °C.
    pub slowdown_c: u32,
    /// `nvmlDeviceGetTemperatureThreshold(NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)`, °C.
    pub shutdown_c: u32,
    /// `nvmlDeviceGetPowerUsage`, milliwatts.
    pub power_mw: u32,
    /// `nvmlDeviceGetEnforcedPowerLimit`, milliwatts.
    pub power_limit_mw: u32,
    /// `nvmlDeviceGetMemoryInfo(_v2)` total, bytes.
    pub memory_total: u64,
    /// `nvmlDeviceGetMemoryInfo(_v2)` used, bytes (free = total - used, reserved = 0).
    pub memory_used: u64,
    /// `nvmlDeviceGetUtilizationRates` gpu, percent.
    pub util_gpu: u32,
    /// `nvmlDeviceGetUtilizationRates` memory, percent.
    pub util_memory: u32,
    /// `nvmlDeviceGetTotalEccErrors(UNCORRECTED, VOLATILE)`.
    pub ecc_uncorrected_volatile: u64,
    /// `nvmlDeviceGetTotalEccErrors(UNCORRECTED, AGGREGATE)`.
    pub ecc_uncorrected_aggregate: u64,
    /// `nvmlDeviceGetTotalEccErrors(CORRECTED, VOLATILE)`.
    pub ecc_corrected_volatile: u64,
    /// `nvmlDeviceGetTotalEccErrors(CORRECTED, AGGREGATE)`.
    pub ecc_corrected_aggregate: u64,
    /// `nvmlDeviceGetCurrentClocksThrottleReasons` / `...EventReasons`: a bitmask of NVML's
    /// `nvmlClocksThrottleReason*` values (e.g. `0x20` SW thermal, `0x40` HW thermal slowdown).
    pub throttle_reasons: u64,
    /// `nvmlDeviceGetPcieReplayCounter`.
    pub pcie_replays: u32,
    /// `nvmlDeviceGetRetiredPagesPendingStatus`.
    pub retired_pages_pending: bool,
    /// `nvmlDeviceGetRemappedRows`: rows remapped for correctable errors.
    pub remapped_rows_correctable: u32,
    /// `nvmlDeviceGetRemappedRows`: rows remapped for uncorrectable errors.
    pub remapped_rows_uncorrectable: u32,
    /// `nvmlDeviceGetRemappedRows`: a remapping waits for the next GPU reset.
    pub row_remap_pending: bool,
    /// `nvmlDeviceGetRemappedRows`: a remapping failed (no spare row left).
    pub row_remap_failure: bool,
    /// Links `0..nvlinks.len()` exist (at most [`MAX_NVLINKS`]); others answer
    /// `NVML_ERROR_INVALID_ARGUMENT`.
    pub nvlinks: Vec<FakeLink>,
    /// Fallen off the bus: every NVML call on this GPU returns `NVML_ERROR_GPU_IS_LOST`.
    pub lost: bool,
}

impl FakeGpu {
    /// A healthy, lightly loaded H100 80GB HBM3 with 4 active NVLinks; the UUID is unique by
    /// index (`GPU-00000000-0000-0000-0000-<index as 12 hex digits>`, the library's default).
    pub fn h100(index: usize) -> Self {
        Self {
            name: "NVIDIA H100 80GB HBM3".to_string(),
            uuid: format!("GPU-00000000-0000-0000-0000-{index:012x}"),
            temperature_c: 45,
            slowdown_c: 87,
            shutdown_c: 92,
            power_mw: 250_000,
            power_limit_mw: 700_000,
            memory_total: 80 * 1024 * 1024 * 1024,
            memory_used: 1024 * 1024 * 1024,
            util_gpu: 30,
            util_memory: 10,
            ecc_uncorrected_volatile: 0,
            ecc_uncorrected_aggregate: 0,
            ecc_corrected_volatile: 0,
            ecc_corrected_aggregate: 0,
            throttle_reasons: 0,
            pcie_replays: 0,
            retired_pages_pending: false,
            remapped_rows_correctable: 0,
            remapped_rows_uncorrectable: 0,
            row_remap_pending: false,
            row_remap_failure: false,
            nvlinks: vec![FakeLink::healthy(); 4],
            lost: false,
        }
    }
}

/// The GPUs of one node: what the fake NVML reports (GPU `i` is NVML index `i`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FakeNode {
    /// GPUs by NVML index (at most [`MAX_GPUS`]).
    pub gpus: Vec<FakeGpu>,
    /// XID events as (GPU index, XID code), oldest first: an event set created by the worker
    /// delivers those pushed after it was created, once each.
    pub xids: Vec<(usize, u64)>,
}

impl FakeNode {
    /// `count` healthy H100s ([`FakeGpu::h100`]).
    pub fn h100s(count: usize) -> Self {
        Self {
            gpus: (0..count).map(FakeGpu::h100).collect(),
            xids: Vec::new(),
        }
    }

    /// The state file's text. Every key is written, so nothing depends on the library's defaults.
    /// Fails (`InvalidInput`) on what the format cannot carry: too many GPUs or links, a name or
    /// UUID with a line break or over 95 bytes.
    pub fn to_state(&self) -> io::Result<String> {
        use std::fmt::Write as _;

        if self.gpus.len() > MAX_GPUS {
            return Err(invalid(format!(
                "{} GPUs; the fake NVML serves at most {MAX_GPUS}",
                self.gpus.len()
            )));
        }
        let mut s = String::from("# whaleflux fake NVML state\n");
        let _ = writeln!(s, "gpu_count {}", self.gpus.len());
        for (i, g) in self.gpus.iter().enumerate() {
            check_string(i, "name", &g.name)?;
            check_string(i, "uuid", &g.uuid)?;
            if g.nvlinks.len() > MAX_NVLINKS {
                return Err(invalid(format!(
                    "GPU {i} has {} NVLinks; NVML allows at most {MAX_NVLINKS}",
                    g.nvlinks.len()
                )));
            }
            let p = format!("gpu.{i}.");
            let _ = writeln!(s, "{p}name {}", g.name);
            let _ = writeln!(s, "{p}uuid {}", g.uuid);
            let _ = writeln!(s, "{p}temperature_c {}", g.temperature_c);
            let _ = writeln!(s, "{p}slowdown_c {}", g.slowdown_c);
            let _ = writeln!(s, "{p}shutdown_c {}", g.shutdown_c);
            let _ = writeln!(s, "{p}power_mw {}", g.power_mw);
            let _ = writeln!(s, "{p}power_limit_mw {}", g.power_limit_mw);
            let _ = writeln!(s, "{p}memory_total {}", g.memory_total);
            let _ = writeln!(s, "{p}memory_used {}", g.memory_used);
            let _ = writeln!(s, "{p}util_gpu {}", g.util_gpu);
            let _ = writeln!(s, "{p}util_memory {}", g.util_memory);
            let _ = writeln!(
                s,
                "{p}ecc_uncorrected_volatile {}",
                g.ecc_uncorrected_volatile
            );
            let _ = writeln!(
                s,
                "{p}ecc_uncorrected_aggregate {}",
                g.ecc_uncorrected_aggregate
            );
            let _ = writeln!(s, "{p}ecc_corrected_volatile {}", g.ecc_corrected_volatile);
            let _ = writeln!(
                s,
                "{p}ecc_corrected_aggregate {}",
                g.ecc_corrected_aggregate
            );
            let _ = writeln!(s, "{p}throttle_reasons {}", g.throttle_reasons);
            let _ = writeln!(s, "{p}pcie_replays {}", g.pcie_replays);
            let _ = writeln!(
                s,
                "{p}retired_pages_pending {}",
                u8::from(g.retired_pages_pending)
            );
            let _ = writeln!(
                s,
                "{p}remapped_rows_correctable {}",
                g.remapped_rows_correctable
            );
            let _ = writeln!(
                s,
                "{p}remapped_rows_uncorrectable {}",
                g.remapped_rows_uncorrectable
            );
            let _ = writeln!(s, "{p}row_remap_pending {}", u8::from(g.row_remap_pending));
            let _ = writeln!(s, "{p}row_remap_failure {}", u8::from(g.row_remap_failure));
            let _ = writeln!(s, "{p}nvlink_links {}", g.nvlinks.len());
            for (l, link) in g.nvlinks.iter().enumerate() {
                let q = format!("{p}nvlink.{l}.");
                let _ = writeln!(s, "{q}active {}", u8::from(link.active));
                let _ = writeln!(s, "{q}replay_errors {}", link.replay_errors);
                let _ = writeln!(s, "{q}recovery_errors {}", link.recovery_errors);
                let _ = writeln!(s, "{q}crc_flit_errors {}", link.crc_flit_errors);
                let _ = writeln!(s, "{q}crc_data_errors {}", link.crc_data_errors);
            }
            let _ = writeln!(s, "{p}lost {}", u8::from(g.lost));
        }
        for (seq, (gpu, code)) in self.xids.iter().enumerate() {
            let _ = writeln!(s, "xid.{} {gpu} {code}", seq + 1);
        }
        Ok(s)
    }

    /// Write the state file atomically (a temporary file in the same folder, renamed over
    /// `path`), so the library, which re-reads it on every call, never sees half of it.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);

        let text = self.to_state()?;
        let file_name = path
            .file_name()
            .ok_or_else(|| invalid(format!("{} names no file", path.display())))?;
        let tmp = path.with_file_name(format!(
            ".{}.{}.{}.tmp",
            file_name.to_string_lossy(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let result = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn check_string(gpu: usize, key: &str, value: &str) -> io::Result<()> {
    if value.contains(['\n', '\r', '\0']) {
        return Err(invalid(format!(
            "GPU {gpu} {key} {value:?} has a line break or NUL"
        )));
    }
    if value.len() >= MAX_STRING {
        return Err(invalid(format!(
            "GPU {gpu} {key} is {} bytes; NVML's buffer holds {}",
            value.len(),
            MAX_STRING - 1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("whaleflux-fake-nvml-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn h100_state_text_has_every_key() {
        let text = FakeNode::h100s(1).to_state().unwrap();
        let expected = "\
# whaleflux fake NVML state
gpu_count 1
gpu.0.name NVIDIA H100 80GB HBM3
gpu.0.uuid GPU-00000000-0000-0000-0000-000000000000
gpu.0.temperature_c 45
gpu.0.slowdown_c 87
gpu.0.shutdown_c 92
gpu.0.power_mw 250000
gpu.0.power_limit_mw 700000
gpu.0.memory_total 85899345920
gpu.0.memory_used 1073741824
gpu.0.util_gpu 30
gpu.0.util_memory 10
gpu.0.ecc_uncorrected_volatile 0
gpu.0.ecc_uncorrected_aggregate 0
gpu.0.ecc_corrected_volatile 0
gpu.0.ecc_corrected_aggregate 0
gpu.0.throttle_reasons 0
gpu.0.pcie_replays 0
gpu.0.retired_pages_pending 0
gpu.0.remapped_rows_correctable 0
gpu.0.remapped_rows_uncorrectable 0
gpu.0.row_remap_pending 0
gpu.0.row_remap_failure 0
gpu.0.nvlink_links 4
gpu.0.nvlink.0.active 1
gpu.0.nvlink.0.replay_errors 0
gpu.0.nvlink.0.recovery_errors 0
gpu.0.nvlink.0.crc_flit_errors 0
gpu.0.nvlink.0.crc_data_errors 0
gpu.0.nvlink.1.active 1
gpu.0.nvlink.1.replay_errors 0
gpu.0.nvlink.1.recovery_errors 0
gpu.0.nvlink.1.crc_flit_errors 0
gpu.0.nvlink.1.crc_data_errors 0
gpu.0.nvlink.2.active 1
gpu.0.nvlink.2.replay_errors 0
gpu.0.nvlink.2.recovery_errors 0
gpu.0.nvlink.2.crc_flit_errors 0
gpu.0.nvlink.2.crc_data_errors 0
gpu.0.nvlink.3.active 1
gpu.0.nvlink.3.replay_errors 0
gpu.0.nvlink.3.recovery_errors 0
gpu.0.nvlink.3.crc_flit_errors 0
gpu.0.nvlink.3.crc_data_errors 0
gpu.0.lost 0
";
        assert_eq!(text, expected);
    }

    #[test]
    fn uuids_are_unique_and_match_the_library_default() {
        let node = FakeNode::h100s(16);
        let mut uuids: Vec<&str> = node.gpus.iter().map(|g| g.uuid.as_str()).collect();
        assert_eq!(uuids[11], "GPU-00000000-0000-0000-0000-00000000000b");
        assert!(uuids.iter().all(|u| u.len() == 40)); // NVML_DEVICE_UUID_ASCII_LEN - 1
        uuids.sort_unstable();
        uuids.dedup();
        assert_eq!(uuids.len(), 16);
    }

    #[test]
    fn faults_render_as_numbers() {
        let mut node = FakeNode::h100s(2);
        let g = &mut node.gpus[1];
        g.temperature_c = 90;
        g.ecc_uncorrected_volatile = 2;
        g.throttle_reasons = 0x40;
        g.lost = true;
        g.nvlinks[2].active = false;
        g.nvlinks[2].replay_errors = 1000;
        g.nvlinks.truncate(3);
        let text = node.to_state().unwrap();
        for line in [
            "gpu_count 2",
            "gpu.1.temperature_c 90",
            "gpu.1.ecc_uncorrected_volatile 2",
            "gpu.1.throttle_reasons 64",
            "gpu.1.lost 1",
            "gpu.1.nvlink_links 3",
            "gpu.1.nvlink.2.active 0",
            "gpu.1.nvlink.2.replay_errors 1000",
            "gpu.0.lost 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(!text.contains("gpu.1.nvlink.3."));
        // Every non-comment line is `key value` with a single space after the key.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (key, value) = line.split_once(' ').unwrap();
            assert!(
                !key.is_empty() && !value.is_empty() && !value.starts_with(' '),
                "{line:?}"
            );
        }
    }

    #[test]
    fn an_empty_node_has_no_gpus() {
        assert_eq!(
            FakeNode::default().to_state().unwrap(),
            "# whaleflux fake NVML state\ngpu_count 0\n"
        );
    }

    #[test]
    fn what_the_format_cannot_carry_is_refused() {
        let mut node = FakeNode::h100s(1);
        node.gpus[0].name = "two\nlines".into();
        assert_eq!(
            node.to_state().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );

        let mut node = FakeNode::h100s(1);
        node.gpus[0].uuid = "x".repeat(96);
        assert_eq!(
            node.to_state().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        node.gpus[0].uuid = "x".repeat(95);
        assert!(node.to_state().is_ok());

        let mut node = FakeNode::h100s(1);
        node.gpus[0].nvlinks = vec![FakeLink::default(); MAX_NVLINKS + 1];
        assert_eq!(
            node.to_state().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );

        assert_eq!(
            FakeNode::h100s(MAX_GPUS + 1).to_state().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn write_replaces_the_file_and_leaves_no_temporary() {
        let dir = temp_dir("write");
        let path = dir.join("gpus.state");
        let mut node = FakeNode::h100s(2);
        node.write(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            node.to_state().unwrap()
        );

        node.gpus[0].temperature_c = 95;
        node.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().any(|l| l == "gpu.0.temperature_c 95"));

        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["gpus.state"]);

        // A refused node leaves the previous file untouched.
        node.gpus[1].name = "bad\nname".into();
        assert!(node.write(&path).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sources_are_where_build_looks() {
        for s in sources() {
            assert!(s.is_file(), "{}", s.display());
        }
    }
}
