//! TLS on the Durus protocol, through the real binary: mutual TLS admits
//! only clients with a certificate of the CA; the real Python Durus client
//! runs the interop scenarios through `TLSClientStorage`; each kind of bad
//! input is closed with one log line while a good client goes on
//! committing.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::OutputWithin;
use durus_redb::{Address, ClientStorage, Oid, Record, Storage, TlsClient};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_durus-redb"))
}

/// Certificates and keys in a directory: a CA, the server's (for
/// localhost and 127.0.0.1), a client's, a client's of another CA, and an
/// expired client's.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(p, key))
        };
        let leaf = |issuer: &Issuer<'static, KeyPair>,
                    names: Vec<String>,
                    cn: &str,
                    usage: ExtendedKeyUsagePurpose,
                    expired: bool| {
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            if expired {
                p.not_before = rcgen::date_time_ymd(2000, 1, 1);
                p.not_after = rcgen::date_time_ymd(2001, 1, 1);
            }
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (ca_pem, issuer) = ca("durus-redb test CA");
        write("ca.pem", ca_pem);
        let (cert, key) = leaf(
            &issuer,
            vec!["localhost".into(), "127.0.0.1".into()],
            "server",
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        );
        write("server.pem", cert);
        write("server.key", key);
        for (name, expired) in [("client", false), ("operator", false), ("expired", true)] {
            let (cert, key) = leaf(
                &issuer,
                vec![],
                name,
                ExtendedKeyUsagePurpose::ClientAuth,
                expired,
            );
            write(&format!("{name}.pem"), cert);
            write(&format!("{name}.key"), key);
        }
        let (other_ca, other) = ca("another CA");
        write("other-ca.pem", other_ca);
        let (cert, key) = leaf(
            &other,
            vec![],
            "rogue",
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        );
        write("rogue.pem", cert);
        write("rogue.key", key);
        Pki { dir }
    }

    fn client(&self, cert: Option<&str>) -> TlsClient {
        let (c, k) = match cert {
            Some(name) => (
                self.path(&format!("{name}.pem")),
                self.path(&format!("{name}.key")),
            ),
            None => (PathBuf::new(), PathBuf::new()),
        };
        let pair = cert.map(|_| (c.as_path(), k.as_path()));
        TlsClient::from_pem_files(&self.path("ca.pem"), pair).unwrap()
    }
}

/// `serve`'s TLS options with the test certificates: the server's, and
/// with `clients_verified` the CA its clients' certificates must have.
fn tls_args(pki: &Pki, clients_verified: bool) -> Vec<String> {
    let mut args = vec![
        "--tls-cert".to_string(),
        pki.s("server.pem"),
        "--tls-key".to_string(),
        pki.s("server.key"),
    ];
    if clients_verified {
        args.extend(["--tls-client-ca".to_string(), pki.s("ca.pem")]);
    }
    args
}

