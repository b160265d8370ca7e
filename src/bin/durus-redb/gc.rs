//! `durus-redb gc`: collects garbage now.

use std::process::ExitCode;

use durus_redb::{ManualGc, Options, RedbStorage};

use crate::common::*;

pub(crate) fn gc_cmd(path: &std::path::Path, full: bool) -> ExitCode {
    let options = Options::new().create(false).gc(ManualGc);
    let store = match RedbStorage::open(path, options) {
        Ok(s) => s,
        Err(e) => return fail(store_error(path, &e)),
    };
    let before = store.stats().map(|s| s.objects).unwrap_or(0);
    let started = std::time::Instant::now();
    let (removed, bytes) = if full {
        let progress = bar(before, "{msg:12} [{bar:40}] {pos}/{len} {per_sec}");
        let result = store.full_collection(&mut |p| {
            match p.phase {
                durus_redb::FullPhase::Mark => {
                    progress.set_message("marking");
                    progress.set_position(p.marked.min(before));
                }
                durus_redb::FullPhase::Sweep { pass } => {
                    progress.set_message(format!("sweep {pass}"));
                    progress.set_position(p.scanned.min(before));
                }
                _ => {}
            }
            std::ops::ControlFlow::Continue(())
        });
        progress.finish();
        match result {
            Ok(r) => {
                println!("live objects: {}", r.live_objects);
                (r.removed_objects, r.removed_bytes)
            }
            Err(e) => return fail(format_args!("full collection failed: {e}")),
        }
    } else {
        let progress = bar(
            0,
            "collecting   {spinner} {pos} objects removed, queue {msg}",
        );
        let result = store.collect_garbage_with(&mut |r| {
            progress.set_position(r.removed_objects);
            progress.set_message(r.queue_left.to_string());
        });
        progress.finish();
        match result {
            Ok(r) => (r.removed_objects, r.removed_bytes),
            Err(e) => return fail(format_args!("collection failed: {e}")),
        }
    };
    let after = store.stats().map(|s| s.objects).unwrap_or(0);
    println!(
        "reclaimed {removed} objects ({bytes} bytes) in {:.2} s; {after} objects remain{}",
        started.elapsed().as_secs_f64(),
        if full {
            ""
        } else {
            " (cycles and never-referenced objects need --full)"
        }
    );
    ExitCode::SUCCESS
}
