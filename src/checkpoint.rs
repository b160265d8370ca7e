//! Durability modes and checkpoint policies.
//!
//! A commit is applied to the store file without waiting for its fsync and,
//! unless the durability is [`Durability::Manual`], appended to the commit
//! log beside the store before it is acknowledged. [`Durability`] says when an
//! acknowledged commit is safe; a [`CheckpointPolicy`] says when the store
//! file itself is made durable (a *checkpoint*: one fsync of the file), after
//! which the log up to that point is deleted. Opening a store after a crash
//! replays the log past the last checkpoint.

use std::fmt;
use std::time::Duration;

/// How an acknowledged commit survives a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// The default. A commit is acknowledged once its log entry is on disk
    /// (`fdatasync`; commits that arrive together share one). No acknowledged
    /// commit is lost, by a crash of the process, the OS or the power.
    #[default]
    Fsync,
    /// A commit is acknowledged once its log entry is written to the OS; the
    /// log is fsynced every `fsync_interval`. Survives a kill -9 of the
    /// process (as Durus's FileStorage, which never fsyncs, does); a power
    /// cut or an OS crash loses up to `fsync_interval` of commits.
    Os {
        /// How often the log is made durable.
        fsync_interval: Duration,
    },
    /// No commit log: a commit is durable at the next checkpoint (when the
    /// [`CheckpointPolicy`] asks, at [`RedbStorage::checkpoint`](crate::RedbStorage::checkpoint),
    /// or at a clean close). Any crash loses what was committed since. For
    /// bulk work that can be redone.
    Manual,
}

impl Durability {
    /// [`Durability::Os`] with the default interval of one second.
    pub fn os() -> Durability {
        Durability::Os {
            fsync_interval: Duration::from_secs(1),
        }
    }
}

/// What the engine knows when it asks a policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointFacts {
    /// Commits applied since the last checkpoint, including the one being decided.
    pub commits_since_checkpoint: u64,
    /// Record bytes committed since the last checkpoint, including the one being decided.
    pub bytes_since_checkpoint: u64,
    /// Time since the last checkpoint.
    pub since_checkpoint: Duration,
}

/// What the engine knows about the file when it asks whether to compact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompactionFacts {
    /// Size of the file on disk.
    pub file_bytes: u64,
    /// Bytes of pages that are allocated but hold nothing (redb's fragmented bytes).
    pub fragmented_bytes: u64,
}

/// Decides when the store file is made durable (a checkpoint) and when it
/// is compacted. A checkpoint trims the commit log and bounds how far the
/// file can grow (redb cannot reuse pages freed since the last one) and how
/// long a replay after a crash takes.
///
/// Implementations must be cheap: [`checkpoint_due`](Self::checkpoint_due)
/// runs after every commit.
pub trait CheckpointPolicy: Send + Sync + fmt::Debug + 'static {
    /// Whether a checkpoint should be taken now. Asked after every commit and
    /// by a background thread every [`background_interval`](Self::background_interval).
    fn checkpoint_due(&self, facts: &CheckpointFacts) -> bool;

    /// How often a background thread should wake up to ask
    /// [`checkpoint_due`](Self::checkpoint_due); `None` runs no such thread.
    fn background_interval(&self) -> Option<Duration> {
        None
    }

    /// Whether to compact the file when the store is closed cleanly.
    fn compact_on_close(&self, facts: &CompactionFacts) -> bool {
        default_compaction(facts)
    }
}

/// Compact when more than half of a file of at least 64 MiB is empty pages.
pub fn default_compaction(facts: &CompactionFacts) -> bool {
    facts.file_bytes >= 64 << 20 && facts.fragmented_bytes * 2 > facts.file_bytes
}

/// A checkpoint at the latest when any bound is reached: `max_interval`
/// after the last one, `max_commits` commits, or `max_bytes` bytes of records
/// committed. The default: 1 s, 100,000 commits, 64 MiB.
///
/// With [`Durability::Manual`] this is also the loss window of a crash: the
/// commits since the last checkpoint. (The bounds on commits and bytes are
/// then exact: the commit that reaches one takes the checkpoint before it is
/// acknowledged.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Periodic {
    /// Longest time between checkpoints while commits come in.
    pub max_interval: Duration,
    /// At most this many commits between checkpoints.
    pub max_commits: u64,
    /// At most about this many record bytes between checkpoints.
    pub max_bytes: u64,
}

impl Periodic {
    /// A policy with these bounds.
    pub fn new(max_interval: Duration, max_commits: u64, max_bytes: u64) -> Periodic {
        Periodic {
            max_interval,
            max_commits,
            max_bytes,
        }
    }
}

impl Default for Periodic {
    fn default() -> Self {
        Periodic {
            max_interval: Duration::from_secs(1),
            max_commits: 100_000,
            max_bytes: 64 << 20,
        }
    }
}

impl CheckpointPolicy for Periodic {
    fn checkpoint_due(&self, facts: &CheckpointFacts) -> bool {
        facts.commits_since_checkpoint > 0
            && (facts.commits_since_checkpoint >= self.max_commits
                || facts.bytes_since_checkpoint >= self.max_bytes
                || facts.since_checkpoint >= self.max_interval)
    }

    fn background_interval(&self) -> Option<Duration> {
        // Wake at a fraction of the interval so no checkpoint is much late.
        Some((self.max_interval / 4).max(Duration::from_millis(1)))
    }
}

/// No checkpoint until [`RedbStorage::checkpoint`](crate::RedbStorage::checkpoint)
/// is called or the store is closed cleanly. With [`Durability::Manual`]:
/// for bulk loads that can be redone after a crash. redb cannot reuse pages
/// freed since the last checkpoint and the commit log grows, so checkpoint
/// every so often.
#[derive(Debug, Clone, Copy, Default)]
pub struct Manual;

impl CheckpointPolicy for Manual {
    fn checkpoint_due(&self, _: &CheckpointFacts) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(commits: u64, bytes: u64, ms: u64) -> CheckpointFacts {
        CheckpointFacts {
            commits_since_checkpoint: commits,
            bytes_since_checkpoint: bytes,
            since_checkpoint: Duration::from_millis(ms),
        }
    }

    #[test]
    fn periodic_is_due_when_a_bound_is_reached() {
        let p = Periodic::new(Duration::from_millis(100), 10, 1000);
        assert!(!p.checkpoint_due(&facts(9, 999, 99)));
        assert!(p.checkpoint_due(&facts(10, 0, 0)));
        assert!(p.checkpoint_due(&facts(1, 1000, 0)));
        assert!(p.checkpoint_due(&facts(1, 0, 100)));
        assert!(!p.checkpoint_due(&facts(0, 0, 500)));
        assert!(!p.checkpoint_due(&facts(0, 5000, 500)));
    }

    #[test]
    fn manual_is_never_due() {
        assert!(!Manual.checkpoint_due(&facts(1_000_000, u64::MAX, 1 << 40)));
    }

    #[test]
    fn compaction_waits_for_a_large_mostly_empty_file() {
        assert!(!default_compaction(&CompactionFacts {
            file_bytes: 1 << 20,
            fragmented_bytes: 1 << 19 | 1
        }));
        assert!(!default_compaction(&CompactionFacts {
            file_bytes: 128 << 20,
            fragmented_bytes: 32 << 20
        }));
        assert!(default_compaction(&CompactionFacts {
            file_bytes: 128 << 20,
            fragmented_bytes: 65 << 20
        }));
    }
}
