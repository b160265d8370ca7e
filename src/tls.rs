//! TLS on the Durus protocol: the server's and the client's settings, read
//! from PEM files, and an encrypted stream that several threads share.
//!
//! rustls with its `ring` provider: no OpenSSL. The server's TCP listener
//! speaks TLS when it is given a certificate and key; given a CA as well,
//! it admits only clients whose certificate that CA signed (mutual TLS,
//! which is the authentication). A Unix socket stays plain: the owner,
//! group and mode of its file are its access control.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A TLS setting that could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read, or holds nothing of what it should.
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The certificates and key do not make a valid setting (a key that
    /// does not match its certificate, say).
    #[error("{0}")]
    Config(String),
}

/// ring's provider: it builds with a C compiler alone (aws-lc-rs, the
/// other, wants more), at the price of no post-quantum key exchange, for
/// which rustls marks it deprecated.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |why: String| TlsError::File {
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(e.to_string()))?;
    if certs.is_empty() {
        return Err(file("no certificate (PEM, BEGIN CERTIFICATE) in it".into()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        why: format!("no private key (PEM, PKCS#8, PKCS#1 or SEC1) read from it: {e}"),
    })
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The server's side: its certificate and key, and the CA its clients'
/// certificates must be signed by, if any.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    clients_verified: bool,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("clients_verified", &self.clients_verified)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// From PEM files: the server's certificate chain, its private key,
    /// and (for mutual TLS) the CA that signs the admitted clients'
    /// certificates.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsServer, TlsError> {
        let chain = certificates(cert)?;
        let key = private_key(key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots(ca)?,
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("the certificate and key: {e}")))?;
        Ok(TlsServer {
            config: Arc::new(config),
            clients_verified: client_ca.is_some(),
        })
    }

    /// Whether only clients with a certificate of the CA are admitted.
    pub fn clients_verified(&self) -> bool {
        self.clients_verified
    }

    /// The handshake with a client just accepted, within `timeout`; the
    /// encrypted stream once it is done.
    pub(crate) fn accept(&self, sock: TcpStream, timeout: Duration) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        TlsStream::handshake(sock, rustls::Connection::Server(conn), timeout)
    }
}

/// The client's side: the CA that signed the server's certificate, and
/// the client's own certificate and key when the server asks for one.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// From PEM files: the CA to trust for the server's certificate, and
    /// the client's certificate chain and key (for a server that admits
    /// only clients with one).
    pub fn from_pem_files(
        ca: &Path,
        client: Option<(&Path, &Path)>,
    ) -> Result<TlsClient, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca)?);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(certificates(cert)?, private_key(key)?)
                .map_err(|e| TlsError::Config(format!("the client certificate and key: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        Ok(TlsClient {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// The name the server's certificate must carry, when it is not the
    /// host connected to (an IP address must be in the certificate too).
    pub fn with_server_name(mut self, name: impl Into<String>) -> TlsClient {
        self.server_name = Some(name.into());
        self
    }

    /// The rustls settings (for the database's connections).
    #[cfg(feature = "postgres")]
    pub(crate) fn rustls_config(&self) -> rustls::ClientConfig {
        (*self.config).clone()
    }

    /// The handshake with the server at `host`, within `timeout`.
    pub(crate) fn connect(
        &self,
        sock: TcpStream,
        host: &str,
        timeout: Duration,
    ) -> io::Result<TlsStream> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a server name TLS can check: {e}"),
            )
        })?;
        let conn =
            rustls::ClientConnection::new(self.config.clone(), name).map_err(io::Error::other)?;
        TlsStream::handshake(sock, rustls::Connection::Client(conn), timeout)
    }
}

/// An encrypted TCP stream. Clones share the TLS state: one reads while
/// others write (the server's grant writes a waiting client's
/// invalidations from another connection's thread). A reader waits for
/// the socket without the state's lock, so writers are not held up by it.
#[derive(Debug)]
pub(crate) struct TlsStream {
    sock: Arc<TcpStream>,
    tls: Arc<Mutex<rustls::Connection>>,
    /// What is read from the socket before TLS takes it (each clone its own).
    raw: Vec<u8>,
}

impl Clone for TlsStream {
    fn clone(&self) -> TlsStream {
        TlsStream {
            sock: self.sock.clone(),
            tls: self.tls.clone(),
            raw: Vec::new(),
        }
    }
}

