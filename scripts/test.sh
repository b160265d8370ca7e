#!/usr/bin/env bash
# The project's single test command: formatting, lints, the Rust tests, and
# the Python interop suite (unchanged Durus 4.3 clients against durus-redb,
# compared with Durus's own server).  Runs every step, then prints a
# summary; exits non-zero if any step failed.
#
# Needs: cargo (with rustfmt and clippy), python3 with venv, network access
# to PyPI the first time (scripts/setup-python.sh installs durus==4.3 into
# .venv), and a PostgreSQL server installed (scripts/pg.sh runs a throwaway
# cluster).  DURUS_PYTHON, DURUS_BIN and DURUS_TEST_POSTGRES are exported
# for the Rust tests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "== setup-python"
"$ROOT/scripts/setup-python.sh" >/dev/null
export DURUS_PYTHON="${DURUS_PYTHON:-$ROOT/.venv/bin/python}"
export DURUS_BIN="${DURUS_BIN:-$ROOT/.venv/bin/durus}"
for f in "$DURUS_PYTHON" "$DURUS_BIN"; do
    [ -x "$f" ] || { echo "test.sh: $f is not executable" >&2; exit 1; }
done
echo "DURUS_PYTHON=$DURUS_PYTHON"
echo "DURUS_BIN=$DURUS_BIN"

# A throwaway PostgreSQL cluster for the tests of `serve --database` (the
# tests fail without one: they are never skipped). DURUS_TEST_POSTGRES may
# name a running one instead.
if [ -z "${DURUS_TEST_POSTGRES:-}" ]; then
    PG_DIR="$(mktemp -d /tmp/durus-redb-pg.XXXXXX)"
    trap 'bash "$ROOT/scripts/pg.sh" stop "$PG_DIR" >/dev/null 2>&1 || true' EXIT
    DURUS_TEST_POSTGRES="$(bash "$ROOT/scripts/pg.sh" start "$PG_DIR")" || {
        echo "test.sh: could not start PostgreSQL (scripts/pg.sh); install the" \
             "postgresql package" >&2
        exit 1
    }
fi
export DURUS_TEST_POSTGRES
echo "DURUS_TEST_POSTGRES=$DURUS_TEST_POSTGRES"

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
SERVER_BIN="$TARGET_DIR/debug/durus-redb"
RUN_AGAINST=("$DURUS_PYTHON" "$ROOT/tests/python/run_against.py"
             --python "$DURUS_PYTHON")

SUMMARY=()
FAILED=0

# No step may run for ever: one that hangs is stopped after STEP_LIMIT
# seconds (the whole test run must end well inside CI's 90 minutes) and
# counts as failed; the steps after it still run.
STEP_LIMIT="${STEP_LIMIT:-1800}"

limited() {  # limited SECONDS COMMAND...: runs it in its own process group
    local limit="$1"; shift
    set -m
    "$@" &
    local pid=$!
    set +m
    # The watchdog holds none of the script's output open, and ends within
    # a second of the step.
    (
        for ((i = 0; i < limit; i++)); do
            sleep 1
            kill -0 "$pid" 2>/dev/null || exit 0
        done
        kill -TERM -- "-$pid" 2>/dev/null
        sleep 10
        kill -KILL -- "-$pid" 2>/dev/null
    ) </dev/null >/dev/null 2>&1 &
    local watchdog=$!
    local rc=0
    wait "$pid" || rc=$?
    kill "$watchdog" 2>/dev/null || true
    wait "$watchdog" 2>/dev/null || true
    return "$rc"
}

step() {  # step NAME COMMAND...
    local name="$1"; shift
    local start=$SECONDS
    echo
    echo "== $name"
    echo "+ $*"
    if limited "$STEP_LIMIT" "$@"; then
        SUMMARY+=("PASS  $(printf '%4ss' $((SECONDS - start)))  $name")
    else
        local rc=$?
        local why="exit $rc"
        if [ $((SECONDS - start)) -ge "$STEP_LIMIT" ]; then
            why="stopped after ${STEP_LIMIT}s: it hung"
            echo "test.sh: $name: still running after ${STEP_LIMIT}s, stopped" >&2
        fi
        SUMMARY+=("FAIL  $(printf '%4ss' $((SECONDS - start)))  $name ($why)")
        FAILED=1
    fi
}

lib_alone() {
    cargo build --lib --no-default-features || return 1
    local heavy
    heavy=$(cargo tree --no-default-features -e normal --prefix none \
        | grep -E '^(clap|indicatif|rusqlite|tracing-subscriber|signal-hook|nix|postgres|tokio|tokio-postgres|rustls|ring) ' || true)
    if [ -n "$heavy" ]; then
        echo "the library alone depends on: $heavy" >&2
        return 1
    fi
}

