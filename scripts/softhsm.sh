#!/usr/bin/env bash
# Initialises a SoftHSM2 token for arca's PKCS#11 seal in DIR (its own config and token
# directory, nothing system-wide) and prints the environment to use it:
#
#   eval "$(scripts/softhsm.sh /var/lib/arca/hsm arca 1234)"   # SOFTHSM2_CONF=…
#
# The node creates its AES key inside the token on `arca operator init` or `migrate-seal`.
# The user PIN goes to DIR/pin (mode 0600) for `pin_file` in the node's [seal] section.
set -euo pipefail
dir=${1:?usage: softhsm.sh DIR [TOKEN_LABEL] [PIN]}
label=${2:-arca}
pin=${3:-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}
command -v softhsm2-util >/dev/null || { echo "softhsm.sh: softhsm2 is missing: run scripts/setup.sh" >&2; exit 1; }
mkdir -p "$dir/tokens"
chmod 700 "$dir"
cat > "$dir/softhsm2.conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
export SOFTHSM2_CONF="$dir/softhsm2.conf"
if ! softhsm2-util --show-slots 2>/dev/null | grep -Eq "Label:[[:space:]]*$label[[:space:]]*\$"; then
    softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
    (umask 077 && printf '%s' "$pin" > "$dir/pin")
fi
echo "export SOFTHSM2_CONF=$dir/softhsm2.conf"
