#!/usr/bin/env bash
# Starts `durus-redb serve --database` on a new database of the PostgreSQL
# cluster named by DURUS_TEST_POSTGRES (scripts/pg.sh), the database named
# after DIR: run_against.py gives each scenario a new DIR, so each scenario
# gets a new, empty store, as with a new file.
#
#   serve_database.sh DURUS_REDB DIR [--also-port P2] SERVE-ARGS...
#
# With --also-port, a second front end over the same database serves on P2
# (SERVE-ARGS with its --port replaced), started first; both stop together.
set -euo pipefail
bin="$1"; dir="$2"; shift 2
also=""
if [ "${1:-}" = "--also-port" ]; then also="$2"; shift 2; fi
: "${DURUS_TEST_POSTGRES:?set DURUS_TEST_POSTGRES to the URL of a test cluster (scripts/pg.sh)}"
name="durus_interop_$(basename "$dir" | tr -c 'a-zA-Z0-9' _ | tr 'A-Z' 'a-z')"
psql -X -q -v ON_ERROR_STOP=1 "$DURUS_TEST_POSTGRES" -c "CREATE DATABASE $name" >/dev/null
url="${DURUS_TEST_POSTGRES%/*}/$name"
if [ -z "$also" ]; then
    exec "$bin" serve --database "$url" "$@"
fi
first=("$@")
second=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--port" ]; then second+=(--port "$also"); shift 2; else second+=("$1"); shift; fi
done
"$bin" serve --database "$url" "${second[@]}" &
fe2=$!
for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$also") 2>/dev/null && break
    sleep 0.1
done
"$bin" serve --database "$url" "${first[@]}" &
fe1=$!
trap 'kill $fe1 $fe2 2>/dev/null || true' TERM INT
trap 'kill $fe2 2>/dev/null || true; wait $fe2 2>/dev/null || true' EXIT
wait $fe1
