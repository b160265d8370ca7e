"""Python Durus 4.3's BTree through `durus -s`: the same work as the
object-layer benchmark's persistent map (bulk inserts in commits of BATCH,
then lookups), timed here and printed as `inserts_per_s lookups_per_s`.

    python btree.py PORT N BATCH LOOKUPS
"""

import sys
import time

from durus.btree import BTree
from durus.client_storage import ClientStorage
from durus.connection import Connection


def main():
    port, n, batch, lookups = (int(a) for a in sys.argv[1:5])
    connection = Connection(ClientStorage(host="127.0.0.1", port=port), cache_size=1000000)
    root = connection.get_root()
    root["map"] = tree = BTree()
    connection.commit()
    # The same keys in the same order as the Rust side: a permutation.
    started = time.perf_counter()
    for i in range(n):
        k = (i * 7919) % n
        tree[k] = "value %d" % k
        if (i + 1) % batch == 0:
            connection.commit()
    connection.commit()
    inserts = n / (time.perf_counter() - started)
    # Warm: every node in the connection's cache, as the Rust side's.
    for i in range(n):
        tree.get(i)
    started = time.perf_counter()
    for i in range(lookups):
        k = (i * 104729) % n
        assert tree.get(k) == "value %d" % k
    found = lookups / (time.perf_counter() - started)
    print("%.0f %.0f" % (inserts, found))


if __name__ == "__main__":
    main()
