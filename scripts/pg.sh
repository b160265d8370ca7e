#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on a loopback port, for the tests and for
# trying `durus-redb serve --database`.
#
#   scripts/pg.sh start DIR [PORT]   creates a cluster in DIR, starts it on
#                                    127.0.0.1:PORT (a free one if not given)
#                                    and prints its URL
#   scripts/pg.sh stop DIR           stops it and removes DIR
#
# initdb refuses to run as root: as root, the cluster belongs to the
# `postgres` user (the Debian package creates it). Connections are trusted
# (no password): loopback only, for tests and trials, never for production.
set -euo pipefail

usage() { sed -n '2,13p' "$0" >&2; exit 2; }

bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$d/initdb" ] && { echo "$d"; return; }
    done
    if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir; return
    fi
    echo "pg.sh: no PostgreSQL server found (install the postgresql package)" >&2
    exit 1
}

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
    local port
    for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"; return
        fi
    done
    echo "pg.sh: no free port found" >&2; exit 1
}

[ $# -ge 2 ] || usage
cmd="$1"; dir="$2"
BIN="$(bindir)"
case "$cmd" in
start)
    port="${3:-$(free_port)}"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    as_owner "$BIN/initdb" -D "$dir/data" -U postgres -E UTF8 --no-locale \
        --auth=trust >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start -o \
        "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300" \
        >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    echo "postgresql://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    [ -d "$dir/data" ] || { echo "pg.sh: no cluster in $dir" >&2; exit 1; }
    as_owner "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    rm -rf "$dir"
    ;;
*) usage ;;
esac
