#!/usr/bin/env bash
# The test command: sets up a fresh machine, then runs every check and test.
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# On CI, incremental state only costs disk (several GB over a full run): turn it off.
if [[ -n "${CI:-}" ]]; then export CARGO_INCREMENTAL=0; fi
df -h . >&2 || true

step() { printf '\n== %s\n' "$*" >&2; }

step "formatting"
cargo fmt --all --check

step "clippy (default features)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# No FoundationDB server or client library can be installed here: the fdb backend and its
# conformance suite are type-checked and linted against the real API, never linked.
step "fdb backend: check and clippy (store, and arcad and arca-siem built with fdb)"
fdb_features=arca-store/fdb,arca-node/fdb,arca-siem-export/fdb
cargo check -p arca-store -p arca-node -p arca-siem-export --all-targets --features "$fdb_features" --locked
cargo clippy -p arca-store -p arca-node -p arca-siem-export --all-targets --features "$fdb_features" --locked -- -D warnings

# Coverage-guided fuzzing of every parser of outside input, 10 s per target: fails on any
# panic or broken round trip. Its instrumented build is removed afterwards on CI (disk).
step "fuzz smoke (scripts/fuzz.sh --secs 10)"
scripts/fuzz.sh --secs 10
if [[ -n "${CI:-}" ]]; then rm -rf fuzz/target; fi

# Smoke run of the side-by-side benchmark (debug build, short levels, no thresholds): it
# fails only if a request fails, so a broken load path cannot slip through.
step "bench-vs-openbao --quick"
scripts/bench-vs-openbao --quick

# The regional failover drill (debug build, short steady phase): fails if the promoted
# region lost a write the divergence report does not list, or the failback lost any.
step "failover drill --debug"
scripts/failover-drill --debug --steady-secs 2 --writers 4

# Chaos: the quick scenario set with a fixed seed (debug build): exits non-zero on any
# violated invariant; the report lands in target/chaos/.
step "chaos --debug --scenario quick --seed 1"
scripts/chaos --debug --scenario quick --seed 1 --out target/chaos

step "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
du -sh target >&2 || true
