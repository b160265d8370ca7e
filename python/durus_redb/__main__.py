"""``python -m durus_redb ARGS`` runs ``durus-redb ARGS``."""

import os
import subprocess
import sys

from durus_redb import find_durus_redb_bin


def main():
    binary = find_durus_redb_bin()
    args = [binary] + sys.argv[1:]
    if os.name == "posix":
        os.execv(binary, args)
    sys.exit(subprocess.call(args))


if __name__ == "__main__":
    main()
