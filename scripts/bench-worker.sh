#!/usr/bin/env bash
# Benchmark the WhaleFlux worker against llama.cpp (llama-cpp-python 0.3.36) on the same GGUF
# file with the same thread count, in the same run. Prints one JSON object with both figures
# and the ratios (whaleflux / llama.cpp; >1 means WhaleFlux is faster).
#
#   scripts/bench-worker.sh [MODEL.gguf] [THREADS]
#
# llama-cpp-python is built from its PyPI source into a cached venv outside the repository
# ($WHALEFLUX_CACHE/llama-venv, ~10 minutes on 2 cores the first time). AMX is disabled in that
# build: some virtual machines advertise AMX but fault on it.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${WHALEFLUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whaleflux}"
MODEL="${1:-${WHALEFLUX_TEST_MODEL:-$(scripts/fetch-model.sh)}}"
THREADS="${2:-2}"
LLAMA_VENV="$CACHE/llama-venv"

# llama.cpp's SIMD options follow this CPU's flags (a flag it lacks would be SIGILL); the venv
# is rebuilt when they differ from those it was built with.
has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)"
CMAKE_ARGS+=" -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX512=$(has avx512f)"
CMAKE_ARGS+=" -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni)"
CMAKE_ARGS+=" -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni)"
CMAKE_ARGS+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
if [[ "$(cat "$LLAMA_VENV/cmake-args" 2>/dev/null)" != "$CMAKE_ARGS" ]] \
  || ! "$LLAMA_VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  echo "building llama-cpp-python 0.3.36 into $LLAMA_VENV (one-time, ~10 min): $CMAKE_ARGS" >&2
  rm -rf "$LLAMA_VENV"
  python3 -m venv "$LLAMA_VENV"
  CMAKE_ARGS="$CMAKE_ARGS" "$LLAMA_VENV/bin/pip" install --quiet --no-cache-dir llama-cpp-python==0.3.36 >&2
  echo "$CMAKE_ARGS" >"$LLAMA_VENV/cmake-args"
fi

cargo build --release --locked -p whaleflux-worker >&2
OURS="$(target/release/whaleflux-worker bench --model "$MODEL" --threads "$THREADS")"

THEIRS="$("$LLAMA_VENV/bin/python" - "$MODEL" "$THREADS" <<'PY'
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
