#!/usr/bin/env bash
# Fuzzes every parser of outside input with cargo fuzz (libFuzzer, AddressSanitizer).
#   bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
# Exits non-zero at the first finding; the input that broke it is in fuzz/artifacts/TARGET/.
# Seeds are in fuzz/seeds/TARGET (checked in; `cargo test` replays them); what the fuzzer
# learns goes to fuzz/corpus/TARGET (not checked in) and is reused by the next run.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(config health_response grpc_timeout sniff)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
# cargo fuzz passes nightly flags (-Zsanitizer=address); this machine's one toolchain is
# stable, and RUSTC_BOOTSTRAP lets it take them. A nightly toolchain needs no such help.
export RUSTC_BOOTSTRAP=1

cargo fuzz build
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
    echo "== fuzz $target for ${seconds}s"
    mkdir -p "fuzz/corpus/$target"
    status=0
    cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    # Progress lines are many and say little; the rest (findings above all) is shown.
    grep -Ev '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$log" || true
    if [ "$status" -ne 0 ]; then
        echo "!!! fuzz target $target failed (exit $status); its input is in fuzz/artifacts/$target/" >&2
        exit "$status"
    fi
done
echo "fuzzing found nothing in ${#targets[@]} target(s), ${seconds}s each"
