//! `whaleflux crd` prints exactly the committed CRDs, ready for `kubectl apply -f -`.

mod common;

use std::process::Command;
use std::time::Duration;

#[test]
fn whaleflux_crd_prints_the_committed_crds() {
    let out = common::output_within(
        Command::new(env!("CARGO_BIN_EXE_whaleflux")).arg("crd"),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "whaleflux crd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).expect("UTF-8 YAML");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/manifests");
    let committed: Vec<String> = [
        "llmdeployments.whaleflux.io.yaml",
        "gpupools.whaleflux.io.yaml",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(dir.join(f)).expect("committed CRD"))
    .collect();
    assert_eq!(printed, committed.join("---\n"));
}
