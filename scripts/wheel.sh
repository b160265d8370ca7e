#!/usr/bin/env bash
# Builds the durus-redb wheel (maturin, the binary as the package's
# script), installs it into a fresh virtualenv, checks `durus-redb
# --version` and `python -m durus_redb --help` there, and runs the demo
# (scripts/demo.sh) with the installed command.
#
# Needs cargo and python3 (with venv); installs maturin into .venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="$(bash scripts/setup-python.sh)"
if ! "$PY" -m maturin --version >/dev/null 2>&1; then
    echo "wheel.sh: installing maturin into .venv" >&2
    "$PY" -m pip install --disable-pip-version-check --no-input --quiet "maturin>=1.5,<2.0"
fi
OUT="$ROOT/target/wheels"
rm -rf "$OUT"
"$PY" -m maturin build --release --out "$OUT" --quiet
WHEEL="$(ls "$OUT"/durus_redb-*.whl)"
echo "== built $(basename "$WHEEL")"
case "$(basename "$WHEEL")" in
    *-py3-none-*) ;;
    *) echo "wheel.sh: the wheel depends on the Python version" >&2; exit 1 ;;
esac

VENV="$ROOT/target/wheel-venv"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet "$WHEEL"
echo "== durus-redb --version (installed)"
"$VENV/bin/durus-redb" --version
echo "== python -m durus_redb --help (installed)"
"$VENV/bin/python" -m durus_redb --help | head -3

echo "== durus_redb.client (TLSClientStorage) is in the wheel"
"$VENV/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "durus_redb/client.py" in names, names
PY

echo "== the demo with the installed command"
DURUS_REDB_BIN="$VENV/bin/durus-redb" bash scripts/demo.sh
