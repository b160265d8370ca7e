//! Garbage-collection policies: they decide, the collector thread acts.

use std::fmt;
use std::time::Duration;

/// What the collector knows when it asks its policy what to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcFacts {
    /// Oids waiting in the incremental collector's queue (in their grace
    /// window or past it).
    pub queue_len: u64,
    /// How long ago the oldest queued oid became unreachable; `None` when the
    /// queue is empty (or, for a store upgraded from format 2, unknown).
    pub oldest_queued: Option<Duration>,
    /// Record bytes committed since the last full collection (or since open).
    pub bytes_since_full: u64,
    /// Commits since the last full collection (or since open).
    pub commits_since_full: u64,
    /// Objects the incremental collector deleted since the last full collection (or since open).
    pub deleted_since_full: u64,
    /// Time since the last commit; `None` if nothing was committed since open.
    pub since_last_commit: Option<Duration>,
    /// Time since the last full collection finished (persisted across opens);
    /// `None` if the store never had one.
    pub since_full: Option<Duration>,
    /// A full collection was started and did not finish (it was interrupted,
    /// possibly by a crash before this open).
    pub full_interrupted: bool,
    /// The collector is in the middle of a full collection and asks how to go on.
    pub full_running: bool,
}

impl GcFacts {
    /// Whether the oldest queued oid has waited out `grace`.
    pub fn queue_due(&self, grace: Duration) -> bool {
        self.queue_len > 0 && self.oldest_queued.is_none_or(|age| age >= grace)
    }

    /// How long until the oldest queued oid has waited out `grace`.
    pub fn until_due(&self, grace: Duration) -> Option<Duration> {
        if self.queue_len == 0 {
            return None;
        }
        Some(
            self.oldest_queued
                .map_or(Duration::ZERO, |age| grace.saturating_sub(age)),
        )
    }
}

/// How much work per step and how long to rest after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pace {
    /// Objects handled per write transaction (each one holds the commit lock).
    pub batch: usize,
    /// Pause after each write transaction, leaving the writer to commits.
    pub pause: Duration,
}

impl Pace {
    /// `batch` objects per write transaction, then rest for `pause`.
    pub fn new(batch: usize, pause: Duration) -> Pace {
        Pace { batch, pause }
    }
}

/// What the collector should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GcAction {
    /// Nothing now; ask again after this long or at the next commit.
    /// During a full collection: pause it for this long, then ask again.
    Wait(Duration),
    /// One incremental step (during a full collection: one more sweep step).
    Incremental(Pace),
    /// Start (or go on with) a full collection, which also reclaims cycles.
    Full(Pace),
}

/// Decides when and how fast the background collector works.
///
/// A policy only returns decisions from the [`GcFacts`] it is given; the
/// collector thread carries them out. Implementations must be cheap: the
/// collector asks after every commit's nudge and between steps.
pub trait GcPolicy: Send + Sync + fmt::Debug + 'static {
    /// Whether the store runs a collector thread at all. Without one, garbage
    /// is reclaimed only by `collect_garbage_now`, `pack` or `durus-redb gc`.
    fn background(&self) -> bool {
        true
    }

    /// What to do now.
    fn decide(&self, facts: &GcFacts) -> GcAction;

    /// How long an object whose last reference a commit removed stays in the
    /// store before the background collector may reclaim it (and a full
    /// collection may sweep it). Within it the object stays loadable, and a
    /// commit that references it again keeps it, with what it references, as
    /// Durus keeps every object until a pack. Explicit collections (`pack`,
    /// `collect_garbage_now`, `durus-redb gc`) ignore it. Default: zero.
    fn grace(&self) -> Duration {
        Duration::ZERO
    }

    /// Objects each commit deletes from the collector's queue inside its own
    /// write transaction (0: none). A small share per commit reclaims garbage
    /// while commits flow without ever making a commit wait for a separate
    /// collector transaction.
    fn in_commit(&self) -> usize {
        0
    }

    /// Objects per write transaction when a caller runs the collector
    /// explicitly (`collect_garbage_now`, `pack`).
    fn explicit_batch(&self) -> usize {
        512
    }
}

