//! `whaleflux plan` as a user runs it: the real binary, its JSON/YAML/table output, its exit
//! codes and error messages.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use whaleflux_operator::plan_cmd::PlanDocument;

fn path(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}

fn whaleflux(args: &[&str]) -> Output {
    common::output_within(
        Command::new(env!("CARGO_BIN_EXE_whaleflux")).args(args),
        Duration::from_secs(60),
    )
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

/// Exit code and stderr of a failing run; stdout must be empty.
fn failure(out: &Output) -> (i32, String) {
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stderr.clone()).expect("UTF-8"),
    )
}

#[test]
fn json_is_one_object_with_chosen_and_rejected() {
    let smol = path("../examples/smollm2-135m.yaml");
    let text = stdout(&whaleflux(&[
        "plan",
        "-f",
        &smol,
        "--gpus",
        "1x4xRTX4090",
        "-o",
        "json",
    ]));
    // Exactly one JSON value on stdout.
    let mut stream = serde_json::Deserializer::from_str(&text).into_iter::<Value>();
    let v = stream.next().expect("one value").expect("valid JSON");
    assert!(stream.next().is_none(), "more than one JSON value");
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.keys().collect::<Vec<_>>(), vec!["chosen", "rejected"]);
    let c = &v["chosen"];
    assert_eq!(c["tensorParallel"], 1);
    assert_eq!(c["pipelineParallel"], 1);
    assert_eq!(c["gpusPerReplica"], 1);
    assert_eq!(c["crossesNodes"], false);
    assert_eq!(c["gpuModel"], "RTX4090");
    assert_eq!(c["stages"][0]["layers"], serde_json::json!([0, 30]));
    assert_eq!(c["stages"][0]["node"], "node-0");
    for part in [
        "weights",
        "kvCache",
        "activations",
        "overhead",
        "total",
        "usable",
    ] {
        assert!(
            c["memoryPerGpuBytes"][part].as_i64().is_some_and(|b| b > 0),
            "{part}"
        );
    }
    assert!(
        c["estimate"]["timePerTokenMs"]
            .as_f64()
            .is_some_and(|t| t > 0.0)
    );
    assert!(
        c["estimate"]["decodeTokensPerSecond"]
            .as_f64()
            .is_some_and(|t| t > 0.0)
    );
    assert!(
        c.get("rejected").is_none(),
        "rejected belongs beside chosen"
    );
    let rejected = v["rejected"].as_array().expect("array");
    assert!(!rejected.is_empty());
    assert!(
        rejected
            .iter()
            .all(|r| r["reason"].as_str().is_some_and(|s| !s.is_empty()))
    );
    let doc: PlanDocument = serde_json::from_value(v).expect("a PlanDocument");
    assert_eq!(doc.chosen.model, "smollm2-135m");
}

