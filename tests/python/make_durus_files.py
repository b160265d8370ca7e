#!/usr/bin/env python3
"""Write Durus 4.3 storage files for the durus-redb file-reader tests.

Usage: make_durus_files.py OUTDIR [SIZE]

Writes, with the real Durus, three stores holding the same kind of object
graph (a root PersistentDict holding a BTree of SIZE PersistentDicts,
PersistentLists and nested objects, rewritten over many transactions, packed
once half-way, with garbage left behind afterwards):

  shelf.durus    FileStorage  (SHELF-1)
  dfs20.durus    FileStorage2 (DFS20)
  sqlite.durus   SqliteStorage

For each NAME it also writes
  NAME.dump          the final state: every oid present in the file, sorted,
                     as `oid (8) | u32 big-endian length | record`;
  NAME.before.dump   the same, just before the last commit;
  NAME.reachable     the oids reachable from the root, one a line;
  NAME.ends          the file size after each commit since the pack (the
                     ends of the transactions in the final file), one a line;
and a manifest.json with all of it, per store, and the number of records.
Uses only the standard library and durus.
"""
import json
import os
import random
import sqlite3
import struct
import logging
import sys

from durus.btree import BTree
from durus.connection import Connection, ROOT_OID
from durus.file_storage import FileStorage
from durus.file_storage2 import FileStorage2
from durus.persistent import Persistent
from durus.persistent_dict import PersistentDict
from durus.persistent_list import PersistentList
from durus.serialize import pack_record
from durus.sqlite_storage import SqliteStorage
from durus.utils import int8_to_str


class Node(Persistent):
    """A small persistent object with a payload and a link."""

    def __init__(self, label, payload, link=None):
        self.label = label
        self.payload = payload
        self.link = link


def present_records(name, storage, path):
    """All (oid, record) pairs present in the store, sorted by oid."""
    if name == "sqlite":
        # SqliteStorage.gen_oid_record() without a start oid is broken in
        # Durus 4.3 (it selects a row value), so read the table directly.
        conn = sqlite3.connect(path)
        try:
            rows = conn.execute(
                "SELECT id, data, refs FROM objects ORDER BY id").fetchall()
        finally:
            conn.close()
        return [(int8_to_str(i), pack_record(int8_to_str(i), bytes(d), bytes(r)))
                for i, d, r in rows]
    return sorted(storage.gen_oid_record())


def write_dump(path, items):
    with open(path, "wb") as f:
        for oid, record in items:
            assert len(oid) == 8 and record[:8] == oid
            f.write(oid)
            f.write(struct.pack(">I", len(record)))
            f.write(record)


def flush(name, storage):
    if name == "shelf":
        storage.shelf.get_file().flush()
    elif name == "dfs20":
        storage.fp.flush()


def build(name, storage, path, size, seed):
    rng = random.Random(seed)
    conn = Connection(storage)
    ends = []

    def commit():
        conn.commit()
        flush(name, storage)
        ends.append(os.path.getsize(path))

    root = conn.get_root()
    root["tree"] = BTree()
    root["meta"] = PersistentDict(name=name, size=size)
    commit()
    tree = root["tree"]
    # Fill the tree over several transactions.
    per_txn = max(1, size // 10)
    for k in range(size):
        kind = k % 3
        if kind == 0:
            value = PersistentDict(key=k, text="x" * rng.randint(0, 300))
        elif kind == 1:
            value = PersistentList([k, Node("n%d" % k, os.urandom(rng.randint(0, 64)))])
        else:
            value = Node("k%d" % k, {"nested": [k, k * 2]},
                         link=Node("inner%d" % k, b"\0" * rng.randint(1, 40)))
        tree[k] = value
        if k % per_txn == per_txn - 1:
            commit()
    commit()
    # Rewrite some objects, drop others (garbage), across many transactions.
    for round_ in range(8):
        for _ in range(max(1, size // 20)):
            k = rng.randrange(size)
            if k not in tree:
                continue
            v = tree[k]
            if rng.random() < 0.3:
                del tree[k]
            elif isinstance(v, PersistentDict):
                v["round"] = round_
            elif isinstance(v, PersistentList):
                v.append(round_)
            else:
                v.payload = (round_, v.payload)
        commit()
        if round_ == 3:
            conn.pack()
            flush(name, storage)
            # Only transactions of the packed file are in the final file.
            del ends[:]
    # A last, small transaction, after a dump of the state before it.
    write_dump(path + ".before.dump", present_records(name, storage, path))
    root["meta"]["last"] = True
    tree[size + 1] = PersistentDict(tail=True)
    commit()
    write_dump(path + ".dump", present_records(name, storage, path))
    reachable = sorted(
        struct.unpack(">Q", oid)[0]
        for oid, _ in storage.gen_oid_record(start_oid=ROOT_OID))
    present = len(present_records(name, storage, path))
    storage.close()
    with open(path + ".reachable", "w") as f:
        f.write("".join("%d\n" % oid for oid in reachable))
    with open(path + ".ends", "w") as f:
        f.write("".join("%d\n" % end for end in ends))
    return {"reachable": reachable, "present": present, "commit_ends": ends}


def main():
    # Durus logs every commit at INFO level; keep the output to the summary.
    logging.getLogger("durus").setLevel(logging.WARNING)
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    size = int(sys.argv[2]) if len(sys.argv) == 3 else 3000
    os.makedirs(out, exist_ok=True)
    manifest = {}
    makers = [("shelf", FileStorage), ("dfs20", FileStorage2),
              ("sqlite", SqliteStorage)]
    for seed, (name, klass) in enumerate(makers):
        path = os.path.join(out, name + ".durus")
        if os.path.exists(path):
            os.remove(path)
        manifest[name] = build(name, klass(path), path, size, seed)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    print(json.dumps({k: {"present": v["present"],
                          "reachable": len(v["reachable"]),
                          "commits": len(v["commit_ends"])}
                      for k, v in manifest.items()}))


if __name__ == "__main__":
    main()
