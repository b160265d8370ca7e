"""Clients of ``durus-redb serve`` beyond Durus's own.

``TLSClientStorage`` is Durus's ``ClientStorage`` over TLS, for a server
started with ``--tls-cert`` and ``--tls-key`` (and ``--tls-client-ca`` to
admit only clients with a certificate)::

    from durus.connection import Connection
    from durus_redb.client import TLSClientStorage

    storage = TLSClientStorage(host="db.example", port=2972,
                               cafile="ca.pem",
                               certfile="client.pem", keyfile="client.key")
    connection = Connection(storage)

It uses Python's standard ``ssl`` module, and needs Durus installed.
"""

import socket
import ssl

from durus.client_storage import ClientStorage
from durus.error import ProtocolError
from durus.storage_server import DEFAULT_HOST, DEFAULT_PORT, SocketAddress, StorageServer
from durus.utils import read, write_all

__all__ = ["TLSClientStorage"]


class _Socket(object):
    """An SSL socket as Durus's helpers expect a socket.

    ``durus.utils.read`` calls a ``read`` method when the object has one,
    and takes a short answer as the end of the stream; an SSL socket's
    ``read`` returns at most one TLS record. Offering only ``recv`` and
    ``send`` makes Durus read in a loop, as it does from a plain socket.
    """

    def __init__(self, sock):
        self._sock = sock

    def recv(self, n):
        return self._sock.recv(n)

    def send(self, data):
        return self._sock.send(data)

    def sendall(self, data):
        return self._sock.sendall(data)

    def close(self):
        try:
            self._sock.unwrap()
        except (OSError, ValueError, ssl.SSLError):
            pass
        self._sock.close()

    def __getattr__(self, name):
        if name in ("read", "write"):
            raise AttributeError(name)
        return getattr(self._sock, name)


class TLSClientStorage(ClientStorage):
    """Durus's ``ClientStorage`` over TLS.

    ``cafile``: the CA that signed the server's certificate (``None``:
    the system's CAs). ``certfile`` and ``keyfile``: this client's
    certificate and key, for a server that admits only clients with one.
    ``server_hostname``: the name the server's certificate must carry, if
    not ``host``. ``context``: an ``ssl.SSLContext`` to use instead.
    """

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, cafile=None,
                 certfile=None, keyfile=None, server_hostname=None,
                 context=None):
        if context is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
            if certfile is not None:
                context.load_cert_chain(certfile, keyfile)
        self.address = SocketAddress.new((host, port))
        raw = socket.create_connection((host, port))
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_hostname=server_hostname or host)
        except Exception:
            raw.close()
            raise
        self.s = _Socket(sock)
        self.oid_pool = []
        self.oid_pool_size = 32
        self.begin()
        protocol = StorageServer.protocol
        write_all(self.s, "V", protocol)
        server_protocol = read(self.s, 4)
        if server_protocol != protocol:
            raise ProtocolError("Protocol version mismatch.")

    def __str__(self):
        return "TLSClientStorage(%s)" % (self.address,)