#[test]
fn pool_manifest_leaves_out_unhealthy_nodes() {
    // Two groups of a fixed TP 8 take a whole node each, so the second group must go to the one
    // other healthy node: gpu-d (its quarantine ended in 2020), not gpu-b (not Ready) nor gpu-c
    // (quarantined until 2099), which are first in name order.
    let manifest =
        std::env::temp_dir().join(format!("wf-plan-70b-tp8-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(path("../examples/llama-3.1-70b.yaml")).expect("example");
    let mut d: serde_yaml::Value = serde_yaml::from_str(&text).expect("example parses");
    d["spec"]["replicas"] = 2.into();
    d["spec"]["parallelism"] =
        serde_yaml::from_str("{tensorParallel: 8, pipelineParallel: 1}").expect("yaml");
    std::fs::write(&manifest, serde_yaml::to_string(&d).expect("yaml")).expect("write");
    let out = whaleflux(&[
        "plan",
        "-f",
        manifest.to_str().expect("path"),
        "--pool",
        &path("tests/fixtures/gpupool-h100-status.yaml"),
        "-o",
        "yaml",
    ]);
    let _ = std::fs::remove_file(&manifest);
    let doc: PlanDocument = serde_yaml::from_str(&stdout(&out)).expect("YAML PlanDocument");
    let used: Vec<&str> = doc
        .chosen
        .groups
        .iter()
        .flat_map(|g| g.nodes.iter().map(String::as_str))
        .collect();
    assert_eq!(used, ["gpu-a", "gpu-d"], "placed on {used:?}");
    let notes = doc.chosen.notes.join("\n");
    assert!(notes.contains("gpu-b left out"), "{notes}");
    assert!(notes.contains("gpu-c left out"), "{notes}");
    assert!(!notes.contains("gpu-d left out"), "{notes}");
}

#[test]
fn pool_list_with_override_is_accepted() {
    let out = whaleflux(&[
        "plan",
        "-f",
        &path("../examples/smollm2-135m.yaml"),
        "--pool",
        &path("tests/fixtures/gpupool-rtx4090-list.yaml"),
        "-o",
        "json",
    ]);
    let doc: PlanDocument = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(doc.chosen.gpu_model, "RTX4090");
}

#[test]
fn table_shows_memory_parts_and_says_estimated() {
    let out = whaleflux(&[
        "plan",
        "-f",
        &path("tests/fixtures/llama-405b.yaml"),
        "--gpus",
        "4x8xH100",
        "--network",
        "infiniband",
    ]);
    let table = stdout(&out);
    for want in [
        "Plan for llama-3.1-405b (bf16) on H100",
        "weights",
        "KV cache",
        "activations",
        "overhead",
        "usable",
        "Estimated (cost model, not measured)",
        "Rejected options",
        "more in -o json / -o yaml",
    ] {
        assert!(table.contains(want), "missing {want:?} in\n{table}");
    }
}

#[test]
fn network_sets_the_speed_of_a_split_across_nodes() {
    let file = path("tests/fixtures/llama-405b-tp16.yaml");
    let run = |net: &str| -> PlanDocument {
        let out = whaleflux(&[
            "plan",
            "-f",
            &file,
            "--gpus",
            "2x8xH100",
            "--network",
            net,
            "-o",
            "json",
        ]);
        serde_json::from_str(&stdout(&out)).expect("JSON")
    };
    let (ib, eth) = (run("infiniband"), run("ethernet"));
    assert!(ib.chosen.crosses_nodes && eth.chosen.crosses_nodes);
    assert_eq!(ib.chosen.stages[0].node, "node-0+node-1");
    assert!(ib.chosen.notes.iter().any(|n| n.contains("spans nodes")));
    assert!(
        eth.chosen.estimate.time_per_token_ms > 2.0 * ib.chosen.estimate.time_per_token_ms,
        "ethernet {} vs infiniband {}",
        eth.chosen.estimate.time_per_token_ms,
        ib.chosen.estimate.time_per_token_ms
    );
}

#[test]
fn illegal_fixed_tp_exits_2_with_one_sentence() {
    let out = whaleflux(&[
        "plan",
        "-f",
        &path("tests/fixtures/smollm2-tp2.yaml"),
        "--gpus",
        "1x4xRTX4090",
    ]);
    let (code, err) = failure(&out);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "error: smollm2-135m: tensor parallel 2 does not divide the 9 attention heads; legal: 1, 3\n"
    );
}

#[test]
fn nothing_fits_exits_2_naming_the_numbers() {
    let out = whaleflux(&[
        "plan",
        "-f",
        &path("tests/fixtures/llama-405b.yaml"),
        "--gpus",
        "1x8xH100",
        "-o",
        "json",
    ]);
    let (code, err) = failure(&out);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: no split of llama-3.1-405b (bf16) fits the pool (8 H100 GPUs free"),
        "{err}"
    );
    assert!(err.contains("GiB is usable on each H100"), "{err}");
}

#[test]
fn input_errors_exit_1_naming_the_file() {
    let smol = path("../examples/smollm2-135m.yaml");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec![
                "-f".into(),
                path("tests/fixtures/no-such-file.yaml"),
                "--gpus".into(),
                "8xH100".into(),
            ],
            vec!["reading", "no-such-file.yaml"],
        ),
        (
            vec![
                "-f".into(),
                path("tests/fixtures/not-yaml.yaml"),
                "--gpus".into(),
                "8xH100".into(),
            ],
            vec![
                "not-yaml.yaml",
                "not a valid LlmDeployment manifest",
                "line 4",
            ],
        ),
        (
            vec![
                "-f".into(),
                path("tests/fixtures/gpupool-h100-status.yaml"),
                "--gpus".into(),
                "8xH100".into(),
            ],
            vec![
                "gpupool-h100-status.yaml",
                "expected kind LlmDeployment, found \"GpuPool\"",
            ],
        ),
        (
            vec![
                "-f".into(),
                smol.clone(),
                "--pool".into(),
                path("tests/fixtures/gpupool-unknown-gpu.yaml"),
            ],
            vec!["unknown GPU model \"NVIDIA-B300\"", "spec.gpu.model"],
        ),
        (
            vec!["-f".into(), smol, "--gpus".into(), "2x8xB300".into()],
            vec!["--gpus", "2x8xB300", "unknown GPU model"],
        ),
    ];
    for (args, wants) in cases {
        let mut full = vec!["plan"];
        full.extend(args.iter().map(String::as_str));
        let (code, err) = failure(&whaleflux(&full));
        assert_eq!(code, 1, "{args:?}: {err}");
        for want in wants {
            assert!(err.contains(want), "{args:?}: missing {want:?} in {err}");
        }
    }
}
