#!/usr/bin/env bash
# Starts `durus-redb serve --database` on a new database of the PostgreSQL
# cluster named by DURUS_TEST_POSTGRES (scripts/pg.sh), the database named
# after DIR: run_against.py gives each scenario a new DIR, so each scenario
# gets a new, empty store, as with a new file.
#
#   serve_database.sh DURUS_REDB DIR SERVE-ARGS...
set -euo pipefail
bin="$1"; dir="$2"; shift 2
: "${DURUS_TEST_POSTGRES:?set DURUS_TEST_POSTGRES to the URL of a test cluster (scripts/pg.sh)}"
name="durus_interop_$(basename "$dir" | tr -c 'a-zA-Z0-9' _ | tr 'A-Z' 'a-z')"
psql -X -q -v ON_ERROR_STOP=1 "$DURUS_TEST_POSTGRES" -c "CREATE DATABASE $name" >/dev/null
exec "$bin" serve --database "${DURUS_TEST_POSTGRES%/*}/$name" "$@"
