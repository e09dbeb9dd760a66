//! Strict mode's slices: what one replica may spend of the pools it shares with others.
//!
//! A replica of a strict plan draws a window, free tier or grant only within a slice it leased
//! from the store (the Doorman pattern). The store keeps, per pool, `committed + Σ leases ≤
//! limit` (or `≤ balance`); a replica keeps, per slice, what it may still draw (`remaining`)
//! and what it drew that the store has not committed yet (`outstanding`). The store's lease is
//! always `remaining + outstanding`: a draw moves units from the first to the second, a
//! released hold moves them back, a commit takes them out of both the lease and `outstanding`.
//! So no replica can spend what another leased, and overspend is zero by construction.

use smallvec::SmallVec;

use super::{Millis, Units};

/// A pool that strict mode leases, as the engine names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeasePool {
    /// A usage-limit or free-tier layer, by its index in the plan (units).
    Layer(u8),
    /// A grant, by its store id (credits).
    Grant(i64),
}

/// One leased slice of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// The pool.
    pub pool: LeasePool,
    /// Units (or credits) this replica may still draw.
    pub remaining: u64,
    /// Drawn under the lease, not committed by the store yet.
    pub outstanding: u64,
    /// The store had no more to lease at the last round; until this instant the pool is not
    /// asked for again (its room belongs to other replicas or is used up).
    pub drained_until: Millis,
    /// When this slice was last drawn from (idle slices are returned).
    pub last_drawn: Millis,
}

/// An account's slices on this replica. `valid_until` is when the store's lease may lapse
/// (its expiry less a margin): past it nothing is drawn until the lease is renewed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leases {
    slices: SmallVec<[Slice; 4]>,
    /// Until when the slices may be drawn from.
    pub valid_until: Millis,
}

impl Leases {
    /// What may still be drawn from `pool` at `now`.
    pub fn room(&self, pool: LeasePool, now: Millis) -> u64 {
        if now >= self.valid_until {
            return 0;
        }
        self.slice(pool).map_or(0, |s| s.remaining)
    }

    /// Whether the store had nothing more to lease of `pool` at the last round.
    pub fn drained(&self, pool: LeasePool, now: Millis) -> bool {
        now < self.valid_until && self.slice(pool).is_some_and(|s| now < s.drained_until)
    }

    /// Until when the store said `pool` is drained, if it is at `now`.
    pub fn drained_until(&self, pool: LeasePool, now: Millis) -> Option<Millis> {
        self.drained(pool, now)
            .then(|| self.slice(pool).map(|s| s.drained_until))
            .flatten()
    }

    /// The slices.
    pub fn slices(&self) -> &[Slice] {
        &self.slices
    }

    /// Adds what a lease round granted: `granted` more of `pool`, which the store had
    /// `drained` (it could not give all that was asked) until `drained_until`.
    pub fn granted(&mut self, pool: LeasePool, granted: u64, drained_until: Option<Millis>) {
        let slice = self.slice_mut(pool);
        slice.remaining += granted;
        slice.drained_until = drained_until.unwrap_or(0);
    }

    /// Takes the store's lease of `pool` as the truth (a renewal read it): what may still be
    /// drawn is the lease less what is outstanding.
    pub fn sync(&mut self, pool: LeasePool, leased: u64) {
        let slice = self.slice_mut(pool);
        slice.remaining = slice
            .remaining
            .min(leased.saturating_sub(slice.outstanding));
    }

    /// Returns the slices idle since `idle_since`: their remaining is set to 0 and what the
    /// store's lease must keep (the outstanding draws) is returned per pool.
    pub fn give_back_idle(&mut self, idle_since: Millis) -> SmallVec<[(LeasePool, u64); 4]> {
        let mut kept = SmallVec::new();
        for s in &mut self.slices {
            if s.last_drawn < idle_since {
                s.remaining = 0;
            }
            kept.push((s.pool, s.remaining + s.outstanding));
        }
        kept
    }

    /// Whether nothing is leased or outstanding.
    pub fn is_empty(&self) -> bool {
        self.slices
            .iter()
            .all(|s| s.remaining == 0 && s.outstanding == 0)
    }

    /// A draw under the lease (a hold).
    pub(super) fn take(&mut self, pool: LeasePool, amount: u64, now: Millis) {
        let slice = self.slice_mut(pool);
        debug_assert!(slice.remaining >= amount, "drew past a lease");
        slice.remaining = slice.remaining.saturating_sub(amount);
        slice.outstanding += amount;
        slice.last_drawn = now;
    }

    /// A draw given back before the store committed it (a released hold, a duplicate).
    pub(super) fn give(&mut self, pool: LeasePool, amount: u64) {
        if let Some(slice) = self.slices.iter_mut().find(|s| s.pool == pool) {
            let back = amount.min(slice.outstanding);
            slice.outstanding -= back;
            slice.remaining += back;
        }
    }

    /// A draw the store committed: its lease shrank by the same amount.
    pub(super) fn committed(&mut self, pool: LeasePool, amount: u64) {
        if let Some(slice) = self.slices.iter_mut().find(|s| s.pool == pool) {
            slice.outstanding = slice.outstanding.saturating_sub(amount);
        }
    }

    fn slice(&self, pool: LeasePool) -> Option<&Slice> {
        self.slices.iter().find(|s| s.pool == pool)
    }

    fn slice_mut(&mut self, pool: LeasePool) -> &mut Slice {
        let i = match self.slices.iter().position(|s| s.pool == pool) {
            Some(i) => i,
            None => {
                self.slices.push(Slice {
                    pool,
                    remaining: 0,
                    outstanding: 0,
                    drained_until: 0,
                    last_drawn: 0,
                });
                self.slices.len() - 1
            }
        };
        &mut self.slices[i]
    }
}

/// What a lease round must ask the store for: per pool, how much more than the slice holds.
pub type Wants = SmallVec<[(LeasePool, Units); 4]>;
