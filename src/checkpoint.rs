//! Checkpoint policies: when a commit becomes durable, and when the file is compacted.
//!
//! A policy only *decides*, from the facts it is given; the engine acts. With
//! redb a commit is either made durable when it commits (`Durability::Immediate`,
//! one fsync) or rides on a later checkpoint (`Durability::None`): such a commit
//! is visible at once but **lost if the process crashes** before the next
//! checkpoint (a clean close always checkpoints).

use std::fmt;
use std::time::Duration;

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

/// The durability a policy chose for one commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitDurability {
    /// Durable before the commit is acknowledged.
    Now,
    /// Acknowledged at once; made durable by a later checkpoint.
    Deferred,
}

/// Decides when commits are made durable and when the file is compacted.
///
/// Implementations must be cheap: `on_commit` runs on every commit, while the
/// commit lock is held.
pub trait CheckpointPolicy: Send + Sync + fmt::Debug + 'static {
    /// The durability of the commit now being applied. `facts` already count it.
    fn on_commit(&self, facts: &CheckpointFacts) -> CommitDurability;

    /// How often a background checkpointer should wake up to call
    /// [`checkpoint_due`](Self::checkpoint_due); `None` runs no such thread.
    fn background_interval(&self) -> Option<Duration> {
        None
    }

    /// Whether a checkpoint should be taken now, when commits are pending.
    fn checkpoint_due(&self, facts: &CheckpointFacts) -> bool {
        let _ = facts;
        false
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

/// Every commit is durable before it is acknowledged. The default.
///
/// Commits from several threads (or server connections) at once share one
/// fsync (group commit); each is still acknowledged only once durable.
#[derive(Debug, Clone, Copy, Default)]
pub struct EveryCommit;

impl CheckpointPolicy for EveryCommit {
    fn on_commit(&self, _: &CheckpointFacts) -> CommitDurability {
        CommitDurability::Now
    }
}

/// Commits are acknowledged at once and made durable together, at the latest
/// when any bound is reached: `max_interval` after the last checkpoint,
/// `max_commits` commits, or `max_bytes` bytes of records.
///
/// **Loss window**: a crash (of the process or the machine) loses the commits
/// acknowledged since the last checkpoint: at most `max_commits - 1` commits,
/// fewer than `max_bytes` bytes plus one commit's, and about `max_interval`
/// (plus the time one checkpoint takes) of work.
#[derive(Debug, Clone, Copy)]
pub struct Periodic {
    /// Longest time a commit waits for its checkpoint.
    pub max_interval: Duration,
    /// At most this many commits ride on one checkpoint.
    pub max_commits: u64,
    /// At most about this many record bytes ride on one checkpoint.
    pub max_bytes: u64,
}

impl Default for Periodic {
    fn default() -> Self {
        Periodic {
            max_interval: Duration::from_millis(200),
            max_commits: 1000,
            max_bytes: 64 << 20,
        }
    }
}

impl CheckpointPolicy for Periodic {
    fn on_commit(&self, facts: &CheckpointFacts) -> CommitDurability {
        if facts.commits_since_checkpoint >= self.max_commits
            || facts.bytes_since_checkpoint >= self.max_bytes
            || facts.since_checkpoint >= self.max_interval
        {
            CommitDurability::Now
        } else {
            CommitDurability::Deferred
        }
    }

    fn background_interval(&self) -> Option<Duration> {
        // Wake at a fraction of the interval so no commit waits much longer.
        Some((self.max_interval / 4).max(Duration::from_millis(1)))
    }

    fn checkpoint_due(&self, facts: &CheckpointFacts) -> bool {
        facts.commits_since_checkpoint > 0 && facts.since_checkpoint >= self.max_interval
    }
}

/// No commit is made durable until [`RedbStorage::checkpoint`](crate::RedbStorage::checkpoint)
/// is called or the store is closed cleanly: for bulk loads that can be redone
/// after a crash. redb cannot reuse pages freed since the last checkpoint, so
/// the file grows until one is taken: checkpoint every so often.
#[derive(Debug, Clone, Copy, Default)]
pub struct Manual;

impl CheckpointPolicy for Manual {
    fn on_commit(&self, _: &CheckpointFacts) -> CommitDurability {
        CommitDurability::Deferred
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
    fn every_commit_is_durable_now() {
        assert_eq!(
            EveryCommit.on_commit(&facts(1, 10, 0)),
            CommitDurability::Now
        );
    }

    #[test]
    fn periodic_defers_until_a_bound_is_reached() {
        let p = Periodic {
            max_interval: Duration::from_millis(100),
            max_commits: 10,
            max_bytes: 1000,
        };
        assert_eq!(p.on_commit(&facts(9, 999, 99)), CommitDurability::Deferred);
        assert_eq!(p.on_commit(&facts(10, 0, 0)), CommitDurability::Now);
        assert_eq!(p.on_commit(&facts(1, 1000, 0)), CommitDurability::Now);
        assert_eq!(p.on_commit(&facts(1, 0, 100)), CommitDurability::Now);
        assert!(!p.checkpoint_due(&facts(0, 0, 500)));
        assert!(p.checkpoint_due(&facts(1, 0, 100)));
        assert!(!p.checkpoint_due(&facts(1, 0, 99)));
    }

    #[test]
    fn manual_never_makes_a_commit_durable() {
        assert_eq!(
            Manual.on_commit(&facts(1_000_000, u64::MAX, 1 << 40)),
            CommitDurability::Deferred
        );
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
