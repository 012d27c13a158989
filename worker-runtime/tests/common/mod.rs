//! Shared helpers for the model tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The SmolLM2 GGUF file; fails (never skips) with the way to get it.
pub fn model_path() -> PathBuf {
    let hint = "set WHALEFLUX_TEST_MODEL to the SmolLM2-135M-Instruct Q4_1 GGUF: run \
                `export WHALEFLUX_TEST_MODEL=$(scripts/fetch-model.sh)` from the repository root";
    let p = std::env::var_os("WHALEFLUX_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("WHALEFLUX_TEST_MODEL is not set; {hint}"));
    assert!(
        p.is_file(),
        "WHALEFLUX_TEST_MODEL={} is not a file; {hint}",
        p.display()
    );
    p
}

/// `variant` of the SmolLM2 file, made once per target directory by `make(src, part)`.
pub fn derived(variant: &str, make: impl FnOnce(&str, &str)) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fidelity");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("SmolLM2-135M-Instruct.{variant}.gguf"));
    if !path.is_file() {
        let part = path.with_extension("part");
        let src = model_path();
        make(
            src.to_str().expect("utf-8 path"),
            part.to_str().expect("utf-8 path"),
        );
        std::fs::rename(&part, &path).expect("rename");
    }
    path
}

/// Runs `tests/python/derive_gguf.py` (gguf-py) with `WHALEFLUX_PYTHON`.
pub fn derive_gguf(args: &[&str]) {
    let python = std::env::var_os("WHALEFLUX_PYTHON")
        .expect("WHALEFLUX_PYTHON: a Python with gguf==0.19.0 (scripts/test.sh makes one)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/derive_gguf.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .expect("run derive_gguf.py");
    assert!(
        out.status.success(),
        "derive_gguf.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
pub mod procs;
