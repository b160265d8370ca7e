#!/usr/bin/env python3
"""Interop test suite for any server speaking the Durus 4.3 storage-server
protocol (Durus's own `durus -s`, or durus-redb).

Only the real Durus client API is used (ClientStorage, Connection,
PersistentDict, PersistentList, BTree, the durus.error classes), so that
what is tested is exactly what an unchanged Durus application sees.

Usage:
    python interop.py --host 127.0.0.1 --port P [--scenario NAME ...]
    python interop.py --address /path/to/unix.sock [--scenario NAME ...]

Every scenario prints one JSON line (keys sorted) of observable results:
values read back, counts, digests, and which step raised which exception
class.  Nothing in it depends on oid numbers, timings or the server's
implementation, so the output of a run against `durus -s` and a run against
another server must be byte-identical.  Each scenario works only below its
own key of the root PersistentDict, so scenarios can run on fresh servers or
one after another on the same server.

Exit status: 0 if every scenario passed its own assertions, 1 otherwise,
2 on usage errors.  Uses only the standard library and durus.
"""

import argparse
import hashlib
import json
import multiprocessing
import random
import socket
import sys
import time
import traceback

try:
    from durus.btree import BTree
    from durus.client_storage import ClientStorage
    from durus.connection import Connection
    from durus.error import ConflictError, ReadConflictError
    from durus.error import WriteConflictError
    from durus.persistent import PersistentObject
    from durus.persistent_dict import PersistentDict
    from durus.persistent_list import PersistentList
except ImportError as exc:  # pragma: no cover
    sys.stderr.write(
        "interop.py: cannot import durus (%s); run scripts/setup-python.sh "
        "and use .venv/bin/python\n" % exc)
    sys.exit(2)

# Every socket operation of the client is bounded by this (seconds).
SOCKET_TIMEOUT = 60.0


class ScenarioFailure(Exception):
    pass


def check(condition, message, *args):
    if not condition:
        raise ScenarioFailure(message % args if args else message)


def exc_name(exc):
    return type(exc).__name__


class Target(object):
    """Where the server is; makes storages and connections."""

    def __init__(self, host=None, port=None, address=None,
                 snapshot_reads=False, also_ports=(), tls=None):
        # tls: (cafile, certfile, keyfile) to connect with
        # durus_redb.client.TLSClientStorage, else None.
        self.tls = tls
        self.host = host
        self.port = port
        # Other servers of the same store (front ends over one database):
        # connections alternate between all the ports, in turn, or by the
        # index a caller gives.
        self.ports = [port] + list(also_ports)
        self.turn = 0
        self.address = address
        # The server serves snapshot reads (durus-redb --snapshot-reads):
        # a synced connection loads from the state of its last sync.
        self.snapshot_reads = snapshot_reads

    def describe(self):
        if self.address:
            return self.address
        return "%s:%s" % (self.host, ",".join(str(p) for p in self.ports))

    def storage(self, index=None):
        if index is None:
            index = self.turn
            self.turn += 1
        port = self.ports[index % len(self.ports)]
        try:
            if self.address:
                storage = ClientStorage(address=self.address)
            elif self.tls:
                from durus_redb.client import TLSClientStorage
                cafile, certfile, keyfile = self.tls
                storage = TLSClientStorage(host=self.host, port=port,
                                           cafile=cafile, certfile=certfile,
                                           keyfile=keyfile)
            else:
                storage = ClientStorage(host=self.host, port=port)
        except AssertionError:
            # ClientStorage asserts that the socket connected.
            raise ScenarioFailure("could not connect to %s" % self.describe())
        storage.s.settimeout(SOCKET_TIMEOUT)
        return storage

    def connection(self, cache_size=100000, index=None):
        return Connection(self.storage(index), cache_size=cache_size)


def close(*connections):
    for connection in connections:
        try:
            connection.get_storage().close()
        except Exception:
            pass


def attempt(step, function, log):
    """Run function(); append {step, result|exception} to log; return
    (value, exception)."""
    try:
        value = function()
    except Exception as exc:
        if not isinstance(exc, (ConflictError, KeyError)):
            raise
        log.append({"step": step, "raised": exc_name(exc),
                    "is_ConflictError": isinstance(exc, ConflictError)})
        return None, exc
    entry = {"step": step, "raised": None}
    if value is not None:
        entry["value"] = value
    log.append(entry)
    return value, None


# ---------------------------------------------------------------- digests

