//! `durus-redb check`: a store's integrity, and `--repair`.

use std::path::PathBuf;
use std::process::ExitCode;

use durus_redb::{check_store, repair_store};

use crate::common::*;

pub(crate) fn check(path: PathBuf, repair: bool) -> ExitCode {
    let checked = if repair {
        repair_store(&path)
    } else {
        check_store(&path)
    };
    let c = match checked {
        Ok(c) => c,
        Err(e) if e.is_damage() => {
            return fail(format_args!(
                "{}: {e}\nThe store is damaged and cannot be checked{}. Restore it from a \
                 backup (`durus-redb backup` copies a running server's store).",
                path.display(),
                if repair {
                    " or repaired"
                } else {
                    "; the file was left as it was"
                }
            ));
        }
        Err(e) => return fail(store_error(&path, &e)),
    };
    let r = &c.references;
    println!(
        "store:      {} (format version {})",
        path.display(),
        c.stats.format_version
    );
    println!(
        "integrity:  {}",
        if c.integrity_ok {
            "ok"
        } else {
            "FAILED (redb checksums or allocator state)"
        }
    );
    if c.unapplied_log_commits > 0 {
        println!(
            "commit log: {} commits not yet in the file (checked here without them; \
             `durus-redb check --repair` or any writable open applies them)",
            c.unapplied_log_commits
        );
    }
    if let Some(damage) = &c.log_damage {
        println!("commit log: {damage}");
    }
    println!("objects:    {}", r.objects);
    println!("references: {}", r.refs);
    for (holder, missing) in &r.dangling {
        println!("dangling:   oid {holder} references missing oid {missing}");
    }
    for (oid, stored, actual) in &r.count_mismatches {
        println!("refcount:   oid {oid} has count {stored}, recount says {actual}");
    }
    for (oid, why) in &r.damaged {
        println!("damaged:    oid {oid}: {why}");
    }
    let log_ok = repair || c.log_damage.is_none();
    if c.integrity_ok && r.is_clean() && log_ok {
        if c.log_damage.is_some() {
            println!("result:     clean, after giving up the commits named above");
        } else {
            println!("result:     clean");
        }
        ExitCode::SUCCESS
    } else {
        if !log_ok {
            println!(
                "advice:     the commit log holds acknowledged commits that cannot all be \
                 replayed. Keep a copy of the log directory; `durus-redb check --repair` gives \
                 up the commits after the damage and keeps the log aside"
            );
        }
        if !c.integrity_ok {
            println!(
                "advice:     redb's page checksums do not match: the file is damaged. \
                 Restore it from a backup (`durus-redb backup`); {}",
                if repair {
                    "the repair kept what redb could"
                } else {
                    "`durus-redb check --repair` keeps what redb can"
                }
            );
        }
        println!(
            "result:     {}{} dangling references, {} wrong counts, {} damaged records",
            if log_ok { "" } else { "commit log damaged, " },
            r.dangling_count,
            r.mismatch_count,
            r.damaged_count
        );
        ExitCode::FAILURE
    }
}
