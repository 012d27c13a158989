//! The official `openai` Python package against the real server binary: completion, chat,
//! streaming chat and logprobs. `WHALEFLUX_PYTHON` names a Python with `openai` installed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
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
fn official_openai_client_works() {
    let model = common::model_path();
    let python = std::env::var("WHALEFLUX_PYTHON").unwrap_or_else(|_| {
        panic!(
            "WHALEFLUX_PYTHON is not set: point it at a Python with the `openai` package \
             (scripts/test.sh creates one in ~/.cache/whaleflux/venv)"
        )
    });
    let mut server = Command::new(env!("CARGO_BIN_EXE_whaleflux-worker"))
        .args([
            "serve",
            "--threads",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .args(["--model-name", "smollm2", "--ctx", "512", "--model"])
        .arg(&model)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start whaleflux-worker");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = server.stderr.take().expect("stderr");
    let _guard = Kill(server);
    // The log is read on its own thread, so a server that hangs without printing cannot hang
    // the test: the wait below has a deadline whatever the server does.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut addr = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("server not ready in 60 s"),
            Err(_) => panic!("server exited before it was ready"),
        };
        if let Some(rest) = line.split("addr=").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_string);
        }
        if line.contains("ready") {
            break;
        }
    }
    let addr = addr.expect("server printed its address");
    std::thread::spawn(move || for _ in rx {});
    let out = whaleflux_e2e::output_within(
        Command::new(python).args(["-c", SCRIPT, &format!("http://{addr}")]),
        None,
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OPENAI-OK"),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
