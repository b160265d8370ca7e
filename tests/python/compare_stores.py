#!/usr/bin/env python3
"""Compare every object reachable from the root of two Durus stores.

    compare_stores.py ORIGINAL (--file OTHER | --port P [--host H] | --address SOCK)

ORIGINAL is a Durus storage file (FileStorage, FileStorage2 or SqliteStorage),
opened read-only by Durus itself.  The other side is another file (opened the
same way) or a running server (Durus's ClientStorage).  Walks the object graph
from the root through each record's references and requires, for every
reachable oid, the identical record (pickled class and state, and refs) on
both sides, and the same set of reachable oids.  Then loads every reachable
object through a Durus Connection on the other side (unpickling it) to show
that Durus reads it as an object.

Prints one JSON line {"reachable": N, "identical": true, ...}; exits 0 when
identical, 1 otherwise, 2 on usage errors.  Uses only the standard library
and durus.
"""

import argparse
import json
import sys

from durus.__main__ import get_storage
from durus.client_storage import ClientStorage
from durus.connection import Connection
from durus.serialize import split_oids, unpack_record
from durus.utils import int8_to_str

ROOT = int8_to_str(0)


def reachable_records(storage):
    """{oid: record} for everything reachable from the root."""
    found = {}
    todo = [ROOT]
    while todo:
        oid = todo.pop()
        if oid in found:
            continue
        record = storage.load(oid)
        found[oid] = record
        _, _, refs = unpack_record(record)
        for ref in split_oids(refs):
            if ref not in found:
                todo.append(ref)
    return found


def open_file(path):
    """A Durus storage on a file, read-only where Durus supports that
    (SqliteStorage does not; nothing here writes to it)."""
    try:
        return get_storage(path, readonly=True)
    except NotImplementedError:
        return get_storage(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("original")
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument("--file")
    side.add_argument("--port", type=int)
    side.add_argument("--address")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--classes", metavar="SCRIPT",
        help="a Python script that defined persistent classes as __main__.X "
             "when it wrote the store (e.g. make_durus_files.py): its classes "
             "are made importable so the objects unpickle")
    args = parser.parse_args()
    if args.classes:
        import runpy
        from durus.persistent import PersistentObject
        namespace = runpy.run_path(args.classes, run_name="durus_classes")
        main_module = sys.modules["__main__"]
        for name, value in namespace.items():
            if isinstance(value, type) and issubclass(value, PersistentObject):
                setattr(main_module, name, value)
                value.__module__ = "__main__"

    original = open_file(args.original)
    if args.file:
        other = open_file(args.file)
    elif args.address:
        other = ClientStorage(address=args.address)
    else:
        other = ClientStorage(host=args.host, port=args.port)

    mine = reachable_records(original)
    theirs = reachable_records(other)
    differing = sorted(
        oid for oid in set(mine) & set(theirs) if mine[oid] != theirs[oid])
    only_original = sorted(set(mine) - set(theirs))
    only_other = sorted(set(theirs) - set(mine))

    # Durus reads every reachable object on the other side as an object.
    connection = Connection(other, cache_size=1000)
    loaded = 0
    for oid in theirs:
        obj = connection.get(oid)
        if obj._p_is_ghost():
            obj._p_load_state()
        loaded += 1
        if loaded % 500 == 0:
            connection.abort()  # lets the cache shrink

    identical = not (differing or only_original or only_other)
    result = {
        "reachable": len(mine),
        "reachable_other": len(theirs),
        "identical": identical,
        "differing": len(differing),
        "only_original": len(only_original),
        "only_other": len(only_other),
        "loaded_as_objects": loaded,
    }
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
