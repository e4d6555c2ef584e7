#!/usr/bin/env bash
# A private PostgreSQL server for the dynamic database credentials engine (its tests, and
# trying it out): initialised in DIR on first use, listening on 127.0.0.1:PORT only, with
# password (SCRAM) authentication. Prints the admin connection URL for `arca db config`.
#
#   scripts/postgres.sh DIR PORT     # start (and initialise)
#   scripts/postgres.sh DIR stop
set -euo pipefail
dir=${1:?usage: postgres.sh DIR PORT|stop}
arg=${2:-55432}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "postgres.sh: PostgreSQL is missing: run scripts/setup.sh" >&2; exit 1; }
as=()
if [ "$(id -u)" -eq 0 ]; then as=(runuser -u postgres --); fi
if [ "$arg" = stop ]; then
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null
    exit 0
fi
mkdir -p "$dir"
[ "$(id -u)" -ne 0 ] || chown postgres "$dir"
chmod 700 "$dir"
if [ ! -f "$dir/data/PG_VERSION" ]; then
    (umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/admin-password")
    [ "$(id -u)" -ne 0 ] || chown postgres "$dir/admin-password"
    "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/admin-password" -A scram-sha-256 >/dev/null
fi
"${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" \
    -o "-p $arg -k $dir -c listen_addresses=127.0.0.1" -w start >/dev/null
echo "postgres://postgres:$(cat "$dir/admin-password")@127.0.0.1:$arg/postgres"
