#!/usr/bin/env bash
# A private PostgreSQL server for the dynamic database credentials engine (its tests, and
# trying it out): initialised in DIR on first use, listening on 127.0.0.1:PORT only, with
# password (SCRAM) authentication. Prints the admin connection URL for `arca db config`.
#
#   scripts/postgres.sh DIR PORT     # start (and initialise)
#   scripts/postgres.sh DIR PORT --tls CERT KEY [--client-ca CA]
#                                    # ... serving TLS with CERT/KEY (PEM); the admin user
#                                    # (postgres) may then only log in over TLS, and with
#                                    # --client-ca only with a client certificate CA signed
#                                    # for the name postgres (clientcert=verify-full)
#   scripts/postgres.sh DIR stop
set -euo pipefail
dir=${1:?usage: postgres.sh DIR PORT|stop [--tls CERT KEY]}
arg=${2:-55432}
tls=()
if [ "${3:-}" = --tls ]; then
    cert=${4:?usage: postgres.sh DIR PORT --tls CERT KEY}
    key=${5:?usage: postgres.sh DIR PORT --tls CERT KEY}
    if [ "${6:-}" = --client-ca ]; then
        client_ca=${7:?usage: postgres.sh DIR PORT --tls CERT KEY --client-ca CA}
    fi
fi
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
if [ -n "${cert:-}" ]; then
    # The server reads its key only if no one else can; the admin user gets TLS or nothing.
    install -m 600 "$cert" "$dir/server.crt"
    install -m 600 "$key" "$dir/server.key"
    [ "$(id -u)" -ne 0 ] || chown postgres "$dir/server.crt" "$dir/server.key"
    hba="$dir/data/pg_hba.conf"
    grep -q '^hostnossl all postgres' "$hba" || "${as[@]}" sed -i '1i hostnossl all postgres all reject' "$hba"
    tls=(-c ssl=on -c "ssl_cert_file=$dir/server.crt" -c "ssl_key_file=$dir/server.key")
    if [ -n "${client_ca:-}" ]; then
        install -m 600 "$client_ca" "$dir/client-ca.crt"
        [ "$(id -u)" -ne 0 ] || chown postgres "$dir/client-ca.crt"
        grep -q '^hostssl all postgres' "$hba" ||
            "${as[@]}" sed -i '1i hostssl all postgres all scram-sha-256 clientcert=verify-full' "$hba"
        tls+=(-c "ssl_ca_file=$dir/client-ca.crt")
    fi
fi
"${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" \
    -o "-p $arg -k $dir -c listen_addresses=127.0.0.1 ${tls[*]}" -w start >/dev/null
echo "postgres://postgres:$(cat "$dir/admin-password")@127.0.0.1:$arg/postgres"
