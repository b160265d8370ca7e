#!/usr/bin/env bash
# Create (if missing) the project virtualenv .venv and make sure Durus 4.3 is
# installed in it.  Idempotent.  Prints the path of the venv's python.
# Environment: PYTHON (default python3) picks the interpreter for the venv.
set -euo pipefail

DURUS_VERSION="4.3"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
BASE_PYTHON="${PYTHON:-python3}"

die() { echo "setup-python.sh: error: $*" >&2; exit 1; }

if [ ! -x "$PY" ]; then
    command -v "$BASE_PYTHON" >/dev/null 2>&1 \
        || die "'$BASE_PYTHON' not found; install Python 3 (with the venv module)"
    echo "setup-python.sh: creating $VENV" >&2
    "$BASE_PYTHON" -m venv "$VENV" \
        || die "'$BASE_PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi

have_durus() {
    "$PY" - "$DURUS_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import durus, durus.client_storage, durus.connection
sys.exit(0 if version("durus") == sys.argv[1] else 1)
PYEOF
}

if ! have_durus; then
    echo "setup-python.sh: installing durus==$DURUS_VERSION into $VENV" >&2
    # Durus has a C extension; pip builds it (needs a C compiler and the
    # Python headers) when no wheel is available.
    "$PY" -m pip install --disable-pip-version-check --no-input --quiet \
        "durus==$DURUS_VERSION" >&2 \
        || die "pip install durus==$DURUS_VERSION failed"
    have_durus || die "durus==$DURUS_VERSION still not importable from $PY after install"
fi

[ -x "$VENV/bin/durus" ] || die "$VENV/bin/durus is missing after install"
echo "$PY"
