//! A database URL: rust-postgres's configuration, and TLS to the database
//! from libpq's parameters.
//!
//! rust-postgres reads `sslmode=disable|prefer|require` but not libpq's
//! `sslrootcert`, `sslcert`, `sslkey` or `sslmode=verify-full`; this reads
//! those and gives the connections rustls (as the Durus port's TLS).
//! Unlike libpq's `require`, which encrypts without checking whom it talks
//! to, TLS here always verifies the server's certificate against
//! `sslrootcert` and its host name: `require` and `verify-full` are the
//! same. `verify-ca` (no host name check) is refused with a message.

use std::path::PathBuf;
use std::str::FromStr;

use postgres::config::SslMode;

use super::database;
use crate::error::Result;

/// Where the database is and how to reach it.
#[derive(Clone)]
pub(crate) struct Database {
    pub(super) config: postgres::Config,
    /// TLS to the database, if the URL asks for it.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl From<postgres::Config> for Database {
    /// A configuration without TLS.
    fn from(config: postgres::Config) -> Database {
        Database { config, tls: None }
    }
}

/// One of libpq's TLS parameters this reads itself.
fn ours(key: &str) -> bool {
    matches!(key, "sslrootcert" | "sslcert" | "sslkey")
}

/// `%XX` in a URL's query value.
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Database {
    /// Reads a libpq-style URL (`postgresql://...?...`) or key=value string.
    pub(crate) fn parse(url: &str) -> Result<Database> {
        let invalid = |why: String| database(format!("invalid database URL: {why}"));
        let mut params: Vec<(String, String)> = Vec::new();
        let mut mode: Option<String> = None;
        // What rust-postgres is given: the URL without the parameters read
        // here. `take` reads one parameter and says whether to keep it.
        let mut take = |k: &str, v: String| {
            if ours(k) {
                params.push((k.to_string(), v));
                return false;
            }
            if k == "sslmode" {
                let ours = matches!(v.as_str(), "verify-full" | "verify-ca");
                mode = Some(v);
                return !ours;
            }
            true
        };
        let rest = if url.contains("://") {
            let (base, query) = url.split_once('?').unwrap_or((url, ""));
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| !p.is_empty())
                .filter(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    take(k, percent_decoded(v))
                })
                .collect();
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        } else {
            let kept: Vec<&str> = url
                .split_whitespace()
                .filter(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    take(k, v.trim_matches('\'').to_string())
                })
                .collect();
            kept.join(" ")
        };
        let mut config = postgres::Config::from_str(&rest).map_err(|e| invalid(e.to_string()))?;
        let get = |key: &str| {
            params
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| PathBuf::from(v))
        };
        let (root, cert, key) = (get("sslrootcert"), get("sslcert"), get("sslkey"));
        if mode.as_deref() == Some("verify-ca") {
            return Err(invalid(
                "sslmode=verify-ca is not supported: durus-redb always checks the server's \
                 host name too (use sslmode=verify-full)"
                    .into(),
            ));
        }
        let wants_tls = matches!(mode.as_deref(), Some("require" | "verify-full"));
        if !wants_tls && root.is_none() {
            if cert.is_some() || key.is_some() {
                return Err(invalid(
                    "sslcert and sslkey need TLS: give sslrootcert=PATH (the CA of the \
                     server's certificate) and sslmode=verify-full"
                        .into(),
                ));
            }
            return Ok(Database { config, tls: None });
        }
        let Some(root) = root else {
            return Err(invalid(format!(
                "sslmode={} needs sslrootcert=PATH, the CA that signed the server's \
                 certificate: durus-redb always verifies it",
                mode.unwrap_or_default()
            )));
        };
        let client = match (&cert, &key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "sslcert and sslkey go together (the client's certificate and its key)".into(),
                ));
            }
        };
        let tls = crate::tls::TlsClient::from_pem_files(&root, client)
            .map_err(|e| invalid(format!("TLS: {e}")))?;
        if wants_tls {
            config.ssl_mode(SslMode::Require);
        }
        Ok(Database {
            config,
            tls: Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                tls.rustls_config(),
            )),
        })
    }

    /// A new connection.
    pub(super) fn connect(&self) -> std::result::Result<postgres::Client, postgres::Error> {
        match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(postgres::NoTls),
        }
    }

    /// Whether connections use TLS.
    pub(crate) fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::Database;

    #[test]
    fn tls_parameters_are_read_and_bad_ones_refused_with_a_reason() {
        // No TLS asked: as rust-postgres reads it.
        let d = Database::parse("postgresql://u@h:5/db?application_name=x").unwrap();
        assert!(!d.uses_tls());
        assert_eq!(d.config.get_dbname(), Some("db"));
        assert!(!Database::parse("host=h dbname=db").unwrap().uses_tls());
        // TLS asked without a root: refused, saying what to give.
        for url in [
            "postgresql://u@h/db?sslmode=require",
            "postgresql://u@h/db?sslmode=verify-full",
            "host=h sslmode=verify-full",
        ] {
            let e = Database::parse(url).err().unwrap().to_string();
            assert!(e.contains("sslrootcert"), "{url}: {e}");
        }
        let e = Database::parse("postgresql://u@h/db?sslmode=verify-ca&sslrootcert=/x")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("verify-full"), "{e}");
        let e = Database::parse("postgresql://u@h/db?sslcert=/c&sslkey=/k")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sslrootcert"), "{e}");
        // A root that is not there: named.
        let e =
            Database::parse("postgresql://u@h/db?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch.pem")
                .err()
                .unwrap()
                .to_string();
        assert!(e.contains("/no/such.pem"), "{e}");
    }
}
