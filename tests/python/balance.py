#!/usr/bin/env python3
"""Read-only work under steady writes, with the real Durus client.

    balance.py --port P [--seconds S] [--writers N] [--accounts K]

One reader sums the balance of K accounts (PersistentDicts), pausing
0.5 ms between loads, and starts again (abort(), which syncs) after each
sum.  N writer processes move random amounts between random pairs of the
same accounts and commit as fast as they can.  The total never changes, so
every completed sum must equal it.

A reader on a server without snapshot reads meets ReadConflictError
whenever an account it has not loaded yet in this sum changed since its
last sync; on durus-redb with --snapshot-reads it should meet none.

Prints one JSON line: sums completed, exact sums, wrong sums, read
conflicts, the writers' commits, commits per second and write conflicts.
Standard library and durus only.
"""

import argparse
import json
import random
import subprocess
import sys
import time

from durus.client_storage import ClientStorage
from durus.connection import Connection
from durus.error import ConflictError, ReadConflictError
from durus.persistent_dict import PersistentDict
from durus.persistent_list import PersistentList

START = 1000


def connect(port):
    storage = ClientStorage(host="127.0.0.1", port=port)
    storage.s.settimeout(60)
    return Connection(storage, cache_size=100000)


def setup(port, accounts):
    c = connect(port)
    root = c.get_root()
    root["accounts"] = PersistentList(
        PersistentDict(balance=START) for _ in range(accounts))
    c.commit()
    c.get_storage().close()


def writer(args):
    rng = random.Random(args.writer * 7919 + 1)
    c = connect(args.port)
    accounts = c.get_root()["accounts"]
    n = len(accounts)
    commits = conflicts = 0
    time.sleep(max(0.0, args.start_at - time.time()))
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        try:
            a, b = rng.sample(range(n), 2)
            amount = rng.randint(1, 50)
            accounts[a]["balance"] -= amount
            accounts[b]["balance"] += amount
            c.commit()
            commits += 1
        except ConflictError:
            conflicts += 1
            c.abort()
    c.get_storage().close()
    sys.stdout.write(json.dumps({"commits": commits,
                                 "conflicts": conflicts}) + "\n")


def reader(args, total):
    c = connect(args.port)
    accounts = c.get_root()["accounts"]
    sums = exact = wrong = read_conflicts = 0
    time.sleep(max(0.0, args.start_at - time.time()))
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        c.abort()  # syncs: the next sum reads the latest state
        try:
            s = 0
            for account in accounts:
                s += account["balance"]
                time.sleep(0.0005)
        except ReadConflictError:
            read_conflicts += 1
            continue
        sums += 1
        if s == total:
            exact += 1
        else:
            wrong += 1
    c.get_storage().close()
    return {"sums": sums, "exact": exact, "wrong": wrong,
            "read_conflicts": read_conflicts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--accounts", type=int, default=40)
    parser.add_argument("--writer", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer is not None:
        writer(args)
        return 0
    setup(args.port, args.accounts)
    args.start_at = time.time() + 1.0 + 0.2 * args.writers
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--port", str(args.port),
             "--seconds", str(args.seconds), "--writer", str(i),
             "--start-at", "%.3f" % args.start_at],
            stdout=subprocess.PIPE)
        for i in range(args.writers)]
    result = reader(args, START * args.accounts)
    commits = conflicts = 0
    for child in children:
        out, _ = child.communicate(timeout=args.seconds + 120)
        if child.returncode != 0:
            raise SystemExit("balance.py: a writer failed")
        w = json.loads(out.decode())
        commits += w["commits"]
        conflicts += w["conflicts"]
    result.update({"writers": args.writers, "seconds": args.seconds,
                   "writer_commits": commits,
                   "commits_per_s": round(commits / args.seconds, 1),
                   "write_conflicts": conflicts})
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