/// When a full (cycle) collection starts by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FullTriggers {
    /// After this many record bytes committed since the last full collection.
    pub after_bytes: Option<u64>,
    /// After the incremental collector deleted this many objects since the last one.
    pub after_deletions: Option<u64>,
    /// When this long has passed since the last one and something was committed since.
    pub interval: Option<Duration>,
}

impl Default for FullTriggers {
    fn default() -> Self {
        FullTriggers {
            after_bytes: Some(1 << 30),
            after_deletions: Some(1_000_000),
            interval: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

impl FullTriggers {
    /// Never start a full collection by itself (an interrupted one still resumes).
    pub fn never() -> Self {
        FullTriggers {
            after_bytes: None,
            after_deletions: None,
            interval: None,
        }
    }

    /// Whether a full collection is due.
    pub fn due(&self, f: &GcFacts) -> bool {
        if f.full_interrupted {
            return true;
        }
        let over = |limit: Option<u64>, value: u64| limit.is_some_and(|l| value >= l);
        if over(self.after_bytes, f.bytes_since_full)
            || over(self.after_deletions, f.deleted_since_full)
        {
            return true;
        }
        match (self.interval, f.since_full) {
            (Some(i), Some(since)) => since >= i && f.commits_since_full > 0,
            // A store that never had a full collection starts counting at open.
            _ => false,
        }
    }
}

/// The default: reclaim garbage once its grace window has passed and start
/// a full collection when [`FullTriggers`] say so. Each commit deletes up to
/// `in_commit` due objects in its own transaction, and the thread works in
/// paced steps whenever objects are due, also while commits flow (each step
/// gives way to a waiting committer), so reclaiming keeps up with a steady
/// load. A full collection waits for a pause in commits (`quiet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncrementalGc {
    /// Work per step and rest after it.
    pub pace: Pace,
    /// How often to look when nothing happens.
    pub poll: Duration,
    /// When to start a full collection.
    pub full: FullTriggers,
    /// Queued objects each commit deletes in its own transaction (0: the
    /// thread does all the work, also while commits flow).
    pub in_commit: usize,
    /// How long without a commit before a full collection runs, when
    /// commits take a share.
    pub quiet: Duration,
    /// How long an unreachable object stays (see [`GcPolicy::grace`]).
    /// Default: 10 minutes.
    pub grace: Duration,
}

impl Default for IncrementalGc {
    fn default() -> Self {
        IncrementalGc {
            // Small steps (each holds the single writer for well under a
            // millisecond) with room for commits between them.
            pace: Pace {
                batch: 32,
                pause: Duration::from_millis(2),
            },
            poll: Duration::from_secs(1),
            full: FullTriggers::default(),
            in_commit: 1,
            quiet: Duration::from_millis(50),
            grace: Duration::from_secs(600),
        }
    }
}

impl GcPolicy for IncrementalGc {
    fn in_commit(&self) -> usize {
        self.in_commit
    }

    fn grace(&self) -> Duration {
        self.grace
    }

    fn decide(&self, f: &GcFacts) -> GcAction {
        let flowing = f.since_last_commit.filter(|s| *s < self.quiet);
        let due = f.queue_due(self.grace);
        if f.full_running {
            // Asked between chunks of a running full collection: due
            // garbage is reclaimed meanwhile (a full collection can wait out
            // a whole grace window).
            return if due {
                GcAction::Incremental(self.pace)
            } else {
                GcAction::Full(self.pace)
            };
        }
        if self.full.due(f) {
            // Commits flowing and taking their share: a full collection
            // waits for a pause, incremental work does not.
            if self.in_commit > 0
                && let Some(since) = flowing
            {
                return if due {
                    GcAction::Incremental(self.pace)
                } else {
                    GcAction::Wait(self.quiet - since)
                };
            }
            return GcAction::Full(self.pace);
        }
        if due {
            return GcAction::Incremental(self.pace);
        }
        match f.until_due(self.grace) {
            Some(d) => GcAction::Wait(d.min(self.poll)),
            None => GcAction::Wait(self.poll),
        }
    }
}

/// Works only while the store is idle: when no commit happened for `idle`.
/// A full collection underway pauses as soon as commits come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdleGc {
    /// How long without a commit counts as idle.
    pub idle: Duration,
    /// Work per step and rest after it, while idle.
    pub pace: Pace,
    /// When to start a full collection (once idle).
    pub full: FullTriggers,
    /// How long an unreachable object stays (see [`GcPolicy::grace`]).
    /// Default: 10 minutes.
    pub grace: Duration,
}

impl Default for IdleGc {
    fn default() -> Self {
        IdleGc {
            idle: Duration::from_millis(500),
            pace: Pace {
                batch: 512,
                pause: Duration::ZERO,
            },
            full: FullTriggers::default(),
            grace: Duration::from_secs(600),
        }
    }
}

impl GcPolicy for IdleGc {
    fn grace(&self) -> Duration {
        self.grace
    }

