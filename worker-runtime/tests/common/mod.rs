//! Shared helpers for the model tests.
#![allow(dead_code)]

use std::path::PathBuf;

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
