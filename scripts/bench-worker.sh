#!/usr/bin/env bash
# Benchmark the WhaleFlux worker against llama.cpp (llama-cpp-python 0.3.36) on the same GGUF
# file with the same thread count, in the same run. Prints one JSON object with both figures
# and the ratios (whaleflux / llama.cpp; >1 means WhaleFlux is faster).
#
#   scripts/bench-worker.sh [MODEL.gguf] [THREADS]
#
# llama.cpp comes from scripts/llama-venv.sh (built from source once, cached).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="${1:-${WHALEFLUX_TEST_MODEL:-$(scripts/fetch-model.sh)}}"
THREADS="${2:-2}"

LLAMA_PY="$(scripts/llama-venv.sh)"

cargo build --release --locked -p whaleflux-worker >&2
OURS="$(target/release/whaleflux-worker bench --model "$MODEL" --threads "$THREADS")"

THEIRS="$("$LLAMA_PY" - "$MODEL" "$THREADS" <<'PY'
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
)"

python3 - "$OURS" "$THREADS" "$MODEL" "$THEIRS" <<'PY'
import json, sys
ours, threads, model, theirs = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
print(json.dumps({
    "model": model,
    "threads": threads,
    "whaleflux": ours,
    "llama_cpp": theirs,
    "decode_ratio": ours["decode_tok_s"] / theirs["decode_tok_s"],
    "prefill_ratio": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
    "goals": {"decode_ratio": 1.2, "prefill_ratio": 1.0},
}, indent=2))
PY
