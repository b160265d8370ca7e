//! `check`, `stats`, `gc` and `export` given a PostgreSQL database URL
//! (`serve --database`) instead of a store file.

use std::process::ExitCode;

use crate::common::*;

/// True if a command's path argument is a PostgreSQL URL.
pub(crate) fn is_database_url(path: &std::path::Path) -> bool {
    path.to_str()
        .is_some_and(|p| p.starts_with("postgresql://") || p.starts_with("postgres://"))
}

fn url_of(path: &std::path::Path) -> &str {
    path.to_str().expect("a database URL is UTF-8")
}

pub(crate) fn check_database(path: &std::path::Path) -> ExitCode {
    let url = url_of(path);
    let progress = bar(0, "checking   {spinner} {pos} records");
    let checked = durus_redb::check_database(url, &mut |n| progress.set_position(n));
    progress.finish();
    let c = match checked {
        Ok(c) => c,
        Err(e) => {
            return fail(format_args!(
                "{}: {e}",
                durus_redb::redact_database_url(url)
            ));
        }
    };
    println!("database:   {}", durus_redb::redact_database_url(url));
    println!("objects:    {}", c.records);
    println!("references: {}", c.references);
    for p in &c.problems {
        println!("problem:    {p}");
    }
    if c.problems.is_empty() {
        println!("result:     clean");
        ExitCode::SUCCESS
    } else {
        println!("result:     {} problems", c.problems.len());
        ExitCode::FAILURE
    }
}

pub(crate) fn stats_database(path: &std::path::Path) -> ExitCode {
    let url = url_of(path);
    match durus_redb::database_stats(url) {
        Ok(s) => {
            println!(
                "database:          {}",
                durus_redb::redact_database_url(url)
            );
            println!("format version:    {}", s.format);
            println!("objects:           {}", s.objects);
            println!("last commit:       {}", s.last_tid);
            println!("next oid:          {}", s.next_oid);
            println!("commit log rows:   {}", s.log_entries);
            println!(
                "front ends alive:  {} (heard of in the last 10 minutes)",
                s.front_ends_alive
            );
            match s.last_collection {
                Some((tid, ago)) => {
                    println!("last collection:   of the state at commit {tid}, ended {ago} s ago")
                }
                None => println!("last collection:   none recorded"),
            }
            if let Some((front_end, background)) = s.collecting {
                println!(
                    "collecting now:    front end {front_end} ({})",
                    if background {
                        "background, with its grace window"
                    } else {
                        "a pack"
                    }
                );
            }
            if let Some(front_end) = s.alone {
                println!(
                    "alone:             front end {front_end} (the only one committing: it \
                     serves loads from memory)"
                );
            }
            if s.import_unfinished {
                println!("import:            unfinished (run the same migrate again)");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(format_args!(
            "{}: {e}",
            durus_redb::redact_database_url(url)
        )),
    }
}

pub(crate) fn gc_database(path: &std::path::Path, full: bool) -> ExitCode {
    let url = url_of(path);
    if !full {
        return fail(
            "on a database, the background collector is `serve --database URL` (--gc, \
             --gc-grace: full collections with a grace window); `durus-redb gc --full URL` \
             packs it now (everything the root does not reach goes at once, as Durus's pack)",
        );
    }
    let started = std::time::Instant::now();
    let progress = bar(
        0,
        "collecting   {spinner} {pos} objects removed, {elapsed} (marks from the root, then removes in batches)",
    );
    let result = durus_redb::gc_database_with(url, &mut |removed| {
        progress.set_position(removed);
        progress.tick();
    });
    progress.finish_and_clear();
    match result {
        Ok(r) => {
            println!("live objects: {}", r.live_objects);
            println!(
                "reclaimed {} objects ({} bytes) in {:.2} s; {} objects remain",
                r.removed_objects,
                r.removed_bytes,
                started.elapsed().as_secs_f64(),
                r.live_objects
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format_args!(
            "{}: full collection failed: {e}",
            durus_redb::redact_database_url(url)
        )),
    }
}
