"""durus-redb: a Durus-compatible storage server and engine on redb.

This package only locates the ``durus-redb`` command installed with it;
``python -m durus_redb ARGS`` runs it.
"""

import os
import shutil
import sys
import sysconfig

__all__ = ["find_durus_redb_bin"]


def find_durus_redb_bin():
    """The path of the installed ``durus-redb`` binary."""
    exe = "durus-redb" + (sysconfig.get_config_var("EXE") or "")
    candidates = [os.path.join(sysconfig.get_path("scripts"), exe)]
    try:
        user = sysconfig.get_preferred_scheme("user")
        candidates.append(os.path.join(sysconfig.get_path("scripts", scheme=user), exe))
    except (AttributeError, KeyError):
        pass
    for path in candidates:
        if os.path.isfile(path):
            return path
    found = shutil.which(exe)
    if found:
        return found
    raise FileNotFoundError(
        "the durus-redb command is not installed next to this Python (%s); "
        "reinstall the durus-redb package" % sys.executable
    )