/// TLS's failures as I/O errors that name TLS.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsStream {
    fn handshake(
        sock: TcpStream,
        mut tls: rustls::Connection,
        timeout: Duration,
    ) -> io::Result<TlsStream> {
        let (read_timeout, write_timeout) = (sock.read_timeout()?, sock.write_timeout()?);
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        let deadline = std::time::Instant::now() + timeout;
        let mut s = &sock;
        while tls.is_handshaking() {
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the TLS handshake did not finish in time",
                ));
            }
            match tls.complete_io(&mut s) {
                Ok(_) => {}
                Err(e) => {
                    // An alert for the peer, if one is due, before closing.
                    let _ = tls.write_tls(&mut s);
                    return Err(e);
                }
            }
        }
        while tls.wants_write() {
            tls.write_tls(&mut s)?;
        }
        sock.set_read_timeout(read_timeout)?;
        sock.set_write_timeout(write_timeout)?;
        Ok(TlsStream {
            sock: Arc::new(sock),
            tls: Arc::new(Mutex::new(tls)),
            raw: Vec::new(),
        })
    }

    /// The socket under it (timeouts, shutdown, the peer's address).
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The common names (CN) in the subject of the peer's certificate: a
    /// client's, on the server (empty without one).
    pub(crate) fn peer_common_names(&self) -> Vec<String> {
        self.tls
            .lock()
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| subject_common_names(c))
            .unwrap_or_default()
    }

    fn send_pending(&self, tls: &mut rustls::Connection) -> io::Result<()> {
        let mut s = &*self.sock;
        while tls.wants_write() {
            tls.write_tls(&mut s)?;
        }
        Ok(())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.raw.is_empty() {
            self.raw = vec![0u8; 18 * 1024];
        }
        loop {
            {
                let mut tls = self.tls.lock();
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // Nothing decrypted is waiting: wait for the socket, without
            // the lock (a read timeout leaves nothing half taken).
            let n = (&*self.sock).read(&mut self.raw)?;
            let mut tls = self.tls.lock();
            let mut bytes = &self.raw[..n];
            loop {
                // At the end of the stream read_tls reads 0, which rustls
                // takes as the peer having gone: the reader then answers
                // end of stream (or an error, if it went without saying so).
                let taken = tls.read_tls(&mut bytes)?;
                if let Err(e) = tls.process_new_packets() {
                    let _ = self.send_pending(&mut tls);
                    return Err(tls_error(e));
                }
                if taken == 0 || bytes.is_empty() {
                    break;
                }
            }
            // Whatever TLS itself has to say back (a key update, say).
            self.send_pending(&mut tls)?;
        }
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut tls = self.tls.lock();
        let n = tls.writer().write(buf)?;
        self.send_pending(&mut tls)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut tls = self.tls.lock();
        self.send_pending(&mut tls)
    }
}

impl TlsStream {
    /// Says goodbye (TLS's close_notify), as far as the socket takes it.
    pub(crate) fn close_notify(&self) {
        let mut tls = self.tls.lock();
        tls.send_close_notify();
        let _ = self
            .sock
            .set_write_timeout(Some(Duration::from_millis(200)));
        let _ = self.send_pending(&mut tls);
    }
}

/// One DER element: its tag, its contents and what follows it. Single-byte
/// tags and lengths up to four bytes, which is all a certificate's
/// subject needs; anything else is `None`.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, &b| (l << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The common names of a certificate's subject (RFC 5280: the subject
/// follows the version, serial number, signature algorithm, issuer and
/// validity in the TBSCertificate). The certificate was verified by the
/// TLS handshake before this reads it; still, input it cannot read gives
/// no name rather than a panic.
pub(crate) fn subject_common_names(cert: &[u8]) -> Vec<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let names = || -> Option<Vec<String>> {
        let (SEQUENCE, cert, _) = der(cert)? else {
            return None;
        };
        let (SEQUENCE, mut tbs, _) = der(cert)? else {
            return None;
        };
        if let (0xa0, _, rest) = der(tbs)? {
            tbs = rest; // the version
        }
        let (0x02, _, mut rest) = der(tbs)? else {
            return None; // the serial number
        };
        for _ in 0..3 {
            // the signature algorithm, the issuer, the validity
            let (SEQUENCE, _, r) = der(rest)? else {
                return None;
            };
            rest = r;
        }
        let (SEQUENCE, mut subject, _) = der(rest)? else {
            return None;
        };
        let mut names = Vec::new();
        while !subject.is_empty() {
            let (SET, mut rdn, r) = der(subject)? else {
                return None;
            };
            subject = r;
            while !rdn.is_empty() {
                let (SEQUENCE, attribute, r) = der(rdn)? else {
                    return None;
                };
                rdn = r;
                let (0x06, oid, value) = der(attribute)? else {
                    return None;
                };
                if oid == CN {
                    // UTF8String, PrintableString, TeletexString, IA5String
                    if let (0x0c | 0x13 | 0x14 | 0x16, text, _) = der(value)?
                        && let Ok(text) = std::str::from_utf8(text)
                    {
                        names.push(text.to_string());
                    }
                }
            }
        }
        Some(names)
    };
    names().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::subject_common_names;

    #[test]
    fn the_common_names_of_a_certificate_subject_are_read_and_bad_input_gives_none() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "durus-redb tests");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "operator-1");
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(subject_common_names(&der), vec!["operator-1".to_string()]);
        // A subject without a CN.
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "no name");
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert!(subject_common_names(&der).is_empty());
        // Cut anywhere, or garbage: no name, no panic.
        let good = {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, "x");
            p.self_signed(&key).unwrap().der().to_vec()
        };
        for cut in 0..good.len() {
            let _ = subject_common_names(&good[..cut]);
        }
        for byte in 0..=255u8 {
            let _ = subject_common_names(&[0x30, 0x84, byte, 0xff, 0xff, 0xff]);
        }
        assert!(subject_common_names(b"").is_empty());
    }
}
