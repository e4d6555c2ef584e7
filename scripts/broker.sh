#!/usr/bin/env bash
# Starts the Kafka-protocol broker (tansu 0.6.0, installed by scripts/setup.sh) on
# loopback, in the foreground. Usage: scripts/broker.sh [port]   (default 9092)
# Storage is in memory unless TANSU_STORAGE names another engine (e.g. s3://tansu/ with
# AWS_ENDPOINT and credentials in the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
port="${1:-9092}"
exec .tools/tansu broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "${TANSU_STORAGE:-memory://tansu/}"
