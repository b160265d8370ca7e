#!/usr/bin/env python3
"""An unchanged Python Durus application: the demo's client.

    app.py --port P          (or --address /path/to/socket)

Builds a small catalogue (a BTree of PersistentDicts holding PersistentLists),
commits it, reads it back from a second connection, shows a write conflict
between two connections exactly as Durus reports it, drops part of the
catalogue and packs.  Uses only Durus's own API.
"""

import argparse
import sys

from durus.btree import BTree
from durus.client_storage import ClientStorage
from durus.connection import Connection
from durus.error import ConflictError
from durus.persistent_dict import PersistentDict
from durus.persistent_list import PersistentList


def connect(args):
    if args.address:
        return Connection(ClientStorage(address=args.address))
    return Connection(ClientStorage(host=args.host, port=args.port))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2972)
    parser.add_argument("--address", help="a Unix socket path instead")
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()

    a = connect(args)
    root = a.get_root()
    catalogue = BTree()
    root["catalogue"] = catalogue
    for i in range(args.items):
        catalogue[i] = PersistentDict(
            name="item %d" % i, price=i % 97,
            history=PersistentList([i, i * 2]))
    a.commit()
    print("committed %d items" % len(catalogue))

    b = connect(args)
    other = b.get_root()["catalogue"]
    total = sum(item["price"] for item in other.values())
    print("a second connection reads them back: %d items, total price %d"
          % (len(other), total))

    # Both connections change item 7; the one that commits second conflicts.
    catalogue[7]["price"] = 1000
    other[7]["price"] = 2000
    a.commit()
    try:
        b.commit()
        print("no conflict: this server lost an update")
        return 1
    except ConflictError as exc:
        print("the second writer gets %s, as with Durus's own server"
              % type(exc).__name__)
        b.abort()
    print("after abort it sees price %d" % other[7]["price"])

    for i in range(0, args.items, 2):
        del catalogue[i]
    a.commit()
    a.pack()
    b.abort()
    print("dropped half of the items and packed; %d items remain"
          % len(b.get_root()["catalogue"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
