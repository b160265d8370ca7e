//! The background collector thread and the engine's side of it.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, select};

use super::policy::GcAction;
use super::shared::{CollectorGuard, GcShared};
use super::{full, incremental};
use crate::engine::Engine;
use crate::error::{Result, StorageError};

/// Starts the collector thread if the store is writable and the policy wants one.
pub(crate) fn start(engine: &Arc<Engine>, gc: &Arc<GcShared>) {
    if engine.is_read_only() || !gc.policy.background() {
        return;
    }
    let (nudge_tx, nudge_rx) = crossbeam_channel::bounded(1);
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    let weak = Arc::downgrade(engine);
    let shared = gc.clone();
    let spawned = std::thread::Builder::new()
        .name("durus-redb-gc".into())
        .spawn(move || thread_main(weak, &shared, nudge_rx, stop_rx));
    match spawned {
        Ok(handle) => {
            *gc.nudge.lock() = Some(nudge_tx);
            *gc.thread.lock() = Some(CollectorGuard {
                stop: stop_tx,
                handle: Some(handle),
            });
        }
        Err(e) => engine.poison(&StorageError::Io(e)),
    }
}

/// The largest batch an incremental step grows to under a backlog.
const MAX_BATCH: usize = 4096;

/// What a round asks the loop to do next.
enum Next {
    Wait(Duration),
    Stop(Option<Sender<()>>),
}

fn thread_main(
    weak: std::sync::Weak<Engine>,
    gc: &GcShared,
    nudge: Receiver<()>,
    stop: Receiver<Sender<()>>,
) {
    let mut wait = Duration::ZERO;
    loop {
        select! {
            recv(stop) -> ack => {
                if let Ok(ack) = ack {
                    let _ = ack.send(());
                }
                return;
            }
            recv(nudge) -> msg => {
                if msg.is_err() {
                    return;
                }
            }
            default(wait) => {}
        }
        let Some(engine) = weak.upgrade() else { return };
        if gc.stopping.load(Ordering::Acquire) {
            // Wait for the Stop message to acknowledge it.
            wait = Duration::from_millis(50);
            continue;
        }
        // A panic in a round (a bug, or a policy that panics) is a failure
        // like an error: logged, and the store refuses writes from then on,
        // instead of going on without a collector and without a word.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| round(&engine, gc, &stop)))
                .unwrap_or_else(|payload| {
                    let what = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(StorageError::Poisoned {
                        reason: format!("the garbage collector panicked: {what}"),
                    })
                });
        match result {
            Ok(Next::Wait(d)) => wait = d,
            // An import started meanwhile, or the store cannot be collected
            // as it is (records but no root): not a failure of the store.
            Err(e @ StorageError::Invalid(_)) => {
                tracing::warn!(error = %e, "garbage collection skipped");
                wait = Duration::from_secs(1);
            }
            Ok(Next::Stop(ack)) => {
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
                return;
            }
            Err(StorageError::Closed) => return,
            Err(e) => {
                tracing::error!(error = %e, "garbage collector failed");
                engine.poison(&e);
                return;
            }
        }
    }
}

/// Sleeps `d` unless Stop arrives (then returns its acknowledgment channel).
fn pause(stop: &Receiver<Sender<()>>, d: Duration) -> Option<Option<Sender<()>>> {
    if d.is_zero() {
        return match stop.try_recv() {
            Ok(ack) => Some(Some(ack)),
            Err(crossbeam_channel::TryRecvError::Empty) => None,
            Err(_) => Some(None),
        };
    }
    match stop.recv_timeout(d) {
        Ok(ack) => Some(Some(ack)),
        Err(RecvTimeoutError::Timeout) => None,
        Err(RecvTimeoutError::Disconnected) => Some(None),
    }
}

/// One decision of the policy, carried out.
fn round(engine: &Arc<Engine>, gc: &GcShared, stop: &Receiver<Sender<()>>) -> Result<Next> {
    let (facts, migration) = gc.facts(engine, false)?;
    if migration {
        return Ok(Next::Wait(Duration::from_secs(1)));
    }
    if gc.checkpoint_owed.swap(false, Ordering::AcqRel) {
        engine.checkpoint()?;
    }
    let action = gc.policy.decide(&facts);
    if !matches!(action, GcAction::Wait(_)) {
        gc.background_rounds.fetch_add(1, Ordering::Relaxed);
    }
    match action {
        GcAction::Wait(d) => Ok(Next::Wait(d)),
        GcAction::Incremental(pace) => {
            let batch = gc.batch.load(Ordering::Relaxed).max(pace.batch.max(1));
            let step = incremental::step(engine, batch, gc.cutoff_ms(), true)?;
            let next = if step.looked >= batch {
                (batch * 2).min(MAX_BATCH.max(pace.batch))
            } else {
                pace.batch
            };
            gc.batch.store(next, Ordering::Relaxed);
            if step.queue_left == 0 && !step.removed.is_empty() {
                // A burst is over: make its deletions durable so redb can
                // reuse the pages. After a step left to a waiting committer,
                // at the next round: now the checkpoint would commit the
                // step first and make that committer wait for the fsync.
                if step.parked {
                    gc.checkpoint_owed.store(true, Ordering::Release);
                } else {
                    engine.checkpoint()?;
                }
            }
            if let Some(ack) = pause(stop, pace.pause) {
                return Ok(Next::Stop(ack));
            }
            Ok(Next::Wait(Duration::ZERO))
        }
        GcAction::Full(pace) => {
            let Some(_running) = gc.full_lock.try_lock() else {
                // A caller runs one (pack): leave it alone.
                return Ok(Next::Wait(Duration::from_millis(100)));
            };
            let mut stopped: Option<Option<Sender<()>>> = None;
            let mut failure: Option<StorageError> = None;
            let mut between = |_: &full::FullProgress| -> ControlFlow<()> {
                loop {
                    if gc.stopping.load(Ordering::Acquire)
                        || gc.explicit_waiting.load(Ordering::Acquire)
                        || Arc::strong_count(engine) <= 1
                    {
                        return ControlFlow::Break(());
                    }
                    let facts = match gc.facts(engine, true) {
                        Ok((f, false)) => f,
                        Ok((_, true)) => return ControlFlow::Break(()),
                        Err(e) => {
                            failure = Some(e);
                            return ControlFlow::Break(());
                        }
                    };
                    let d = match gc.policy.decide(&facts) {
                        GcAction::Wait(d) => d,
                        action @ (GcAction::Incremental(p) | GcAction::Full(p)) => {
                            // Due garbage is reclaimed between the chunks of
                            // a full collection too.
                            if matches!(action, GcAction::Incremental(_))
                                && let Err(e) =
                                    incremental::step(engine, p.batch, gc.cutoff_ms(), true)
                            {
                                failure = Some(e);
                                return ControlFlow::Break(());
                            }
                            if let Some(ack) = pause(stop, p.pause) {
                                stopped = Some(ack);
                                return ControlFlow::Break(());
                            }
                            return ControlFlow::Continue(());
                        }
                    };
                    if let Some(ack) = pause(stop, d) {
                        stopped = Some(ack);
                        return ControlFlow::Break(());
                    }
                }
            };
            let report = full::run(engine, gc, pace.batch, gc.policy.grace(), &mut between)?;
            if let Some(e) = failure {
                return Err(e);
            }
            if report.completed {
                engine.checkpoint()?;
            }
            if let Some(ack) = stopped {
                return Ok(Next::Stop(ack));
            }
            Ok(Next::Wait(Duration::ZERO))
        }
    }
}