def canonical(value, seen):
    """A deterministic text form of a value graph.  A persistent object met
    again is written as a back-reference to the number of its first
    visit, so shared objects and cycles are handled; visit order depends
    only on the data, never on oids."""
    if isinstance(value, PersistentObject):
        key = id(value)
        if key in seen:
            return "#%d" % seen[key]
        seen[key] = len(seen)
        if isinstance(value, PersistentDict):
            items = sorted(value.items(), key=lambda kv: repr(kv[0]))
            return "D{%s}" % ",".join(
                "%r:%s" % (k, canonical(v, seen)) for k, v in items)
        if isinstance(value, PersistentList):
            return "L[%s]" % ",".join(canonical(v, seen) for v in value)
        if isinstance(value, BTree):
            return "T{%s}" % ",".join(
                "%r:%s" % (k, canonical(v, seen)) for k, v in value.items())
        raise ScenarioFailure("unexpected persistent class %s"
                              % type(value).__name__)
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: repr(kv[0]))
        return "d{%s}" % ",".join(
            "%r:%s" % (k, canonical(v, seen)) for k, v in items)
    if isinstance(value, (list, tuple)):
        return "l[%s]" % ",".join(canonical(v, seen) for v in value)
    if isinstance(value, bytes):
        return "b%s" % hashlib.sha256(value).hexdigest()[:16]
    return repr(value)


