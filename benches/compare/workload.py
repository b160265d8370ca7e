#!/usr/bin/env python3
"""Workloads of the side-by-side benchmark, driven by the real Durus client.

    workload.py populate --file PATH --objects N [--sqlite]
        Writes a Durus store directly (no server): the root holds a BTree
        "items" of N PersistentDicts keyed 0..N-1.  FileStorage (SHELF-1)
        by default, SqliteStorage with --sqlite.
    workload.py copy --src PATH --dest PATH
        Copies every record of a Durus store into a new SqliteStorage.
    workload.py run --port P --mode MODE --seconds S --client I --clients N
                    --objects N [--batch K] [--start-at T]
        One client process: runs MODE against the server for S seconds and
        prints one JSON line: {"ops": .., "conflicts": .., "lat_us": [..]}.

Modes:
    read   each operation: abort() (syncs invalidations and shrinks the
           cache, as an application does per request), then read one
           random PersistentDict through the BTree.  The cache is small, so
           nearly every read loads from the server.
    write  each operation: change K random dicts that belong to this client
           (key % clients == client) and commit.  No conflicts by design.
    mixed  each operation: 80% a read as above, 20% a change of 2 dicts
           from a shared hot set of 200 keys, then commit; a ConflictError
           is counted, aborted and not retried.

Uses only the standard library and durus.
"""

import argparse
import random
import sys
import time

from durus.btree import BTree
from durus.client_storage import ClientStorage
from durus.connection import Connection
from durus.error import ConflictError
from durus.file_storage import FileStorage
from durus.persistent_dict import PersistentDict

HOT_KEYS = 200


def make_item(i):
    return PersistentDict(
        {"n": 0, "name": "item%07d" % i, "payload": "x" * (40 + i % 80)})


def populate(args):
    if args.sqlite:
        from durus.sqlite_storage import SqliteStorage
        storage = SqliteStorage(args.file)
    else:
        storage = FileStorage(args.file)
    connection = Connection(storage, cache_size=20000)
    root = connection.get_root()
    tree = BTree()
    root["items"] = tree
    connection.commit()
    for i in range(args.objects):
        tree[i] = make_item(i)
        if i % 5000 == 4999:
            connection.commit()
    connection.commit()
    storage.close()


def copy(args):
    from durus.__main__ import get_storage
    from durus.sqlite_storage import SqliteStorage
    src = get_storage(args.src, readonly=True)
    dest = SqliteStorage(args.dest)
    dest.begin()
    n = 0
    for oid, record in src.gen_oid_record():
        dest.store(oid, record)
        n += 1
        if n % 20000 == 0:
            dest.end()
            dest.begin()
    dest.end()
    dest.close()


def run(args):
    rng = random.Random(args.client * 7919 + 17)
    if args.tls_ca:
        # durus_redb.client of this source tree (python/).
        import os
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(
            __file__)), "..", "..", "python"))
        from durus_redb.client import TLSClientStorage
        storage = TLSClientStorage(host="127.0.0.1", port=args.port,
                                   cafile=args.tls_ca)
    else:
        storage = ClientStorage(host="127.0.0.1", port=args.port)
    storage.s.settimeout(60)
    connection = Connection(storage, cache_size=args.cache)
    tree = connection.get_root()["items"]
    mine = [k for k in range(args.client, args.objects, args.clients)]
    lat = []
    conflicts = 0
    if args.start_at:
        # Every client of a run starts measuring at the same moment.
        time.sleep(max(0.0, args.start_at - time.time()))
    deadline = time.perf_counter() + args.seconds
    while True:
        start = time.perf_counter()
        if start >= deadline:
            break
        try:
            if args.mode == "read" or (
                    args.mode == "mixed" and rng.random() < 0.8):
                connection.abort()
                item = tree[rng.randrange(args.objects)]
                item["n"]  # loads the ghost
            elif args.mode == "write":
                for key in rng.sample(mine, args.batch):
                    item = tree[key]
                    item["n"] = item["n"] + 1
                connection.commit()
            else:
                for key in rng.sample(range(HOT_KEYS), 2):
                    item = tree[key]
                    item["n"] = item["n"] + 1
                connection.commit()
        except ConflictError:
            conflicts += 1
            connection.abort()
            continue
        lat.append(int((time.perf_counter() - start) * 1e6))
    storage.close()
    sys.stdout.write("%d %d\n%s\n" % (
        len(lat), conflicts, " ".join(str(x) for x in lat)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("populate")
    p.add_argument("--file", required=True)
    p.add_argument("--objects", type=int, required=True)
    p.add_argument("--sqlite", action="store_true")
    p = sub.add_parser("copy")
    p.add_argument("--src", required=True)
    p.add_argument("--dest", required=True)
    p = sub.add_parser("run")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["read", "write", "mixed"], required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--client", type=int, required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--objects", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache", type=int, default=2000)
    p.add_argument("--tls-ca", default=None,
                   help="connect with TLS (durus_redb.client.TLSClientStorage)")
    p.add_argument("--start-at", type=float, default=0.0,
                   help="wall-clock time (seconds since the epoch) to start at")
    args = parser.parse_args()
    {"populate": populate, "copy": copy, "run": run}[args.command](args)


if __name__ == "__main__":
    main()
