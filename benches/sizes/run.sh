#!/usr/bin/env bash
# The store's size against the Durus file it came from, for three kinds of
# store (small objects, ~1 KB documents, a BTree), each migrated from the
# file as Durus wrote it and from a packed copy.  Prints one table.
#
#   benches/sizes/run.sh                 # the release build of this tree
#   OLD_BIN=/path/to/durus-redb benches/sizes/run.sh   # and another build beside it
#
# Needs the .venv that scripts/setup-python.sh makes (durus==4.3).  Writes
# about 600 MB into a temporary directory, removed at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${DURUS_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || bash "$ROOT/scripts/setup-python.sh" >/dev/null
(cd "$ROOT" && cargo build --release --bin durus-redb >/dev/null 2>&1)
NEW="$ROOT/target/release/durus-redb"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" "$ROOT/benches/sizes/make_stores.py" "$WORK" small docs btree
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }
size() { stat -c %s "$1"; }
migrate() {  # BIN SRC DEST -> seconds
    rm -rf "$3" "$3-log"
    local t0 t1
    t0=$(date +%s.%N)
    "$1" migrate "$2" "$3" >/dev/null 2>&1
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}
printf '%-14s %10s %10s' "store" "durus MB" "packed MB"
[ -n "${OLD_BIN:-}" ] && printf ' %16s %12s' "old: store MB" "old: s"
printf ' %16s %12s %14s\n' "new: store MB" "new: s" "new/packed"
for kind in small docs btree; do
    cp "$WORK/$kind.durus" "$WORK/$kind.packed.durus"
    "$PY" -c 'import sys; from durus.file_storage import FileStorage as F; s = F(sys.argv[1]); s.pack(); s.close()' \
        "$WORK/$kind.packed.durus"
    packed=$(size "$WORK/$kind.packed.durus")
    for src in "$kind" "$kind.packed"; do
        printf '%-14s %10s %10s' "$src" "$(mb "$(size "$WORK/$src.durus")")" "$(mb "$packed")"
        if [ -n "${OLD_BIN:-}" ]; then
            s=$(migrate "$OLD_BIN" "$WORK/$src.durus" "$WORK/old.redb")
            printf ' %16s %12s' "$(mb "$(size "$WORK/old.redb")")" "$s"
        fi
        s=$(migrate "$NEW" "$WORK/$src.durus" "$WORK/new.redb")
        new=$(size "$WORK/new.redb")
        printf ' %16s %12s %14s\n' "$(mb "$new")" "$s" "$(awk -v a="$new" -v b="$packed" 'BEGIN { printf "%.2fx", a / b }')"
    done
done
