#!/usr/bin/env python3
"""Check a SHELF-1 file with the real Durus 4.3 FileStorage.

Usage: check_shelf.py FILE DUMP

DUMP holds the expected records, `oid (8) | u32 big-endian length | record`
each. Exits non-zero unless FileStorage(FILE, readonly=True) holds exactly
those oids with exactly those records, hands out new oids that are not in
use, and opens the root object through a Connection.
"""
import struct
import sys

from durus.connection import Connection
from durus.file_storage import FileStorage


def read_dump(path):
    with open(path, "rb") as f:
        data = f.read()
    records, i = {}, 0
    while i < len(data):
        oid = data[i:i + 8]
        (n,) = struct.unpack(">I", data[i + 8:i + 12])
        records[oid] = data[i + 12:i + 12 + n]
        i += 12 + n
    return records


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    expected = read_dump(sys.argv[2])
    storage = FileStorage(sys.argv[1], readonly=True)
    problems = []
    got = dict(storage.gen_oid_record())
    if set(got) != set(expected):
        problems.append("oids differ: %d only in the file, %d only in the dump"
                        % (len(set(got) - set(expected)),
                           len(set(expected) - set(got))))
    for oid, record in expected.items():
        if oid in got and storage.load(oid) != record:
            problems.append("record of oid %r differs" % struct.unpack(">Q", oid))
    for _ in range(5):
        oid = storage.new_oid()
        if oid in expected:
            problems.append("new_oid() handed out %r, which is in use" % oid)
    if b"\0" * 8 in expected:
        root = Connection(storage).get_root()
        print("root holds %d keys" % len(root))
    for p in problems[:20]:
        print(p, file=sys.stderr)
    if problems:
        sys.exit(1)
    print("ok: %d records" % len(expected))


if __name__ == "__main__":
    main()