/// A running `serve`, its port, and every line it logged so far.
struct Served {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn start<A: AsRef<std::ffi::OsStr>>(args: &[A]) -> Served {
        let mut child = bin()
            .args(["serve", "--memory", "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = String::new();
        let port = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("serve ended: {said}"))
                .unwrap();
            said.push_str(&line);
            said.push('\n');
            if let Some(port) = common::ready_port(&line) {
                break port;
            }
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let into = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                into.lock().unwrap().push(line);
            }
        });
        Served { child, port, log }
    }

    /// Waits until a line containing `what` is logged (at most 20 s).
    fn wait_for_log(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(what)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {what:?}; the log: {:#?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count_log(&self, what: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn address(port: u16) -> Address {
    Address::tcp("127.0.0.1", port)
}

/// One commit of a new object under the root, and its load back.
fn commit_one(c: &mut ClientStorage, n: u64) -> Result<(), String> {
    let e = |e: durus_redb::StorageError| e.to_string();
    c.sync().map_err(e)?;
    let mut oid = c.new_oid().map_err(e)?;
    if oid == Oid::ROOT {
        // An empty store's first oid is the root's.
        oid = c.new_oid().map_err(e)?;
    }
    let data = format!("object {n}").into_bytes();
    c.begin();
    c.store(oid, Record::new(oid, &data, &[]).into_bytes())
        .map_err(e)?;
    c.store(
        Oid::ROOT,
        Record::new(Oid::ROOT, &n.to_be_bytes(), &[oid]).into_bytes(),
    )
    .map_err(e)?;
    c.end().map_err(e)?;
    let back = c.load(oid).map_err(e)?;
    if back.data() != data.as_slice() {
        return Err(format!("loaded {:?}", back.data()));
    }
    Ok(())
}

/// Whether a client connected with `tls` can do anything: with TLS 1.3 a
/// client's handshake ends before the server has checked its certificate,
/// so a refused client learns it at its first request.
fn admitted(port: u16, tls: &TlsClient) -> Result<(), String> {
    let mut c = ClientStorage::connect_tls(address(port), tls).map_err(|e| e.to_string())?;
    c.new_oid().map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn mutual_tls_admits_only_clients_of_the_ca_and_bad_input_disturbs_no_one() {
    let pki = Pki::new();
    let served = Served::start(
        &[
            tls_args(&pki, true),
            vec!["--request-timeout".to_string(), "2".to_string()],
        ]
        .concat(),
    );
    let port = served.port;

    // A good client commits all through.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let good = {
        let (stop, committed, tls) = (stop.clone(), committed.clone(), pki.client(Some("client")));
        std::thread::spawn(move || -> Result<(), String> {
            let mut c =
                ClientStorage::connect_tls(address(port), &tls).map_err(|e| e.to_string())?;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                commit_one(&mut c, n)?;
                committed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let progress = || {
        let before = committed.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while committed.load(Ordering::Relaxed) < before + 3 {
            assert!(
                Instant::now() < deadline,
                "the good client stopped committing"
            );
            assert!(!good.is_finished(), "the good client failed");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    progress();

    // No certificate, another CA's, an expired one: refused, logged.
    let handshakes = served.count_log("TLS handshake failed");
    for (who, tls) in [
        ("no certificate", pki.client(None)),
        ("another CA's certificate", pki.client(Some("rogue"))),
        ("an expired certificate", pki.client(Some("expired"))),
    ] {
        let got = admitted(port, &tls);
        assert!(got.is_err(), "a client with {who} was admitted");
        let deadline = Instant::now() + Duration::from_secs(10);
        while served.count_log("TLS handshake failed") <= handshakes {
            assert!(Instant::now() < deadline, "{who}: not logged");
            std::thread::sleep(Duration::from_millis(10));
        }
        progress();
    }
    let log = served.log.lock().unwrap().join("\n");
    assert!(
        log.contains("certificate expired"),
        "the expired certificate is named: {log}"
    );
    assert!(
        log.contains("UnknownIssuer"),
        "the unknown issuer is named: {log}"
    );

    // A plaintext Durus client on the TLS port: closed, one line.
    let before = served.count_log("TLS handshake failed");
    assert!(ClientStorage::connect(address(port)).is_err());
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.count_log("TLS handshake failed") == before {
        assert!(
            Instant::now() < deadline,
            "the plaintext client is not logged"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    progress();

    // A handshake that never finishes (a client that says nothing, and one
    // that stops half way): closed within --request-timeout (2 s).
    for partial in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(partial).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) => break e.kind() != std::io::ErrorKind::WouldBlock,
            }
        };
        assert!(closed, "a silent handshake was not closed");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "closed only after {:?}",
            started.elapsed()
        );
        progress();
    }
    served.wait_for_log("no TLS handshake within");

    stop.store(true, Ordering::Relaxed);
    good.join().unwrap().unwrap();

    // `stop` over TLS, from loopback, with the client certificate.
    let out = bin()
        .args(["stop", "--port", &port.to_string(), "--tls-ca"])
        .arg(pki.path("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.path("client.pem"))
        .arg("--tls-key")
        .arg(pki.path("client.key"))
        .output_within(common::LIMIT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut served = served;
    assert!(common::wait_within(&mut served.child, common::LIMIT).success());
}

#[test]
fn a_tls_client_on_a_plain_port_is_closed_with_one_log_line() {
    let pki = Pki::new();
    let served = Served::start::<&str>(&[]);
    assert!(admitted(served.port, &pki.client(Some("client"))).is_err());
    let line = served.wait_for_log("began a TLS handshake");
    assert!(line.contains("--tls-cert"), "{line}");
    let mut c = ClientStorage::connect(address(served.port)).unwrap();
    commit_one(&mut c, 1).unwrap();
}

#[test]
fn server_only_tls_serves_any_client_that_trusts_its_ca_and_refuses_bad_settings() {
    let pki = Pki::new();
    let served = Served::start(&tls_args(&pki, false));
    let mut c = ClientStorage::connect_tls(address(served.port), &pki.client(None)).unwrap();
    commit_one(&mut c, 1).unwrap();
    // A client that trusts another CA refuses the server.
    let distrust = TlsClient::from_pem_files(&pki.path("other-ca.pem"), None).unwrap();
    let e = ClientStorage::connect_tls(address(served.port), &distrust).unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");

    // Bad settings: clear errors, nothing served.
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "--tls-cert",
                "/nonexistent.pem",
                "--tls-key",
                "/nonexistent.key",
            ],
            "/nonexistent.pem",
        ),
        (
            &[
                "--tls-cert",
                &pki.s("server.pem"),
                "--tls-key",
                &pki.s("client.key"),
            ],
            "key",
        ),
        (&["--tls-cert", &pki.s("server.pem")], "--tls-key"),
        (
            &[
                "--tls-cert",
                &pki.s("server.key"),
                "--tls-key",
                &pki.s("server.key"),
            ],
            "no certificate",
        ),
    ];
    for (args, says) in cases {
        let out = bin()
            .args(["serve", "--memory", "--port", "0"])
            .args(args)
            .output_within(common::LIMIT);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: served");
        assert!(text.contains(says), "{args:?}: {text}");
    }
}

/// The Python Durus client's scenarios through `TLSClientStorage` with a
/// client certificate; a Python client without one, or with another CA's,
/// is refused.
#[test]
fn the_python_durus_client_runs_its_scenarios_through_tls_client_storage() {
    let pki = Pki::new();
    let served = Served::start(&tls_args(&pki, true));
    let port = served.port.to_string();
    let out = Command::new(common::python())
        .arg(common::script("interop.py"))
        .args(["--port", &port, "--tls-ca", &pki.s("ca.pem")])
        .args([
            "--tls-cert",
            &pki.s("client.pem"),
            "--tls-key",
            &pki.s("client.key"),
        ])
        .output_within(common::LIMIT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "interop.py through TLS: {text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let passed = stdout.matches("\"ok\": true").count();
    assert!(
        passed >= 7 && !stdout.contains("\"ok\": false"),
        "scenarios: {text}"
    );

    let python_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let attempt = |cert: Option<&str>| {
        let certs = match cert {
            Some(n) => format!(
                "certfile={:?}, keyfile={:?}",
                pki.s(&format!("{n}.pem")),
                pki.s(&format!("{n}.key"))
            ),
            None => String::new(),
        };
        let code = format!(
            "import sys; sys.path.insert(0, {dir:?})\n\
             from durus.connection import Connection\n\
             from durus_redb.client import TLSClientStorage\n\
             try:\n\
             \x20   c = Connection(TLSClientStorage(host='127.0.0.1', port={port}, cafile={ca:?}, {certs}))\n\
             \x20   c.get_root()['x'] = 1\n\
             \x20   c.commit()\n\
             \x20   print('ADMITTED')\n\
             except Exception as e:\n\
             \x20   print('REFUSED', type(e).__name__, e)\n",
            dir = python_dir.to_str().unwrap(),
            ca = pki.s("ca.pem"),
        );
        let out = Command::new(common::python())
            .args(["-c", &code])
            .output_within(common::LIMIT);
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(attempt(Some("client")).contains("ADMITTED"));
    for cert in [None, Some("rogue"), Some("expired")] {
        let said = attempt(cert);
        assert!(said.contains("REFUSED"), "{cert:?}: {said}");
    }
}

/// `--admin-cert-cn`: with `--admin-from none`, only a client whose
/// certificate has that name may stop the server or read its live state;
/// another certified client is refused, logged by its certificate's name.
#[test]
fn only_a_certificate_named_by_admin_cert_cn_may_stop_the_server() {
    let pki = Pki::new();
    let mut served = Served::start(
        &[
            tls_args(&pki, true),
            vec![
                "--admin-from".to_string(),
                "none".to_string(),
                "--admin-cert-cn".to_string(),
                "operator".to_string(),
            ],
        ]
        .concat(),
    );
    let stop_as = |who: &str| {
        bin()
            .args(["stop", "--wait", "2", "--port", &served.port.to_string()])
            .args(["--tls-ca", &pki.s("ca.pem")])
            .args(["--tls-cert", &pki.s(&format!("{who}.pem"))])
            .args(["--tls-key", &pki.s(&format!("{who}.key"))])
            .output_within(common::LIMIT)
    };
    // An ordinary client: refused, and the server goes on.
    let out = stop_as("client");
    assert!(!out.status.success());
    let line = served.wait_for_log("refusing an administrative request");
    assert!(line.contains("certificate CN client"), "{line}");
    let mut c =
        ClientStorage::connect_tls(address(served.port), &pki.client(Some("client"))).unwrap();
    commit_one(&mut c, 1).unwrap();
    let mut c2 =
        ClientStorage::connect_tls(address(served.port), &pki.client(Some("client"))).unwrap();
    assert!(
        c2.server_state().is_err(),
        "X answered to an ordinary client"
    );
    // The operator reads the live state and stops it.
    let mut op =
        ClientStorage::connect_tls(address(served.port), &pki.client(Some("operator"))).unwrap();
    let state = op.server_state().unwrap();
    assert!(state.contains("objects"), "{state}");
    drop(op);
    let out = stop_as("operator");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(common::wait_within(&mut served.child, common::LIMIT).success());
}

/// With TLS, the metrics page is HTTPS under the same client rule: a
/// client with a certificate of the CA reads it, one without is refused,
/// and plain HTTP gets no page.
#[test]
fn the_metrics_page_is_https_with_the_same_client_rule() {
    let pki = Pki::new();
    let served = Served::start(
        &[
            tls_args(&pki, true),
            vec!["--metrics-address".to_string(), "127.0.0.1:0".to_string()],
        ]
        .concat(),
    );
    let line = served.wait_for_log("metrics on https://");
    let at = line
        .split("metrics on https://")
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches("/metrics")
        .to_string();
    let fetch = |cert: Option<&str>| {
        let certs = match cert {
            Some(n) => format!(
                "ctx.load_cert_chain({:?}, {:?})",
                pki.s(&format!("{n}.pem")),
                pki.s(&format!("{n}.key"))
            ),
            None => "pass".into(),
        };
        let code = format!(
            "import ssl, urllib.request\n\
             ctx = ssl.create_default_context(cafile={ca:?})\n\
             {certs}\n\
             try:\n\
             \x20   print(urllib.request.urlopen('https://{at}/metrics', context=ctx, timeout=10).read().decode())\n\
             except Exception as e:\n\
             \x20   print('REFUSED', type(e).__name__, e)\n",
            ca = pki.s("ca.pem"),
        );
        let out = Command::new(common::python())
            .args(["-c", &code])
            .output_within(common::LIMIT);
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let page = fetch(Some("client"));
    assert!(page.contains("durus_redb_objects"), "{page}");
    let refused = fetch(None);
    assert!(refused.contains("REFUSED"), "{refused}");
    // Plain HTTP: no page.
    let mut s = TcpStream::connect(at.as_str()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("durus_redb_objects"),
        "plain HTTP got the page"
    );
}
