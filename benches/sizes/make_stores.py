"""Writes three Durus 4.3 FileStorage files into data/:
  small.durus  : 300,000 small objects (200k Item + 100k PersistentDict) in BTrees
  docs.durus   : 60,000 Document objects of ~1 KB mixed text each, in a BTree
  btree.durus  : one durus.btree.BTree of 500,000 int -> short str entries (random key order)
Commits in batches of 5,000 objects / entries. Deterministic (seeded).
Usage: PYTHON make_stores.py DIR [small|docs|btree ...] (PYTHON: one with durus==4.3)"""
import os, random, re, sys, glob, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from durus.file_storage import FileStorage
from durus.connection import Connection
from durus.btree import BTree
from durus.persistent_dict import PersistentDict
from durus.persistent_list import PersistentList
from sizes_model import Item, Document

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "data")
BATCH = 5000


def vocabulary():
    """Words taken from the docstrings/comments of Python's stdlib: real English-ish
    technical vocabulary; sampled with a Zipf-like weight so common words repeat."""
    import sysconfig
    lib = sysconfig.get_paths()["stdlib"]
    counts = {}
    for path in sorted(glob.glob(os.path.join(lib, "*.py")))[:150]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            for w in re.findall(r"[A-Za-z][a-z]{1,14}", f.read()):
                w = w.lower()
                counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: -counts[w])[:8000]
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(words))]
    return words, weights


def fresh(path):
    for p in (path, path + ".prepack", path + ".pack"):
        if os.path.exists(p):
            os.remove(p)
    return Connection(FileStorage(path))


def gen_small(rng):
    conn = fresh(os.path.join(OUT, "small.durus"))
    root = conn.get_root()
    root["items"] = BTree()
    root["dicts"] = BTree()
    conn.commit()
    tags = ["red", "green", "blue", "alpha", "beta", "gamma", "new", "old"]
    for i in range(200000):
        root["items"][i] = Item(i, "item-%06d" % i, rng.choice(tags), rng.randint(0, 999))
        if (i + 1) % BATCH == 0:
            conn.commit()
    for i in range(100000):
        d = PersistentDict()
        d["id"] = i
        d["label"] = "d%d" % rng.randint(0, 10**6)
        d["ok"] = rng.random() < 0.5
        root["dicts"][i] = d
        if (i + 1) % BATCH == 0:
            conn.commit()
    conn.commit()
    conn.storage.close()


def sentence(rng, words, weights, n):
    ws = rng.choices(words, weights, k=n)
    s = " ".join(ws)
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!"])


def gen_docs(rng):
    words, weights = vocabulary()
    first = ["Anna", "Ben", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun",
             "Kofi", "Lena", "Marta", "Nils", "Omar", "Paula", "Quinn", "Rosa", "Sven", "Tara"]
    last = ["Smith", "Novak", "Garcia", "Kim", "Okafor", "Schmidt", "Rossi", "Silva",
            "Tanaka", "Dubois", "Jensen", "Kowalski", "Haddad", "Nguyen", "Larsen"]
    conn = fresh(os.path.join(OUT, "docs.durus"))
    root = conn.get_root()
    root["docs"] = BTree()
    conn.commit()
    total = 0
    for i in range(60000):
        f, l = rng.choice(first), rng.choice(last)
        body = []
        blen = 0
        target = rng.randint(650, 950)
        while blen < target:
            s = sentence(rng, words, weights, rng.randint(5, 18))
            body.append(s)
            blen += len(s) + 1
        body = " ".join(body)
        doc = Document(
            i,
            sentence(rng, words, weights, rng.randint(3, 8))[:-1],
            "%s %s" % (f, l),
            "%s.%s%d@example.%s" % (f.lower(), l.lower(), rng.randint(1, 99), rng.choice(["org", "com", "net"])),
            "20%02d-%02d-%02dT%02d:%02d:%02d" % (rng.randint(10, 25), rng.randint(1, 12), rng.randint(1, 28),
                                                  rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)),
            body,
            rng.sample(words[:300], rng.randint(2, 6)),
            [round(rng.uniform(0, 100), 2) for _ in range(rng.randint(3, 10))],
        )
        total += len(body) + 60
        root["docs"][i] = doc
        if (i + 1) % BATCH == 0:
            conn.commit()
    conn.commit()
    conn.storage.close()
    print("docs: mean text chars per doc ~", total // 60000)


def gen_btree(rng):
    conn = fresh(os.path.join(OUT, "btree.durus"))
    root = conn.get_root()
    t = root["index"] = BTree()
    conn.commit()
    keys = list(range(500000))
    rng.shuffle(keys)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po"]
    for j, k in enumerate(keys):
        t[k * 7 + 3] = "".join(rng.choice(syll) for _ in range(rng.randint(2, 5))) + "-%d" % (k % 1000)
        if (j + 1) % BATCH == 0:
            conn.commit()
    conn.commit()
    conn.storage.close()


if __name__ == "__main__":
    which = sys.argv[2:] or ["small", "docs", "btree"]
    for name in which:
        t = time.time()
        globals()["gen_" + name](random.Random(1234))
        p = os.path.join(OUT, name + ".durus")
        print("%s: %d bytes, %.1fs" % (p, os.path.getsize(p), time.time() - t), flush=True)
