//! The garbage collector: reference counting for acyclic garbage, a full
//! mark-and-sweep for cycles, a background thread steered by a [`GcPolicy`].
//!
//! - `policy`: the [`GcPolicy`] trait and its policies ([`IncrementalGc`],
//!   [`IdleGc`], [`ManualGc`]). Policies decide; the thread acts.
//! - `incremental`: pops oids whose reference count fell to zero from
//!   `durus_gc_queue` and deletes them, transitively, in small non-durable
//!   write transactions (time proportional to the garbage).
//! - `full`: the full collection, which also reclaims cycles; `pack` runs it.
//! - `collector`: the thread (`durus-redb-gc`), woken by commits and timers.
//! - `state`: what the collector persists under the metadata key `gc`.
//!
//! The collector reaches the store through the engine's reference-count and
//! queue API (`engine::delete_queued`, `apply_ref_deltas`, `forget`) and the
//! commit hook it installs (`CommitHook`: its share of each commit, and the
//! oids commits store while a full collection runs). Every step runs in a
//! write transaction under the commit lock and re-checks its candidates
//! there, so it never races a commit. Nothing is collected while the
//! metadata key `migration` is present.

mod collector;
mod full;
mod incremental;
mod policy;
mod shared;
mod state;

pub(crate) use collector::start;
pub(crate) use full::run as run_full;
pub use full::{FullPhase, FullProgress, FullReport};
pub(crate) use incremental::step;
pub use policy::{
    FullTriggers, GcAction, GcFacts, GcPolicy, IdleGc, IncrementalGc, ManualGc, Pace,
};
pub(crate) use shared::GcShared;
pub use shared::GcStats;
pub use state::GcState;
pub(crate) use state::read_state;
