#!/usr/bin/env bash
# The main job on an embedded default: builds durus-redb, starts
# `durus-redb serve` on a new store in a temporary directory, runs an
# unchanged Python Durus application against it (examples/python/app.py),
# stops the server with `durus-redb stop`, and checks the store.
#
# Needs cargo and python3 (with venv); installs durus==4.3 into .venv.
# DURUS_REDB_BIN=PATH runs that durus-redb command (for example the one
# `pip install` put into a virtualenv) instead of building it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup-python.sh >/dev/null
if [ -n "${DURUS_REDB_BIN:-}" ]; then
    BIN="$DURUS_REDB_BIN"
else
    cargo build --release --bin durus-redb
    BIN="$ROOT/target/release/durus-redb"
fi
PY="$ROOT/.venv/bin/python"

DIR="$(mktemp -d "${TMPDIR:-/tmp}/durus-redb-demo.XXXXXX")"
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
SERVER=""
cleanup() {
    if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
        kill "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$DIR"
}
trap cleanup EXIT

echo "== durus-redb serve --file $DIR/demo.redb --port $PORT"
"$BIN" serve --file "$DIR/demo.redb" --port "$PORT" --logfile "$DIR/server.log" &
SERVER=$!
for _ in $(seq 1 200); do
    grep -q "Ready on" "$DIR/server.log" 2>/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$DIR/server.log"; exit 1; }
    sleep 0.05
done
grep -q "Ready on" "$DIR/server.log" || { echo "the server did not start" >&2; exit 1; }

echo "== a Python Durus application (examples/python/app.py)"
"$PY" examples/python/app.py --port "$PORT"

echo "== durus-redb stop --port $PORT"
"$BIN" stop --port "$PORT"
wait "$SERVER"
SERVER=""

echo "== durus-redb stats / check"
"$BIN" stats "$DIR/demo.redb"
"$BIN" check "$DIR/demo.redb"
echo "demo finished: the store was served, used by an unchanged Durus application, stopped cleanly and checks clean"
