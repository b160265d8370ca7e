//! `serve --metrics-address`: the live state (`X`) as Prometheus text, over
//! a minimal HTTP/1.0 responder. One read-only page, a few scrapes a
//! minute: a thread and std's TcpListener do it; an HTTP crate would bring
//! an async runtime or a server framework for one GET.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Shared;

/// What each figure of the live state means, for `# HELP`.
const HELP: &[(&str, &str)] = &[
    (
        "healthy",
        "1 while the store takes commits; 0 once a failure poisoned it (see the log)",
    ),
    ("objects", "Objects stored"),
    ("file_bytes", "Size of the store file in bytes"),
    ("connections", "Client connections open"),
    (
        "commits_total",
        "Commits acknowledged since the server started",
    ),
    ("loads_total", "Records loaded since the server started"),
    ("uptime_seconds", "Seconds since the server started"),
    (
        "snapshots_held",
        "Read snapshots held, by snapshot-read connections and backups",
    ),
    (
        "snapshot_oldest_seconds",
        "Age of the oldest read snapshot held; pages freed since it was taken wait for it",
    ),
    (
        "connection_panics",
        "Connections closed by a panic in their handler",
    ),
    (
        "commits_waiting_for_order",
        "Commits queued for the commit order right now",
    ),
    ("commits_not_durable", "Commits applied but not yet durable"),
    (
        "seconds_since_checkpoint",
        "Seconds since the last checkpoint",
    ),
    ("gc_queue", "Objects queued for the collector"),
    (
        "gc_waiting",
        "Queued objects still inside their grace window",
    ),
    (
        "gc_oldest_seconds",
        "Age of the oldest queued object in seconds",
    ),
    ("gc_full_running", "1 while a full collection runs"),
    (
        "gc_removed_incremental",
        "Objects the incremental collector removed",
    ),
    ("gc_removed_full", "Objects full collections removed"),
    ("gc_full_collections", "Full collections finished"),
];

/// The live state in Prometheus's text format: `durus_redb_<name> <value>`,
/// each with its `# HELP` and `# TYPE` (counters `*_total`, the rest gauges).
pub(crate) fn exposition(state: &str) -> String {
    let mut out = String::new();
    for line in state.lines() {
        let Some((name, value)) = line.split_once(' ') else {
            continue;
        };
        if value.parse::<f64>().is_err() {
            continue;
        }
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        if let Some((_, help)) = HELP.iter().find(|(n, _)| *n == name) {
            out.push_str(&format!("# HELP durus_redb_{name} {help}\n"));
        }
        out.push_str(&format!(
            "# TYPE durus_redb_{name} {kind}\ndurus_redb_{name} {value}\n"
        ));
    }
    out
}

/// Serves the metrics page on `listener` until the server stops.
pub(super) fn serve(shared: Arc<Shared>, listener: TcpListener) {
    if listener.set_nonblocking(true).is_err() {
        tracing::error!("the metrics listener cannot be polled; metrics are off");
        return;
    }
    while !shared.stopping.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => answer(&shared, stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// How long one scrape may take to send its request, in all: the page is
/// served one connection at a time, so a client that trickles its request
/// holds up the others for at most this long.
const REQUEST_TIME: Duration = Duration::from_secs(2);

/// The largest request head read.
const MAX_HEAD: usize = 8192;

fn answer(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(REQUEST_TIME));
    // With the server's TLS (--tls-cert), the page is HTTPS with the same
    // certificate and the same client rule; its handshake counts against
    // the request's time.
    #[cfg(feature = "tls")]
    let mut stream = match &shared.config.tls {
        Some(tls) => match tls.accept(stream, REQUEST_TIME) {
            Ok(s) => crate::transport::Stream::Tls(s),
            Err(e) => {
                tracing::warn!("metrics: a TLS handshake failed: {e}");
                return;
            }
        },
        None => crate::transport::Stream::Tcp(stream),
    };
    #[cfg(not(feature = "tls"))]
    let mut stream = crate::transport::Stream::Tcp(stream);
    let deadline = std::time::Instant::now() + REQUEST_TIME;
    // The request head, at most MAX_HEAD bytes, within REQUEST_TIME.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let read = if left.is_zero() {
            Err(std::io::ErrorKind::TimedOut.into())
        } else {
            stream
                .set_read_timeout(Some(left))
                .and_then(|()| stream.read(&mut buf))
        };
        match read {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                tracing::warn!(
                    "metrics: a request not complete within {REQUEST_TIME:?} was dropped"
                );
                return;
            }
            Err(_) => return,
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body, kind) = if method != "GET" {
        ("405 Method Not Allowed", String::new(), "text/plain")
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", "see /metrics\n".to_string(), "text/plain")
    } else {
        match shared.live_state() {
            Ok(state) => (
                "200 OK",
                exposition(&state),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            Err(e) => ("500 Internal Server Error", format!("{e}\n"), "text/plain"),
        }
    };
    let _ = write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
    stream.shutdown();
}

#[cfg(test)]
mod tests {
    use super::exposition;

    #[test]
    fn the_live_state_becomes_prometheus_text() {
        let text = exposition("objects 6\ncommits_total 3\ngc_oldest_seconds -\n");
        assert_eq!(
            text,
            "# HELP durus_redb_objects Objects stored\n\
             # TYPE durus_redb_objects gauge\ndurus_redb_objects 6\n\
             # HELP durus_redb_commits_total Commits acknowledged since the server started\n\
             # TYPE durus_redb_commits_total counter\ndurus_redb_commits_total 3\n"
        );
    }
}