def digest(value):
    return hashlib.sha256(canonical(value, {}).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- graph

GRAPH_ITEMS = 3000
GRAPH_BATCH = 500


def make_graph_value(i, tree, rng):
    if i % 3 == 0:
        value = PersistentList([i, "list%05d" % i, rng.randint(0, 10 ** 9)])
        value.append(PersistentDict({"inner": i * 7,
                                     "deep": PersistentList(range(i % 5))}))
    else:
        value = PersistentDict()
        value["i"] = i
        value["name"] = "item%05d" % i
        value["tags"] = ["t%d" % (i % 11), ("tuple", i % 13)]
        value["child"] = PersistentDict(
            square=i * i, numbers=PersistentList(range(i % 7)),
            grandchild=PersistentDict(text="x" * (i % 50)))
        if i > 0:
            # Shared reference to an earlier item (a graph, not a tree).
            value["parent"] = tree[i // 2]
    if i % 500 == 1:
        # A large record (> 64 KiB, incompressible).
        value_holder = PersistentDict(
            blob=rng.randbytes(70000))
        if isinstance(value, PersistentDict):
            value["big"] = value_holder
        else:
            value.append(value_holder)
    return value


def scenario_graph(target):
    rng = random.Random(20240611)
    result = {}
    c1 = target.connection()
    root = c1.get_root()
    tree = BTree()
    root["graph"] = tree
    c1.commit()
    commits = 1
    for start in range(0, GRAPH_ITEMS, GRAPH_BATCH):
        for i in range(start, min(start + GRAPH_BATCH, GRAPH_ITEMS)):
            tree[i] = make_graph_value(i, tree, rng)
        c1.commit()
        commits += 1
    result["commits"] = commits
    digest1 = digest(tree)

    # A new connection with a small cache, so objects get ghosted and
    # reloaded from the server while traversing.
    c2 = target.connection(cache_size=500)
    tree2 = c2.get_root()["graph"]
    check(len(tree2) == GRAPH_ITEMS, "c2 sees %d items, expected %d",
          len(tree2), GRAPH_ITEMS)
    digest2 = digest(tree2)
    check(digest2 == digest1, "digest read by a new connection differs "
          "from the digest of what was committed")
    result["count_after_build"] = len(tree2)
    result["digest_after_build"] = digest2
    crawled = sum(1 for _ in c2.get_crawler(start_oid=tree2._p_oid))
    result["crawler_objects"] = crawled

    # Modify through c2.
    for i in range(0, GRAPH_ITEMS, 10):
        value = tree2[i]
        if isinstance(value, PersistentList):
            value.append("modified")
        else:
            value["name"] = value["name"] + "!"
            value["child"]["numbers"].append(-i)
    deleted = 0
    for i in range(5, GRAPH_ITEMS, 97):
        del tree2[i]
        deleted += 1
    for i in range(GRAPH_ITEMS, GRAPH_ITEMS + 200):
        tree2[i] = PersistentDict(i=i, added=True)
    c2.commit()
    expected_count = GRAPH_ITEMS - deleted + 200
    digest_modified = digest(tree2)
    result["count_after_modify"] = len(tree2)
    result["digest_after_modify"] = digest_modified

    # A third connection sees the modifications.
    c3 = target.connection()
    tree3 = c3.get_root()["graph"]
    check(len(tree3) == expected_count, "c3 sees %d items, expected %d",
          len(tree3), expected_count)
    check(digest(tree3) == digest_modified, "c3 digest differs from c2's")

    # c1 still holds the old state in its cache; without a sync it reads
    # stale values, after commit()/abort() (which sync) it must see c2's.
    try:
        result["c1_stale_before_sync"] = digest(tree) == digest1
    except ConflictError as exc:
        result["c1_stale_before_sync"] = exc_name(exc)
    c1.abort()
    check(digest(tree) == digest_modified,
          "c1 after abort() (sync) does not see c2's modifications")
    result["c1_current_after_sync"] = True
    close(c1, c2, c3)
    return result


# ---------------------------------------------------------------- conflicts

def scenario_write_conflict(target):
    log = []
    c0 = target.connection()
    c0.get_root()["write_conflict"] = PersistentDict(
        counter=0, x=PersistentDict(v=0), y=PersistentDict(v=0))
    c0.commit()
    a = target.connection()
    b = target.connection()
    a_obj = a.get_root()["write_conflict"]
    b_obj = b.get_root()["write_conflict"]

    # 1. Both load and modify the same object; first commit wins.
    attempt("A.read_counter", lambda: a_obj["counter"], log)
    attempt("B.read_counter", lambda: b_obj["counter"], log)
    a_obj["counter"] = 1
    b_obj["counter"] = 2
    attempt("A.commit", a.commit, log)
    _, exc = attempt("B.commit", b.commit, log)
    check(isinstance(exc, WriteConflictError),
          "B.commit raised %r, expected WriteConflictError", exc)
    # B's connection is now conflicted: it must abort before going on.
    b.abort()
    attempt("B.read_counter_after_abort", lambda: b_obj["counter"], log)
    check(b_obj["counter"] == 1, "B sees %r after abort, expected 1",
          b_obj["counter"])
    b_obj["counter"] += 10
    attempt("B.retry_commit", b.commit, log)
    # A did not sync: its cached copy is stale; a commit() (sync) fixes it.
    attempt("A.read_counter_stale", lambda: a_obj["counter"], log)
    a.commit()
    attempt("A.read_counter_after_sync", lambda: a_obj["counter"], log)
    check(a_obj["counter"] == 11, "A sees %r, expected 11", a_obj["counter"])

    # 2. Disjoint objects: no conflict.  A changes x, B changes y; B had
    # x in its cache from an earlier transaction but did not touch it in
    # this one.
    a.abort(); b.abort()
    attempt("B.read_x_earlier", lambda: b_obj["x"]["v"], log)
    b.abort()
    b_y = b_obj["y"]
    a_obj["x"]["v"] = 1
    b_y["v"] = 1
    attempt("A.commit_x", a.commit, log)
    _, exc = attempt("B.commit_y", b.commit, log)
    check(exc is None, "disjoint commit raised %r", exc)
    attempt("B.read_x_after_commit", lambda: b_obj["x"]["v"], log)

    # 3. Read-write conflict: B reads x in this transaction and writes y;
    # A commits a change to x; B's commit must fail.
    a.abort(); b.abort()
    attempt("B.read_x", lambda: b_obj["x"]["v"], log)
    b_obj["y"]["v"] = 2
    a_obj["x"]["v"] = 2
    attempt("A.commit_x2", a.commit, log)
    _, exc = attempt("B.commit_y_after_reading_x", b.commit, log)
    check(isinstance(exc, WriteConflictError),
          "B.commit after reading x raised %r, expected "
          "WriteConflictError", exc)
    b.abort()
    attempt("B.read_y_after_abort", lambda: b_obj["y"]["v"], log)

    # 4. A conflicting commit that creates new objects: they are not
    # stored; the retry stores them.
    a.abort(); b.abort()
    b_obj["counter"]
    a_obj["counter"] = 100
    b_obj["new"] = PersistentDict(made_by="B", items=PersistentList([1, 2]))
    attempt("A.commit_counter", a.commit, log)
    _, exc = attempt("B.commit_with_new_objects", b.commit, log)
    check(isinstance(exc, WriteConflictError), "expected a "
          "WriteConflictError, got %r", exc)
    b.abort()
    check("new" not in b_obj, "aborted new object is still there")
    b_obj["new"] = PersistentDict(made_by="B", items=PersistentList([1, 2]))
    attempt("B.retry_with_new_objects", b.commit, log)

    c = target.connection()
    final = c.get_root()["write_conflict"]
    result = {
        "log": log,
        "final": {"counter": final["counter"], "x": final["x"]["v"],
                  "y": final["y"]["v"], "new_made_by": final["new"]["made_by"],
                  "new_items": list(final["new"]["items"])},
    }
    check(result["final"] == {"counter": 100, "x": 2, "y": 1,
                              "new_made_by": "B", "new_items": [1, 2]},
          "unexpected final state %r", result["final"])
    close(c0, a, b, c)
    return result


def scenario_read_conflict(target):
    log = []
    c0 = target.connection()
    c0.get_root()["read_conflict"] = PersistentDict(
        x=PersistentDict(v=0), y=PersistentDict(v=0), z=PersistentDict(v=0))
    c0.commit()

    # 1. Classic read conflict.  A has y loaded in this transaction and x
    # as a ghost.  B commits changes to x and y.  A then touches x: the
    # server answers the load with "invalid", the client syncs, sees that
    # y (read in this transaction) changed, and raises ReadConflictError.
    a = target.connection()
    b = target.connection()
    a_box = a.get_root()["read_conflict"]
    b_box = b.get_root()["read_conflict"]
    a_x = a_box["x"]                       # a ghost in A
    check(a_x._p_is_ghost(), "x should be a ghost in A")
    attempt("A.read_y", lambda: a_box["y"]["v"], log)
    b_box["x"]["v"] = 1
    b_box["y"]["v"] = 1
    attempt("B.commit_x_y", b.commit, log)
    _, exc = attempt("A.read_ghost_x", lambda: a_x["v"], log)
    check(isinstance(exc, ReadConflictError),
          "A reading invalidated ghost x raised %r, expected "
          "ReadConflictError", exc)
    a.abort()
    attempt("A.read_x_after_abort", lambda: a_x["v"], log)
    attempt("A.read_y_after_abort", lambda: a_box["y"]["v"], log)
    check((a_x["v"], a_box["y"]["v"]) == (1, 1), "A after abort sees %r",
          (a_x["v"], a_box["y"]["v"]))

    # 2. A ghost invalidated but nothing read in this transaction changed:
    # no error, the fresh state is loaded.
    a2 = target.connection()
    a2_box = a2.get_root()["read_conflict"]
    a2_x = a2_box["x"]
    check(a2_x._p_is_ghost(), "x should be a ghost in A2")
    b.abort()
    b_box["x"]["v"] = 2
    attempt("B.commit_x", b.commit, log)
    _, exc = attempt("A2.read_ghost_x", lambda: a2_x["v"], log)
    check(exc is None and a2_x["v"] == 2,
          "A2 reading ghost x: %r / %r", exc, a2_x["v"])

    # 3. A loaded (non-ghost) object is served from the cache: a stale
    # read without error until the next sync (commit/abort).
    a.abort(); b.abort()
    attempt("A.read_z", lambda: a_box["z"]["v"], log)
    b_box["z"]["v"] = 3
    attempt("B.commit_z", b.commit, log)
    _, exc = attempt("A.read_z_stale", lambda: a_box["z"]["v"], log)
    check(exc is None and a_box["z"]["v"] == 0, "expected a stale 0")
    a.commit()   # nothing changed: commit() just syncs
    attempt("A.read_z_after_commit", lambda: a_box["z"]["v"], log)
    check(a_box["z"]["v"] == 3, "expected 3 after sync")

    # 4. Loads of objects that did not change succeed even when the
    # connection has other invalidations pending on the server.
    a.abort(); b.abort()
    a3 = target.connection()
    a3_box = a3.get_root()["read_conflict"]
    a3_y = a3_box["y"]     # ghost
    b_box["x"]["v"] = 4
    attempt("B.commit_x4", b.commit, log)
    _, exc = attempt("A3.read_unchanged_ghost_y", lambda: a3_y["v"], log)
    check(exc is None, "loading an unchanged object raised %r", exc)

    # 5. Read conflict on a ghost, then write attempt in the same
    # transaction is refused until abort().
    a.abort(); b.abort()
    a_y = a_box["y"]
    a_y["v"]
    a_box["x"]._p_set_status_ghost()   # make x a ghost again
    b_box["x"]["v"] = 5
    b_box["y"]["v"] = 5
    attempt("B.commit_x5_y5", b.commit, log)
    value, exc = attempt("A.read_reghosted_x", lambda: a_box["x"]["v"], log)
    if target.snapshot_reads:
        # The one difference of snapshot reads: A synced (abort) before it
        # read y, so the load of x comes from that state (x = 4, the value
        # that goes with the y it read) instead of raising.
        check(exc is None and value == 4, "with snapshot reads, expected "
              "the snapshot's x = 4 without error, got %r / %r", value, exc)
    else:
        check(isinstance(exc, ReadConflictError), "expected "
              "ReadConflictError, got %r", exc)
    a.abort()
    attempt("A.read_x_final", lambda: a_box["x"]["v"], log)
    attempt("A.read_y_final", lambda: a_box["y"]["v"], log)
    close(c0, a, b, a2, a3)
    return {"log": log}


# ---------------------------------------------------------------- pack

def raw_load(target, oid):
    """The record at oid (bytes), loaded by a fresh ClientStorage, or
    the name of the exception raised."""
    storage = target.storage()
    try:
        storage.sync()
        try:
            return storage.load(oid)
        except KeyError:
            return "KeyError"
        except ReadConflictError:
            return "ReadConflictError"
    finally:
        storage.close()


def scenario_pack(target, pack_timeout=20.0):
    c1 = target.connection()
    root = c1.get_root()
    box = PersistentDict()
    root["pack"] = box
    roles = {}
    box["keep"] = PersistentDict(v="keep", child=PersistentDict(v="kchild"))
    box["keep_list"] = PersistentList([PersistentDict(v=i) for i in range(5)])
    box["drop"] = PersistentDict(v="drop")
    chain_end = PersistentDict(v="chain_end")
    box["drop_chain"] = PersistentDict(
        v="chain_head", next=PersistentDict(v="chain_mid", next=chain_end))
    cycle_a = PersistentDict(v="cycle_a")
    cycle_b = PersistentDict(v="cycle_b", other=cycle_a)
    cycle_a["other"] = cycle_b
    box["cycle"] = cycle_a
    moved = PersistentDict(v="moved")
    box["moved"] = moved
    box["drop_tree"] = BTree()
    for i in range(300):
        box["drop_tree"][i] = PersistentDict(i=i)
    c1.commit()
    roles["keep"] = box["keep"]
    roles["keep_child"] = box["keep"]["child"]
    roles["keep_list"] = box["keep_list"]
    roles["keep_list_item0"] = box["keep_list"][0]
    roles["moved"] = moved
    roles["drop"] = box["drop"]
    roles["chain_head"] = box["drop_chain"]
    roles["chain_mid"] = box["drop_chain"]["next"]
    roles["chain_end"] = chain_end
    roles["cycle_a"] = cycle_a
    roles["cycle_b"] = cycle_b
    roles["drop_tree"] = box["drop_tree"]
    roles["drop_tree_item7"] = box["drop_tree"][7]
    oids = dict((role, obj._p_oid) for role, obj in roles.items())
    check(len(set(oids.values())) == len(oids), "duplicate oids handed out")

    box["keep"]["moved_here"] = moved
    del box["moved"]
    del box["drop"]
    del box["drop_chain"]
    del box["cycle"]
    del box["drop_tree"]
    c1.commit()
    garbage = ["chain_end", "chain_head", "chain_mid", "cycle_a", "cycle_b",
               "drop", "drop_tree", "drop_tree_item7"]
    kept = ["keep", "keep_child", "keep_list", "keep_list_item0", "moved"]

    result = {}
    # Durus keeps unreferenced records until a pack; a server with an
    # incremental collector may already have reclaimed the acyclic ones
    # (their oids are then invalidated like packed ones). Neither is
    # observable below: only the state after pack() is compared.
    records = dict((role, raw_load(target, oids[role])) for role in garbage)
    records = dict((role, r) for role, r in records.items()
                   if isinstance(r, bytes))

    # c2 commits once before the pack, so that its client holds a pool of
    # oids allocated before the pack (Durus's FileStorage reuses the oids a
    # pack frees for oids allocated after it).
    c2 = target.connection()
    c2.get_root()["pack"]["keep"]["c2_before"] = PersistentDict(v="before")
    c2.commit()

    holder = roles["cycle_a"]          # c1 keeps a loaded garbage object
    holder["v"]
    c1.pack()
    # A commit (with a new object) from another connection right after the
    # pack request must survive the pack, whatever the pack's progress.
    c2.get_root()["pack"]["keep"]["during_pack"] = PersistentDict(
        v="during_pack")
    c2.commit()

    def status(role):
        found = raw_load(target, oids[role])
        if found == "KeyError":
            return "gone"
        if isinstance(found, bytes):
            if role in records and found != records[role]:
                # The oid now holds another object (a server may reuse
                # oids freed by a pack): the object is gone.
                return "gone"
            return "kept"
        return found       # ReadConflictError: a pack just finished

    deadline = time.monotonic() + pack_timeout
    while True:
        statuses = dict((role, status(role)) for role in garbage)
        if all(v == "gone" for v in statuses.values()):
            break
        check(time.monotonic() < deadline, "garbage still loadable %.0f s "
              "after pack(): %r", pack_timeout, statuses)
        time.sleep(0.2)
    result["after_pack"] = dict((role, status(role))
                                for role in garbage + kept)

    # c1 syncs (abort): the packed oids are invalidated, the loaded garbage
    # object becomes a ghost, and touching it raises ReadConflictError.
    c1.abort()
    result["c1_garbage_object_ghosted_after_sync"] = holder._p_is_ghost()
    try:
        holder["v"]
        result["c1_touch_packed_object"] = None
    except ConflictError as exc:
        result["c1_touch_packed_object"] = exc_name(exc)
    c1.abort()

    # Everything reachable still loads, from a fresh connection.
    c3 = target.connection()
    pbox = c3.get_root()["pack"]
    result["reachable"] = {
        "keep": pbox["keep"]["v"], "keep_child": pbox["keep"]["child"]["v"],
        "moved": pbox["keep"]["moved_here"]["v"],
        "during_pack": pbox["keep"]["during_pack"]["v"],
        "c2_before": pbox["keep"]["c2_before"]["v"],
        "keep_list": [d["v"] for d in pbox["keep_list"]],
        "box_keys": sorted(pbox.keys()),
    }
    check(result["reachable"]["during_pack"] == "during_pack",
          "object committed during pack lost")
    # New objects after a pack (Durus may reuse packed oids).
    pbox["after"] = PersistentList(PersistentDict(n=i) for i in range(20))
    c3.commit()
    c4 = target.connection()
    result["after_pack_new_objects"] = [
        d["n"] for d in c4.get_root()["pack"]["after"]]
    check(result["after_pack_new_objects"] == list(range(20)),
          "new objects after pack wrong")
    result["gone"] = sorted(r for r in garbage + kept
                            if result["after_pack"][r] == "gone")
    result["kept"] = sorted(r for r in garbage + kept
                            if result["after_pack"][r] == "kept")
    check(result["gone"] == sorted(garbage), "gone: %r", result["gone"])
    check(result["kept"] == sorted(kept), "kept: %r", result["kept"])
    close(c1, c2, c3, c4)
    return result


# ---------------------------------------------------------------- clients

MANY_WORKERS = 8
MANY_OWN_COMMITS = 25
MANY_INCREMENTS = 25
MANY_TREE_INSERTS = 8
MAX_RETRIES = 2000


def retrying(connection, function, commit=True):
    """Run function() and commit (or, for reads, abort), retrying on
    conflicts.  Returns the number of conflicts seen."""
    conflicts = 0
    while True:
        try:
            function()
            if commit:
                connection.commit()
            else:
                connection.abort()
            return conflicts
        except ConflictError:
            conflicts += 1
            connection.abort()
            if conflicts > MAX_RETRIES:
                raise ScenarioFailure("more than %d conflicts in a row"
                                      % MAX_RETRIES)


def many_worker(target, worker, queue):
    try:
        connection = target.connection(index=worker)
        conflicts = 0
        box = connection.get_root()["many_clients"]
        mine = box["slots"][worker]
        for step in range(MANY_OWN_COMMITS + MANY_INCREMENTS
                          + MANY_TREE_INSERTS):
            kind = step % 3
            if kind == 0:
                n = len(mine)
                if n < MANY_OWN_COMMITS:
                    def own():
                        mine["k%03d" % n] = PersistentList(
                            [worker, n, PersistentDict(sq=n * n)])
                    conflicts += retrying(connection, own)
            elif kind == 1:
                def increment():
                    box["counter"]["n"] += 1
                conflicts += retrying(connection, increment)
            else:
                key = (worker, step)
                def insert():
                    box["tree"][key] = worker * 1000 + step
                conflicts += retrying(connection, insert)
            # Loads: re-read own objects; peek at a neighbour's.  Reads
            # too can conflict (ReadConflictError): abort and read again.
            def read():
                for key, value in mine.items():
                    if value[0] != worker or value[2]["sq"] != value[1] ** 2:
                        raise ScenarioFailure("worker %d read back %r"
                                              % (worker, key))
                len(box["slots"][(worker + 1) % MANY_WORKERS])
                box["counter"]["n"]
            conflicts += retrying(connection, read, commit=False)
        while len(mine) < MANY_OWN_COMMITS:
            n = len(mine)
            def own_rest():
                mine["k%03d" % n] = PersistentList(
                    [worker, n, PersistentDict(sq=n * n)])
            conflicts += retrying(connection, own_rest)
        close(connection)
        queue.put((worker, "ok", conflicts))
    except BaseException:
        queue.put((worker, "error", traceback.format_exc()))


def scenario_many_clients(target, timeout=240.0):
    c0 = target.connection()
    box = PersistentDict()
    box["counter"] = PersistentDict(n=0)
    box["slots"] = PersistentList(PersistentDict()
                                  for _ in range(MANY_WORKERS))
    box["tree"] = BTree()
    c0.get_root()["many_clients"] = box
    c0.commit()
    close(c0)

    # How many increments and inserts each worker makes.
    increments = sum(1 for step in range(MANY_OWN_COMMITS + MANY_INCREMENTS
                                         + MANY_TREE_INSERTS)
                     if step % 3 == 1)
    inserts = sum(1 for step in range(MANY_OWN_COMMITS + MANY_INCREMENTS
                                      + MANY_TREE_INSERTS)
                  if step % 3 == 2)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context(
        "fork" if "fork" in methods else "spawn")
    queue = context.Queue()
    processes = [context.Process(target=many_worker,
                                 args=(target, w, queue))
                 for w in range(MANY_WORKERS)]
    for p in processes:
        p.start()
    reports = {}
    errors = []
    deadline = time.monotonic() + timeout
    try:
        while len(reports) < MANY_WORKERS:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                worker, status, detail = queue.get(timeout=min(remaining, 5))
            except Exception:
                if not any(p.is_alive() for p in processes) and \
                        queue.empty():
                    break
                continue
            reports[worker] = status
            if status != "ok":
                errors.append("worker %d:\n%s" % (worker, detail))
            else:
                sys.stderr.write("many_clients: worker %d done, %d "
                                 "conflicts retried\n" % (worker, detail))
    finally:
        for p in processes:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    check(not errors, "worker errors:\n%s", "\n".join(errors))
    check(len(reports) == MANY_WORKERS, "only %d of %d workers reported "
          "within %.0f s", len(reports), MANY_WORKERS, timeout)

    c = target.connection()
    box = c.get_root()["many_clients"]
    slot_sizes = [len(slot) for slot in box["slots"]]
    slot_ok = all(
        slot["k%03d" % n][0] == w and slot["k%03d" % n][1] == n and
        slot["k%03d" % n][2]["sq"] == n * n
        for w, slot in enumerate(box["slots"])
        for n in range(MANY_OWN_COMMITS))
    tree_items = list(box["tree"].items())
    tree_ok = tree_items == sorted(
        ((w, step), w * 1000 + step) for w in range(MANY_WORKERS)
        for step in range(MANY_OWN_COMMITS + MANY_INCREMENTS
                          + MANY_TREE_INSERTS) if step % 3 == 2)
    result = {
        "workers": MANY_WORKERS,
        "counter": box["counter"]["n"],
        "expected_counter": MANY_WORKERS * increments,
        "slot_sizes": slot_sizes,
        "slots_content_ok": slot_ok,
        "tree_len": len(tree_items),
        "expected_tree_len": MANY_WORKERS * inserts,
        "tree_content_ok": tree_ok,
    }
    check(result["counter"] == result["expected_counter"],
          "lost update: counter %d, expected %d", result["counter"],
          result["expected_counter"])
    check(slot_sizes == [MANY_OWN_COMMITS] * MANY_WORKERS,
          "slot sizes %r", slot_sizes)
    check(slot_ok, "slot contents wrong")
    check(tree_ok, "BTree contents wrong (%d items)", len(tree_items))
    close(c)
    return result


# ---------------------------------------------------------------- unix

def scenario_unix_socket(target):
    if not target.address:
        return {"skipped": "needs --address"}
    a = target.connection()
    payload = bytes(range(256)) * 300
    a.get_root()["unix_socket"] = PersistentDict(
        msg="hello", data=payload, items=PersistentList(range(100)))
    a.commit()
    b = target.connection()
    box = b.get_root()["unix_socket"]
    check(box["msg"] == "hello" and box["data"] == payload and
          list(box["items"]) == list(range(100)), "round trip mismatch")
    box["msg"] = "changed by b"
    b.commit()
    stale = a.get_root()["unix_socket"]["msg"]
    a.abort()
    fresh = a.get_root()["unix_socket"]["msg"]
    check(fresh == "changed by b", "a sees %r after sync", fresh)
    close(a, b)
    return {"round_trip": True, "a_before_sync": stale,
            "a_after_sync": fresh, "data_sha256":
            hashlib.sha256(payload).hexdigest()}


# ---------------------------------------------------------------- reattach

REATTACH_PAUSE = 3.0


def scenario_reattach(target):
    """Objects detached by one commit and attached again by a later one, a
    few seconds apart, while the application still holds them: Durus keeps
    every object until a pack, so the second commit must succeed and
    everything must read back from a second connection."""
    c1 = target.connection()
    root = c1.get_root()
    box = PersistentDict()
    root["reattach"] = box
    box["one"] = PersistentDict(v="one")
    head = PersistentDict(v=0)
    node = head
    for i in range(1, 50):
        nxt = PersistentDict(v=i)
        node["next"] = nxt
        node = nxt
    box["chain"] = head
    cycle_a = PersistentDict(v="a")
    cycle_b = PersistentDict(v="b", other=cycle_a)
    cycle_a["other"] = cycle_b
    box["cycle"] = cycle_a
    c1.commit()
    one, chain, cycle = box["one"], box["chain"], box["cycle"]
    del box["one"]
    del box["chain"]
    del box["cycle"]
    c1.commit()
    time.sleep(REATTACH_PAUSE)
    box["one_again"] = one
    box["chain_again"] = chain
    box["cycle_again"] = cycle
    c1.commit()
    c2 = target.connection()
    box2 = c2.get_root()["reattach"]
    values = []
    node = box2["chain_again"]
    while node is not None:
        values.append(node["v"])
        node = node.get("next")
    check(values == list(range(50)), "the chain read back as %r", values)
    a = box2["cycle_again"]
    result = {
        "one": box2["one_again"]["v"],
        "chain": values,
        "cycle": [a["v"], a["other"]["v"], a["other"]["other"]["v"]],
        "keys": sorted(box2.keys()),
    }
    close(c1, c2)
    return result


SCENARIOS = [
    ("graph", scenario_graph),
    ("write_conflict", scenario_write_conflict),
    ("read_conflict", scenario_read_conflict),
    ("pack", scenario_pack),
    ("reattach", scenario_reattach),
    ("many_clients", scenario_many_clients),
    ("unix_socket", scenario_unix_socket),
]
SCENARIO_NAMES = [name for name, _ in SCENARIOS]


def run_scenario(name, target, options):
    function = dict(SCENARIOS)[name]
    started = time.monotonic()
    try:
        if name == "pack":
            result = function(target, pack_timeout=options.pack_timeout)
        else:
            result = function(target)
        line = {"scenario": name, "ok": True, "result": result}
    except ScenarioFailure as exc:
        line = {"scenario": name, "ok": False, "error": str(exc)}
    except Exception as exc:
        line = {"scenario": name, "ok": False,
                "error": "%s: %s" % (exc_name(exc), exc)}
        traceback.print_exc(file=sys.stderr)
    sys.stderr.write("interop.py: %s %s in %.1f s\n" % (
        name, "passed" if line["ok"] else "FAILED: " + line["error"],
        time.monotonic() - started))
    sys.stdout.write(json.dumps(line, sort_keys=True) + "\n")
    sys.stdout.flush()
    return line["ok"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--address", default=None,
                        help="path of the server's Unix domain socket")
    parser.add_argument("--also-port", type=int, action="append", default=[],
                        help="another server of the same store (a front end "
                        "over the same database): connections alternate "
                        "between --port and these (repeatable)")
    parser.add_argument("--tls-ca", default=None,
                        help="connect with TLS (durus_redb.client."
                        "TLSClientStorage), trusting this CA's PEM file")
    parser.add_argument("--tls-cert", default=None,
                        help="the client's certificate (PEM), with --tls-ca")
    parser.add_argument("--tls-key", default=None,
                        help="the key of --tls-cert (PEM)")
    parser.add_argument("--scenario", action="append", default=None,
                        choices=SCENARIO_NAMES + ["all"],
                        help="scenario to run (repeatable; default all)")
    parser.add_argument("--pack-timeout", type=float, default=20.0,
                        help="seconds to wait for a pack to remove garbage")
    parser.add_argument("--snapshot-reads", action="store_true",
                        help="the server serves snapshot reads: expect a "
                        "synced connection's loads to come from its "
                        "snapshot (read_conflict step 5)")
    parser.add_argument("--list", action="store_true",
                        help="list scenario names and exit")
    options = parser.parse_args(argv)
    if options.list:
        print("\n".join(SCENARIO_NAMES))
        return 0
    if options.address is None and options.port is None:
        parser.error("give --port (with optional --host) or --address")
    if options.host not in ("127.0.0.1", "localhost", "::1") and \
            options.address is None:
        sys.stderr.write("interop.py: warning: host %s is not local\n"
                         % options.host)
    tls = None
    if options.tls_ca:
        # The durus_redb package of this source tree (python/).
        import os
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(
            __file__)), "..", "..", "python"))
        tls = (options.tls_ca, options.tls_cert, options.tls_key)
    target = Target(host=options.host, port=options.port,
                    address=options.address,
                    snapshot_reads=options.snapshot_reads,
                    also_ports=options.also_port, tls=tls)
    names = options.scenario or ["all"]
    if "all" in names:
        names = SCENARIO_NAMES
    failures = [name for name in names
                if not run_scenario(name, target, options)]
    if failures:
        sys.stderr.write("interop.py: FAILED: %s\n" % ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
