#!/usr/bin/env bash
# Build llama.cpp (llama-cpp-python 0.3.36, with its quantizer) from its PyPI source into a cached
# venv outside the repository and print that venv's python. The benchmark and the fidelity
# tests on K-quant files (made with llama.cpp's own quantizer) use it. ~10 minutes on 2 cores
# the first time; AMX is disabled in the build: some virtual machines advertise AMX but fault.
set -euo pipefail

CACHE="${WHALEFLUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whaleflux}"
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
  CMAKE_ARGS="$CMAKE_ARGS" "$LLAMA_VENV/bin/pip" install --quiet --no-cache-dir \
    --disable-pip-version-check llama-cpp-python==0.3.36 >&2
  echo "$CMAKE_ARGS" >"$LLAMA_VENV/cmake-args"
fi
echo "$LLAMA_VENV/bin/python"
