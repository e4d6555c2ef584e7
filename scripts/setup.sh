#!/usr/bin/env bash
# Installs what building and testing arca needs on a fresh Debian 12 machine, and nothing
# when it is already there. Safe to run again.
set -euo pipefail

need_apt=()
# bindgen (foundationdb-sys, for the `fdb` type-check) needs libclang.
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)

if ((${#need_apt[@]})); then
    echo "setup: installing ${need_apt[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

for tool in cargo cargo-clippy rustfmt; do
    command -v "$tool" >/dev/null || { echo "setup: $tool is missing: install the Rust toolchain with clippy and rustfmt" >&2; exit 1; }
done
