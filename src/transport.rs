//! Addresses, listeners and streams: TCP and Unix sockets behind one type,
//! shared by the server and the client.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// Where a server listens, or a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Address {
    /// A TCP host and port.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port (0 picks a free one when listening).
        port: u16,
    },
    /// A Unix domain socket.
    Unix {
        /// Path of the socket file.
        path: PathBuf,
        /// Owner (uid) given to the socket file when listening.
        owner: Option<u32>,
        /// Group (gid) given to the socket file when listening.
        group: Option<u32>,
        /// Permissions of the socket file: `0o777 & !umask`.
        umask: Option<u32>,
    },
}

impl Address {
    /// A TCP address.
    pub fn tcp(host: impl Into<String>, port: u16) -> Address {
        Address::Tcp {
            host: host.into(),
            port,
        }
    }

    /// A Unix socket address with default ownership and permissions.
    pub fn unix(path: impl Into<PathBuf>) -> Address {
        Address::Unix {
            path: path.into(),
            owner: None,
            group: None,
            umask: None,
        }
    }

    /// Connects to a server at this address.
    pub(crate) fn connect(&self) -> io::Result<Stream> {
        Ok(match self {
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Address::Unix { path, .. } => Stream::Unix(UnixStream::connect(path)?),
        })
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix { path, .. } => write!(f, "{}", path.display()),
        }
    }
}

/// A connected socket of either kind.
#[derive(Debug)]
pub(crate) enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
    /// TLS over TCP.
    #[cfg(feature = "tls")]
    Tls(crate::tls::TlsStream),
}

impl Stream {
    /// Another handle to the same socket.
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Stream::Tls(s.clone()),
        })
    }

    /// Sets the read timeout (`None`: wait forever).
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.socket().set_read_timeout(t),
        }
    }

    /// Sets the write timeout (`None`: wait forever).
    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.socket().set_write_timeout(t),
        }
    }

    /// Switches non-blocking mode on or off.
    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.socket().set_nonblocking(on),
        }
    }

    /// Shuts both directions down; a thread blocked reading wakes up.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                s.close_notify();
                s.socket().shutdown(Shutdown::Both)
            }
        };
    }

    /// Whether the peer is on this machine: a Unix socket, or TCP from a
    /// loopback address.
    pub(crate) fn is_local(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.peer_addr().is_ok_and(|a| is_loopback(a.ip())),
            Stream::Unix(_) => true,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.socket().peer_addr().is_ok_and(|a| is_loopback(a.ip())),
        }
    }

    /// The common names of the peer's TLS certificate (none without TLS or
    /// without a certificate).
    pub(crate) fn peer_common_names(&self) -> Vec<String> {
        match self {
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.peer_common_names(),
            _ => Vec::new(),
        }
    }

    /// The peer, for log lines.
    pub(crate) fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp peer".into(), |a| a.to_string()),
            Stream::Unix(_) => "unix peer".into(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s
                .socket()
                .peer_addr()
                .map_or_else(|_| "tls peer".into(), |a| format!("{a} (TLS)")),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.read(buf),
        }
    }
}

/// Writes through a shared handle (the commit order's grant writes a
/// waiting client's invalidations from another connection's thread).
impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            #[cfg(feature = "tls")]
            Stream::Tls(s) => (&*s).flush(),
            _ => Ok(()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        // Sockets have no buffer of their own to flush.
        (&*self).flush()
    }
}

/// A listening socket of either kind.
#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `address`. A Unix socket gets the owner, group and permissions
    /// asked for; a stale socket file nobody listens on is replaced.
    pub(crate) fn bind(address: &Address) -> io::Result<(Listener, Address)> {
        match address {
            Address::Tcp { host, port } => {
                let l = TcpListener::bind((host.as_str(), *port))?;
                let bound = Address::tcp(host.clone(), l.local_addr()?.port());
                Ok((Listener::Tcp(l), bound))
            }
            Address::Unix {
                path,
                owner,
                group,
                umask,
            } => {
                let l = match UnixListener::bind(path) {
                    Ok(l) => l,
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                        if UnixStream::connect(path).is_ok() {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!("a server already listens on {}", path.display()),
                            ));
                        }
                        let meta = std::fs::symlink_metadata(path)?;
                        use std::os::unix::fs::FileTypeExt;
                        if !meta.file_type().is_socket() {
                            return Err(io::Error::new(
                                io::ErrorKind::AlreadyExists,
                                format!("{} exists and is not a socket", path.display()),
                            ));
                        }
                        std::fs::remove_file(path)?;
                        UnixListener::bind(path)?
                    }
                    Err(e) => return Err(e),
                };
                if let Some(mask) = umask {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777 & !mask))?;
                }
                if owner.is_some() || group.is_some() {
                    std::os::unix::fs::chown(path, *owner, *group)?;
                }
                Ok((Listener::Unix(l, path.clone()), address.clone()))
            }
        }
    }

    pub(crate) fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A loopback address, IPv4, IPv6, or IPv4 mapped into IPv6.
pub(crate) fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_addresses_of_every_kind_are_local_and_no_other() {
        for local in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "192.0.2.2",
            "10.0.0.1",
            "0.0.0.0",
            "::",
            "fd00::2",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_loopback(remote.parse().unwrap()), "{remote}");
        }
    }
}
