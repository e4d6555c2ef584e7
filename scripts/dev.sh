#!/usr/bin/env bash
# Sets up the machine if needed, builds arca, and runs a single-node dev server on the
# embedded SQLite store with the audit log on (every request is audited; there is no off
# switch). Data, the dev unseal key and the root token live in .arca-dev/ (override with
# ARCA_DEV_DIR). Extra arguments go to `arcad dev` (e.g. --grpc-addr 127.0.0.1:8401).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -p arca-node --bins
# Where cargo put them (CARGO_TARGET_DIR, when it is set, moves the target directory).
bin="${CARGO_TARGET_DIR:-target}/release"
echo "dev: in another shell:  export ARCA_ADDR=http://127.0.0.1:8400 ARCA_TOKEN=\$(cat ${ARCA_DEV_DIR:-.arca-dev}/root-token)" >&2
echo "dev:                    $bin/arca kv put secret/hello greeting=world" >&2
exec "$bin/arcad" dev --data-dir "${ARCA_DEV_DIR:-.arca-dev}" "$@"