    fn decide(&self, f: &GcFacts) -> GcAction {
        if let Some(since) = f.since_last_commit
            && since < self.idle
        {
            return GcAction::Wait(self.idle - since);
        }
        if f.full_running || self.full.due(f) {
            GcAction::Full(self.pace)
        } else if f.queue_due(self.grace) {
            GcAction::Incremental(self.pace)
        } else {
            let idle = self.idle.max(Duration::from_millis(100));
            GcAction::Wait(f.until_due(self.grace).map_or(idle, |d| d.max(idle)))
        }
    }
}

/// Never collects by itself: garbage is reclaimed only by
/// `collect_garbage_now`, `pack` or `durus-redb gc`. No thread is started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManualGc;

impl GcPolicy for ManualGc {
    fn background(&self) -> bool {
        false
    }

    fn decide(&self, _: &GcFacts) -> GcAction {
        GcAction::Wait(Duration::from_secs(3600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle_facts(queue: u64) -> GcFacts {
        GcFacts {
            queue_len: queue,
            since_last_commit: Some(Duration::from_secs(10)),
            ..GcFacts::default()
        }
    }

    #[test]
    fn incremental_waits_out_the_grace_window_then_steps_also_while_commits_flow() {
        let p = IncrementalGc::default();
        assert_eq!(p.grace, Duration::from_secs(600));
        let young = GcFacts {
            queue_len: 3,
            oldest_queued: Some(Duration::from_secs(599)),
            since_last_commit: Some(Duration::from_secs(10)),
            ..GcFacts::default()
        };
        assert_eq!(p.decide(&young), GcAction::Wait(Duration::from_secs(1)));
        let almost = GcFacts {
            oldest_queued: Some(Duration::from_millis(599_700)),
            ..young
        };
        assert_eq!(
            p.decide(&almost),
            GcAction::Wait(Duration::from_millis(300))
        );
        let due = GcFacts {
            oldest_queued: Some(Duration::from_secs(600)),
            ..young
        };
        assert_eq!(p.decide(&due), GcAction::Incremental(p.pace));
        let flowing = GcFacts {
            since_last_commit: Some(Duration::from_millis(5)),
            ..due
        };
        assert_eq!(p.decide(&flowing), GcAction::Incremental(p.pace));
        let idle = IdleGc::default();
        assert!(matches!(idle.decide(&young), GcAction::Wait(_)));
        assert_eq!(idle.decide(&due), GcAction::Incremental(idle.pace));
    }

    #[test]
    fn due_garbage_is_reclaimed_while_a_full_collection_waits_or_runs() {
        let mut p = IncrementalGc::default();
        p.full.after_bytes = Some(10);
        let due = GcFacts {
            queue_len: 3,
            oldest_queued: Some(Duration::from_secs(700)),
            bytes_since_full: 100,
            since_last_commit: Some(Duration::from_millis(5)),
            ..GcFacts::default()
        };
        // A full collection is due but commits flow: incremental work goes on.
        assert_eq!(p.decide(&due), GcAction::Incremental(p.pace));
        let nothing_due = GcFacts {
            queue_len: 0,
            oldest_queued: None,
            ..due
        };
        assert!(matches!(p.decide(&nothing_due), GcAction::Wait(_)));
        // Running: asked between its chunks, it reclaims due garbage first.
        let running = GcFacts {
            full_running: true,
            ..due
        };
        assert_eq!(p.decide(&running), GcAction::Incremental(p.pace));
        let running_idle = GcFacts {
            full_running: true,
            ..nothing_due
        };
        assert_eq!(p.decide(&running_idle), GcAction::Full(p.pace));
    }

    #[test]
    fn incremental_steps_while_the_queue_is_not_empty() {
        let p = IncrementalGc::default();
        assert_eq!(p.decide(&idle_facts(5)), GcAction::Incremental(p.pace));
        assert_eq!(p.decide(&idle_facts(0)), GcAction::Wait(p.poll));
    }

    #[test]
    fn full_collection_starts_on_each_trigger_and_resumes_when_interrupted() {
        let p = IncrementalGc {
            full: FullTriggers {
                after_bytes: Some(100),
                after_deletions: Some(10),
                interval: Some(Duration::from_secs(60)),
            },
            ..IncrementalGc::default()
        };
        let base = idle_facts(0);
        assert!(matches!(p.decide(&base), GcAction::Wait(_)));
        for f in [
            GcFacts {
                bytes_since_full: 100,
                ..base
            },
            GcFacts {
                deleted_since_full: 10,
                ..base
            },
            GcFacts {
                since_full: Some(Duration::from_secs(61)),
                commits_since_full: 1,
                ..base
            },
            GcFacts {
                full_interrupted: true,
                ..base
            },
        ] {
            assert!(matches!(p.decide(&f), GcAction::Full(_)), "{f:?}");
        }
        // The interval alone, without commits since, starts nothing.
        let quiet = GcFacts {
            since_full: Some(Duration::from_secs(600)),
            ..base
        };
        assert!(matches!(p.decide(&quiet), GcAction::Wait(_)));
        // Never: only an interrupted collection resumes.
        let never = IncrementalGc {
            full: FullTriggers::never(),
            ..p
        };
        let busy = GcFacts {
            bytes_since_full: u64::MAX,
            deleted_since_full: u64::MAX,
            since_full: Some(Duration::MAX),
            commits_since_full: 1,
            ..base
        };
        assert!(matches!(never.decide(&busy), GcAction::Wait(_)));
    }

    #[test]
    fn idle_policy_waits_out_recent_commits_even_mid_collection() {
        let p = IdleGc {
            idle: Duration::from_millis(500),
            ..IdleGc::default()
        };
        let busy = GcFacts {
            queue_len: 100,
            full_running: true,
            since_last_commit: Some(Duration::from_millis(200)),
            ..GcFacts::default()
        };
        assert_eq!(p.decide(&busy), GcAction::Wait(Duration::from_millis(300)));
        let idle = GcFacts {
            since_last_commit: Some(Duration::from_millis(500)),
            ..busy
        };
        assert_eq!(p.decide(&idle), GcAction::Full(p.pace));
        let idle_queue = GcFacts {
            full_running: false,
            ..idle
        };
        assert_eq!(p.decide(&idle_queue), GcAction::Incremental(p.pace));
        // Nothing committed since open counts as idle.
        let fresh = GcFacts {
            since_last_commit: None,
            ..idle_queue
        };
        assert_eq!(p.decide(&fresh), GcAction::Incremental(p.pace));
    }

    #[test]
    fn manual_policy_runs_no_thread() {
        assert!(!ManualGc.background());
        assert!(matches!(
            ManualGc.decide(&idle_facts(1_000_000)),
            GcAction::Wait(_)
        ));
    }
}