have_server() {
    [ -x "$SERVER_BIN" ] && "$SERVER_BIN" serve --help >/dev/null 2>&1 || {
        echo "test.sh: $SERVER_BIN has no working 'serve' subcommand;" \
             "the interop suite cannot run (this is a failure, not a skip)" >&2
        return 1
    }
}

interop() {  # interop TRANSPORT-ARGS (e.g. "--port {port}")
    have_server || return 1
    "${RUN_AGAINST[@]}" \
        --server-cmd "$SERVER_BIN serve --file {file} $1" \
        --compare-cmd "$DURUS_BIN -s --file {file} $1" --quiet
}

snapshot_interop() {  # the scenarios against snapshot reads; each checks itself
    have_server || return 1
    "${RUN_AGAINST[@]}" \
        --server-cmd "$SERVER_BIN serve --file {file} --port {port} --snapshot-reads" \
        --interop-arg=--snapshot-reads --quiet
}

memory_interop() {
    have_server || return 1
    "${RUN_AGAINST[@]}" \
        --server-cmd "$SERVER_BIN serve --memory --port {port}" \
        --compare-cmd "$DURUS_BIN -s --file {file} --port {port}" --quiet
}

database_interop() {  # a new database of the test cluster for each scenario
    have_server || return 1
    "${RUN_AGAINST[@]}" \
        --server-cmd "bash $ROOT/tests/python/serve_database.sh $SERVER_BIN {dir} --port {port} --alone-after 0" \
        --compare-cmd "$DURUS_BIN -s --file {file} --port {port}" --quiet
}

step "python harness compiles" "$DURUS_PYTHON" -m py_compile \
    tests/python/interop.py tests/python/run_against.py
step "cargo fmt --check" cargo fmt --all -- --check
# `fuzzing` exposes the fuzz targets' entry points that tests/fuzz.rs runs.
step "cargo clippy" cargo clippy --all-targets --features fuzzing -- -D warnings
step "cargo test" cargo test --all-targets --features fuzzing
step "doctests (the crate docs' quick start and examples)" cargo test --doc
step "library without default features (no CLI, SQLite or PostgreSQL crates)" lib_alone
step "cargo doc, warnings denied" env RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
step "cargo build durus-redb" cargo build --bin durus-redb
step "interop harness: durus -s vs durus -s (deterministic?)" \
    "${RUN_AGAINST[@]}" \
    --server-cmd "$DURUS_BIN -s --file {file} --port {port}" \
    --compare-cmd "$DURUS_BIN -s --file {file} --port {port}" --shared-server \
    --quiet
step "interop: durus-redb vs durus -s over TCP" interop "--port {port}"
step "interop: durus-redb vs durus -s over a Unix socket" \
    interop "--address {address}"
step "interop: durus-redb --snapshot-reads (read_conflict's stated difference)" \
    snapshot_interop
# The same scenarios against the in-memory store behind the server's
# backend seam: the seam serves Durus's protocol with either store.
step "interop: durus-redb serve --memory vs durus -s over TCP" \
    memory_interop
step "interop: durus-redb serve --memory --snapshot-reads" \
    "${RUN_AGAINST[@]}" \
    --server-cmd "$SERVER_BIN serve --memory --port {port} --snapshot-reads" \
    --interop-arg=--snapshot-reads --quiet
# And against a PostgreSQL database (serve --database). With
# `--alone-after 0` a front end holds the database alone as soon as no
# other commits (a tenth of a second after it starts): one front end then
# answers from memory; two hand the hold to each other as their clients
# commit in turn. `--alone-after never`: every load reads the database.
step "interop: durus-redb serve --database (PostgreSQL) vs durus -s over TCP" \
    database_interop
step "interop: durus-redb serve --database --alone-after never vs durus -s" \
    "${RUN_AGAINST[@]}" \
    --server-cmd "bash $ROOT/tests/python/serve_database.sh $SERVER_BIN {dir} --port {port} --alone-after never" \
    --compare-cmd "$DURUS_BIN -s --file {file} --port {port}" --quiet
step "interop: two front ends over one PostgreSQL database (clients alternate) vs durus -s" \
    "${RUN_AGAINST[@]}" \
    --server-cmd "bash $ROOT/tests/python/serve_database.sh $SERVER_BIN {dir} --also-port {port2} --port {port} --alone-after 0" \
    --compare-cmd "$DURUS_BIN -s --file {file} --port {port}" --quiet
step "interop: durus-redb serve --database --snapshot-reads" \
    "${RUN_AGAINST[@]}" \
    --server-cmd "bash $ROOT/tests/python/serve_database.sh $SERVER_BIN {dir} --port {port} --snapshot-reads" \
    --interop-arg=--snapshot-reads --quiet
step "wheel: built, installed into a fresh venv, the demo run with the installed command" \
    bash scripts/wheel.sh

echo
echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
    echo "test.sh: FAILED"
    exit 1
fi
echo "test.sh: all passed"
