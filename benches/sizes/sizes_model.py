"""Persistent classes used by gen_stores.py (importable so Durus can unpickle)."""
from durus.persistent import Persistent


class Item(Persistent):
    """A small object: a few short attributes."""
    def __init__(self, n, name, tag, qty):
        self.n = n
        self.name = name
        self.tag = tag
        self.qty = qty


class Document(Persistent):
    """About 1 KB of mixed text: title, author, email, date, body, tags, numbers."""
    def __init__(self, n, title, author, email, date, body, tags, scores):
        self.n = n
        self.title = title
        self.author = author
        self.email = email
        self.date = date
        self.body = body
        self.tags = tags
        self.scores = scores
