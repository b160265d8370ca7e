//! `durus-redb stats`: a store's figures, or a running server's live state.

use std::path::PathBuf;
use std::process::ExitCode;

use durus_redb::{ClientStorage, RedbStorage};

use crate::common::*;

/// Asks a running server for its live state twice, a second apart, and
/// prints it with the rates over that second.
pub(crate) fn live_stats(at: ConnectArgs) -> ExitCode {
    let address = at.address();
    let parse = |text: &str| -> std::collections::BTreeMap<String, String> {
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let sample = |c: &mut ClientStorage| {
        c.server_state()
            .map(|t| (std::time::Instant::now(), parse(&t)))
    };
    let mut client = match at.connect() {
        Ok(c) => c,
        Err(e) => return fail(format_args!("no server answers on {address}: {e}")),
    };
    let first = sample(&mut client);
    eprintln!("sampling {address} for a second, for the rates...");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (first, second) = match (first, sample(&mut client)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return fail(format_args!(
                "{address} did not give its live state (is it a durus-redb server?): {e}"
            ));
        }
    };
    let get = |m: &std::collections::BTreeMap<String, String>, k: &str| -> f64 {
        m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    let secs = second.0.duration_since(first.0).as_secs_f64();
    let rate = |k: &str| (get(&second.1, k) - get(&first.1, k)) / secs;
    println!("server:           {address}");
    for (k, v) in &second.1 {
        println!("{:<26} {v}", format!("{k}:"));
    }
    println!("{:<26} {:.1}", "commits_per_second:", rate("commits_total"));
    println!("{:<26} {:.1}", "loads_per_second:", rate("loads_total"));
    ExitCode::SUCCESS
}

pub(crate) fn stats(path: PathBuf, gc_grace: f64) -> ExitCode {
    if !(gc_grace >= 0.0 && gc_grace.is_finite()) {
        return fail("--gc-grace must be a number of seconds, 0 or more");
    }
    let grace = std::time::Duration::from_secs_f64(gc_grace);
    let (s, waiting) = match RedbStorage::open_read_only(&path)
        .and_then(|s| Ok((s.stats()?, s.gc_waiting(grace)?)))
    {
        Ok(s) => s,
        Err(e) => return fail(store_error(&path, &e)),
    };
    println!("store:            {}", path.display());
    println!("format version:   {}", s.format_version);
    println!("objects:          {}", s.objects);
    println!("bytes on disk:    {}", s.file_bytes);
    println!("bytes stored:     {}", s.stored_bytes);
    println!("fragmented bytes: {}", s.fragmented_bytes);
    println!("referenced oids:  {}", s.referenced_objects);
    match s.gc_oldest {
        Some(age) => println!(
            "gc queue:         {} unreachable, {waiting} of them waiting out a {gc_grace} s grace window; the oldest for {:.0} s",
            s.gc_queue,
            age.as_secs_f64()
        ),
        None => println!("gc queue:         {}", s.gc_queue),
    }
    println!("next oid:         {}", s.oid_mark);
    ExitCode::SUCCESS
}
