//! The official `openai` Python package against the real server binary started with API keys:
//! completion, chat, streaming chat and logprobs with a key; a wrong or missing key refused as
//! OpenAI refuses it; health and metrics open. `WHALEFLUX_PYTHON` names a Python with `openai`
//! installed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::procs::{WorkerProc, http};
use serde_json::Value;

const SCRIPT: &str = r#"
import sys, urllib.request, openai
for path in ("/healthz", "/readyz", "/metrics"):
    assert urllib.request.urlopen(sys.argv[1] + path).status == 200, path
for bad in ("sk-wrong", "sk-flag-tw"):
    try:
        openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=bad, max_retries=0).models.list()
        raise SystemExit(f"key {bad!r} was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.body["code"] == "invalid_api_key", e.body
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2])
models = [m.id for m in c.models.list()]
assert models == ["smollm2"], models
r = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                         temperature=0, logprobs=2)
ch = r.choices[0]
assert ch.text.startswith(" Paris"), ch.text
assert ch.logprobs.tokens[0] == " Paris", ch.logprobs
assert len(ch.logprobs.top_logprobs[0]) == 2
assert abs(ch.logprobs.token_logprobs[0] + 0.26) < 0.1, ch.logprobs.token_logprobs
assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 4, r.usage
msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0,
                              logprobs=True, top_logprobs=3)
text = r.choices[0].message.content
assert "Paris" in text, text
lp = r.choices[0].logprobs.content
assert len(lp) >= 1 and len(lp[0].top_logprobs) == 3, lp
assert r.choices[0].finish_reason in ("stop", "length")
parts = []
for chunk in c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8,
                                       temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts) == text, (parts, text)
try:
    c.completions.create(model="smollm2", prompt="x", temperature=-1)
    raise SystemExit("negative temperature was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body
print("OPENAI-OK")
"#;

#[test]
fn official_openai_client_works_with_an_api_key() {
    let python = std::env::var("WHALEFLUX_PYTHON").unwrap_or_else(|_| {
        panic!(
            "WHALEFLUX_PYTHON is not set: point it at a Python with the `openai` package \
             (scripts/test.sh creates one in ~/.cache/whaleflux/venv)"
        )
    });
    let dir = std::env::temp_dir().join(format!("wf-openai-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // Keys from the flag (repeatable); the environment's are used when no flag is given.
    let w = WorkerProc::start(
        &dir,
        &[
            "--api-key".as_ref(),
            "sk-flag".as_ref(),
            "--api-key".as_ref(),
            "sk-flag-two".as_ref(),
        ],
        &[],
    );
    w.wait_for("ready", |w| w.get("/readyz").is_some());
    let url = format!("http://{}", w.addr);
    let out = whaleflux_e2e::output_within(
        Command::new(&python).args(["-c", SCRIPT, &url, "sk-flag-two"]),
        None,
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OPENAI-OK"),
        "python failed:\n{stdout}\n{}\nworker log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log_text()
    );
    // The other keys work too; without a key or with a wrong one: 401, an OpenAI error object
    // and `WWW-Authenticate`; health, readiness and metrics stay open.
    let body = r#"{"model": "smollm2", "prompt": "Hi", "max_tokens": 1}"#;
    let with_key = |w: &WorkerProc, key: &str| {
        let auth = format!("Bearer {key}");
        http(
            &w.addr,
            "POST",
            "/v1/completions",
            &[("Authorization", &auth)],
            body,
        )
        .expect("answer")
        .0
    };
    assert_eq!(with_key(&w, "sk-flag"), 200);
    for headers in [
        vec![],
        vec![("Authorization", "Bearer sk-wrong")],
        vec![("Authorization", "Basic c2stZmxhZw==")],
    ] {
        for (method, path) in [
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
        ] {
            let (code, head, answer) = http(&w.addr, method, path, &headers, body).expect("answer");
            assert_eq!(code, 401, "{method} {path} {headers:?}: {answer}");
            assert!(head.contains("www-authenticate: bearer"), "{head}");
            let v: Value = serde_json::from_str(&answer).expect("json error");
            assert_eq!(v["error"]["code"], "invalid_api_key", "{answer}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{answer}");
        }
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert!(w.get(path).is_some(), "{path} must answer without a key");
    }
    drop(w);
    // Several keys from WHALEFLUX_API_KEY (as a Secret's value reaches a pod), comma-separated.
    let w = WorkerProc::start(&dir, &[], &[("WHALEFLUX_API_KEY", "sk-env-one,sk-env-two")]);
    w.wait_for("ready", |w| w.get("/readyz").is_some());
    assert_eq!(with_key(&w, "sk-env-one"), 200);
    assert_eq!(with_key(&w, "sk-env-two"), 200);
    assert_eq!(with_key(&w, "sk-flag"), 401);
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}
