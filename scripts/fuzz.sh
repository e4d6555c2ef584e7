#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer) of every parser that takes outside input:
# audit events, replication change records, tuple-encoded keys, signed notes and
# checkpoints, tlog-tiles paths and bodies, policies and CIDRs, the node config, rotation
# schedules, what a SIEM consumer reads from the two Kafka topics (verify and watch), secret
# data, and the whole Vault HTTP and gRPC APIs and the replication listener in process. Fails on the first panic or broken round trip; the input that did it lands in
# fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                 every target for 60 s
#   scripts/fuzz.sh --secs 10       every target for 10 s (the CI smoke run)
#   scripts/fuzz.sh policy cron     some targets
#
# Stable Rust: cargo-fuzz's instrumentation flags are unlocked with RUSTC_BOOTSTRAP=1. No
# sanitizer: the fuzzed crates forbid unsafe code, so libFuzzer's own checks (panics,
# asserts, timeouts, memory limit) are what matters. Corpora persist in fuzz/corpus/;
# fuzz/seeds/<target>/ holds committed starting inputs for the API targets.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=60
targets=()
while (($#)); do
    case $1 in
        --secs) secs=$2; shift 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

command -v cargo-fuzz >/dev/null || {
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --version 0.13.2 -q
}
export RUSTC_BOOTSTRAP=1
cd fuzz
((${#targets[@]})) || mapfile -t targets < <(cargo fuzz list)
cargo fuzz build --sanitizer none -O
for target in "${targets[@]}"; do
    printf 'fuzz: %-16s ' "$target" >&2
    mkdir -p "corpus/$target"
    # Hand-written inputs that reach deep (fuzz/seeds/<target>), read but never written to.
    seeds=()
    if [[ -d "seeds/$target" ]]; then seeds=("seeds/$target"); fi
    log=$(mktemp)
    if ! cargo fuzz run --sanitizer none -O "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1; then
        echo "FAILED" >&2
        grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" >&2 || tail -20 "$log" >&2
        rm -f "$log"
        exit 1
    fi
    grep -E '^#[0-9]+.*DONE' "$log" | tail -1 | awk '{ printf "%s runs, coverage %s\n", substr($1, 2), $4 }' >&2
    rm -f "$log"
done
