#!/bin/sh
# keyserver container: serve, and (once per database, whichever replica gets the lock) provision the demo.
set -eu
skm server run --config "${SKM_CONFIG:-/etc/skm/keyserver.toml}" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; exit 0' TERM INT
if ! python3 /opt/skm/docker/bootstrap.py provision; then
    kill -TERM "$server" 2>/dev/null || true
    exit 1
fi
wait "$server"
