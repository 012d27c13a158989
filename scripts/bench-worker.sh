#!/usr/bin/env bash
# Benchmark the WhaleFlux worker against llama.cpp (llama-cpp-python 0.3.36) on the same GGUF
# file with the same thread count, in the same run, the engines taking turns for ROUNDS (5)
# rounds. Prints one JSON object with both engines' median figures and every run's, and the
# median of the rounds' ratios (whaleflux / llama.cpp; >1 means WhaleFlux is faster).
#
#   [ROUNDS=N] scripts/bench-worker.sh [MODEL.gguf] [THREADS]
#
# llama.cpp comes from scripts/llama-venv.sh (built from source once, cached).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="${1:-${WHALEFLUX_TEST_MODEL:-$(scripts/fetch-model.sh)}}"
THREADS="${2:-2}"

LLAMA_PY="$(scripts/llama-venv.sh)"

cargo build --release --locked -p whaleflux-worker >&2

# This machine's speed drifts (shared cores): the two engines take turns, ROUNDS times, and
# each round's ratio compares runs a few seconds apart. The medians are reported.
ROUNDS="${ROUNDS:-5}"
ours_runs=()
theirs_runs=()
for ((round = 1; round <= ROUNDS; round++)); do
  ours_runs+=("$(target/release/whaleflux-worker bench --model "$MODEL" --threads "$THREADS")")
  theirs_runs+=("$("$LLAMA_PY" - "$MODEL" "$THREADS" <<'PY'
import json, sys, time
import llama_cpp
model, threads = sys.argv[1], int(sys.argv[2])
llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_batch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()
prompt = llm.tokenize(b"The capital of France is", add_bos=False, special=True)
def decode(n):
    llm.reset()
    llm.eval(prompt)
    tok = llm.sample(temp=0.0)
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
    return n / (time.perf_counter() - t0)
decode(8)  # warm-up
dec = decode(128)
long = [(i * 7919 + 17) % vocab for i in range(500)]
llm.reset()
t0 = time.perf_counter()
llm.eval(long)
pre = 500 / (time.perf_counter() - t0)
print(json.dumps({"engine": "llama.cpp", "decode_tok_s": dec, "prefill_tok_s": pre}))
PY
)")
done

python3 - "$THREADS" "$MODEL" "$(printf '%s\n' "${ours_runs[@]}")" "$(printf '%s\n' "${theirs_runs[@]}")" <<'PY'
import json, statistics, sys
threads, model = int(sys.argv[1]), sys.argv[2]
ours = [json.loads(l) for l in sys.argv[3].splitlines() if l.strip()]
theirs = [json.loads(l) for l in sys.argv[4].splitlines() if l.strip()]
med = statistics.median
def summary(runs):
    out = dict(runs[0])
    for k in ("decode_tok_s", "prefill_tok_s"):
        out[k] = med(r[k] for r in runs)
        out[k.replace("_tok_s", "_runs")] = [round(r[k], 1) for r in runs]
    return out
ratios = {k: sorted(o[k + "_tok_s"] / t[k + "_tok_s"] for o, t in zip(ours, theirs))
          for k in ("decode", "prefill")}
print(json.dumps({
    "model": model,
    "threads": threads,
    "rounds": len(ours),
    "whaleflux": summary(ours),
    "llama_cpp": summary(theirs),
    "decode_ratio": med(ratios["decode"]),
    "prefill_ratio": med(ratios["prefill"]),
    "decode_ratio_range": [round(ratios["decode"][0], 3), round(ratios["decode"][-1], 3)],
    "prefill_ratio_range": [round(ratios["prefill"][0], 3), round(ratios["prefill"][-1], 3)],
    "goals": {"decode_ratio": 1.2, "prefill_ratio": 1.0},
}, indent=2))
PY
