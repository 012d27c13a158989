#!/usr/bin/env bash
# Coverage-guided fuzzing of the worker's untrusted-input parsers, on the stable toolchain.
#
#   scripts/fuzz.sh                   build, then run every target for WHALEFLUX_FUZZ_SECONDS
#   scripts/fuzz.sh gguf_load 600     one target (or several), for 600 s each
#   scripts/fuzz.sh --build           build only (so does WHALEFLUX_FUZZ_SECONDS=0)
#
# Targets (fuzz/fuzz_targets/): wire_frame (peer frames), handshake (the group handshake over
# in-memory streams), http_request (the OpenAI API through the real router and a tiny model),
# chat_template (templates and messages), gguf_load (reader, tokenizer, template, config, the
# whole model and every rank of a split).
#
# No nightly and no cargo-fuzz: libfuzzer-sys builds libFuzzer with the C++ compiler, and the
# SanitizerCoverage instrumentation libFuzzer needs (inline 8-bit counters, the PC table,
# comparison tracing) is switched on with stable rustc flags. `--target` keeps those flags off
# build scripts and proc macros, which are not linked against libFuzzer.
#
# Each run starts from the committed seeds (fuzz/seeds/<target>/) plus what earlier runs kept
# (fuzz/corpus/<target>/, ignored by git). A crash, panic, timeout or out-of-memory stops the
# target, leaves the input in fuzz/artifacts/<target>/, prints how to replay it, and makes this
# script exit non-zero (after the other targets ran).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(wire_frame handshake http_request chat_template gguf_load)
SECONDS_EACH="${WHALEFLUX_FUZZ_SECONDS:-20}"
# A single input taking longer than this is a hang.
TIMEOUT_EACH="${WHALEFLUX_FUZZ_TIMEOUT:-10}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="$PWD/fuzz/target"
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
BIN="$CARGO_TARGET_DIR/$TRIPLE/release"

build_only=0
if [[ "${1:-}" == "--build" ]]; then
  build_only=1
  shift
fi
if (( $# )); then
  if [[ $# -ge 2 && "${*: -1}" =~ ^[0-9]+$ ]]; then
    SECONDS_EACH="${*: -1}"
    set -- "${@:1:$#-1}"
  fi
  TARGETS=("$@")
fi

bins=()
for t in "${TARGETS[@]}"; do
  [[ -f "fuzz/fuzz_targets/$t.rs" ]] || { echo "no fuzz target $t (fuzz/fuzz_targets/$t.rs)" >&2; exit 2; }
  bins+=(--bin "$t")
done

# fuzz/Cargo.lock is committed; it must follow the worker's dependencies.
if ! (cd fuzz && cargo metadata --locked --format-version 1 >/dev/null); then
  echo "fuzz/Cargo.lock is out of date with the worker's dependencies: run" >&2
  echo "  (cd fuzz && cargo metadata --format-version 1 >/dev/null)" >&2
  echo "(adds what is missing, changes nothing else) and commit fuzz/Cargo.lock" >&2
  exit 1
fi
started=$(date +%s)
(cd fuzz && cargo build --release --locked --target "$TRIPLE" "${bins[@]}")
echo "fuzz build: $(( $(date +%s) - started )) s"
# (libFuzzer reads -max_total_time=0 as "no limit": 0 s here means build only.)
if (( build_only )) || [[ "$SECONDS_EACH" == 0 ]]; then
  exit 0
fi

failed=()
for t in "${TARGETS[@]}"; do
  corpus="fuzz/corpus/$t"
  artifacts="fuzz/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  # The committed seeds join the working corpus (new inputs go to the corpus only).
  if [[ -d "fuzz/seeds/$t" ]]; then
    cp -n fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  fi
  dict=()
  [[ -f "fuzz/seeds/$t.dict" ]] && dict=(-dict="fuzz/seeds/$t.dict")
  log="$artifacts/last-run.log"
  echo "--- $t: ${SECONDS_EACH} s"
  set +e
  "$BIN/$t" -max_total_time="$SECONDS_EACH" -timeout="$TIMEOUT_EACH" -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="$artifacts/" "${dict[@]}" \
    "$corpus" >"$log" 2>&1
  rc=$?
  set -e
  # Coverage at start and end, runs and speed.
  grep -E '^#[0-9]+[[:space:]]+INITED' "$log" | tail -1 || true
  grep -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse|DONE)' "$log" | tail -1 || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
  if (( rc != 0 )); then
    tail -n 60 "$log"
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    echo "FUZZ FAILURE in $t (exit $rc): input ${crash:-?}" >&2
    echo "  replay: $BIN/$t ${crash:-<input>}" >&2
    failed+=("$t")
  fi
done

if (( ${#failed[@]} )); then
  echo "fuzz targets that failed: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzzing: no failures in ${TARGETS[*]}"
