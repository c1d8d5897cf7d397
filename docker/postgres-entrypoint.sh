#!/bin/sh
# Debian's PostgreSQL with the official image's environment (POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB, PGDATA), for machines that build their images locally instead of pulling postgres.
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}" "${PGDATA:=/var/lib/postgresql/data}"
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pw=$(mktemp); printf '%s\n' "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}" > "$pw"; chown postgres "$pw"
    su postgres -s /bin/sh -c "$BIN/initdb -D '$PGDATA' -U '$POSTGRES_USER' --pwfile='$pw' --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8" >/dev/null
    rm -f "$pw"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    su postgres -s /bin/sh -c "$BIN/pg_ctl -D '$PGDATA' -w -o '-c listen_addresses=' start" >/dev/null
    if [ "$POSTGRES_DB" != "postgres" ]; then
        su postgres -s /bin/sh -c "$BIN/createdb -h /run/postgresql -U '$POSTGRES_USER' '$POSTGRES_DB'"
    fi
    su postgres -s /bin/sh -c "$BIN/pg_ctl -D '$PGDATA' -w stop" >/dev/null
fi
exec su postgres -s /bin/sh -c "exec $BIN/postgres -D '$PGDATA' -c listen_addresses='*'"
