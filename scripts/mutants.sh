#!/usr/bin/env bash
# Test strength of the pure core: cargo-mutants on operator/src/{planner,resources,status}
# (configured in .cargo/mutants.toml). Outside CI: about two hours on two cores.
#   scripts/mutants.sh                  # every mutant; report in target/mutants/mutants.out
#   scripts/mutants.sh -f operator/src/status/pool.rs   # extra cargo-mutants arguments
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null; then
  cargo install cargo-mutants --locked --version 27.1.0
fi
# Each mutant rebuilds the operator crate and links four test binaries: without debug info
# that is seconds, not tens of seconds.
export CARGO_PROFILE_DEV_DEBUG=0
export CARGO_INCREMENTAL=1
cargo mutants --no-shuffle --output target/mutants "$@" || status=$?
out=target/mutants/mutants.out
caught=$(wc -l <"$out/caught.txt")
missed=$(wc -l <"$out/missed.txt")
timeout=$(wc -l <"$out/timeout.txt")
unviable=$(wc -l <"$out/unviable.txt")
viable=$((caught + missed + timeout))
printf '{"viable":%d,"caught":%d,"timeout":%d,"missed":%d,"unviable":%d,"score_percent":%.1f}\n' \
  "$viable" "$caught" "$timeout" "$missed" "$unviable" \
  "$(python3 -c "print(100*($caught+$timeout)/max($viable,1))")"
if [[ $missed -gt 0 ]]; then
  echo "missed mutants (listed in $out/missed.txt):"
  cat "$out/missed.txt"
fi
exit "${status:-0}"
