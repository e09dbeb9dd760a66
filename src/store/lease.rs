//! Strict mode's rule at the store: how much of a pool a replica may lease.
//!
//! For every pool the store keeps `committed + Σ leases ≤ limit` (a window's limit, a free
//! tier's allowance, a grant's balance). A lease round, under the account row's lock, reads the
//! committed usage and every replica's lease, and gives the asking replica what it wants, or a
//! quarter of what is free when that is more (fewer rounds while there is plenty), but never
//! more than is free. A commit, under the same lock, turns lease into committed usage: the sum
//! does not move. So replicas together never spend more than the limit.

use smallvec::SmallVec;

use crate::waterfall::{LeasePool, Millis, Units};

/// What one pool's limit is, as the store checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseLimit {
    /// A usage-limit layer's windows: (the first instant it counts, limit) each, as the asking
    /// replica computed them at the round's `now` (a rolling window's first minute, a calendar
    /// window's period start in its zone); a unit needs room in all.
    Windows(SmallVec<[(Millis, Units); 2]>),
    /// A free tier: its allowance in the period that starts at `period_start`.
    FreeTier {
        /// Units per period.
        allowance: Units,
        /// Start of the current period.
        period_start: Millis,
    },
    /// A grant: its committed balance.
    Grant,
}

/// One pool a lease round asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    /// The pool.
    pub pool: LeasePool,
    /// How much more this replica wants of it.
    pub want: u64,
    /// Its limit.
    pub limit: LeaseLimit,
}

/// What a lease round gave for one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    /// The pool.
    pub pool: LeasePool,
    /// Added to this replica's lease.
    pub granted: u64,
    /// Less than wanted: nothing more is free (other replicas hold it, or it is used up).
    pub drained: bool,
}

/// What a lease round did: the grants asked for, and this replica's lease of every pool of the
/// account afterwards (a pool absent has no lease: it lapsed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRound {
    /// Per pool asked for.
    pub grants: Vec<LeaseGrant>,
    /// This replica's leases of the account, after the round.
    pub held: Vec<(LeasePool, u64)>,
}

/// One of this replica's leases, as a renewal found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    /// Whose pool.
    pub account: String,
    /// The pool.
    pub pool: LeasePool,
    /// The lease.
    pub amount: u64,
}

/// The slice a replica gets: what it wants, or a quarter of what is free if that is more,
/// never more than is free.
pub fn slice(want: u64, free: u64) -> u64 {
    free.min(want.max(free / 4))
}

/// Room left in a usage-limit layer's windows: the smallest over the windows of
/// `limit − committed since the window's first instant`, before any lease. `counters` are
/// (minute start in ms, units) of the layer.
pub fn window_room(windows: &[(Millis, Units)], counters: &[(Millis, u64)]) -> u64 {
    windows
        .iter()
        .map(|&(first, limit)| {
            let used: u64 = counters
                .iter()
                .filter(|(at, _)| *at >= first)
                .map(|(_, u)| *u)
                .sum();
            limit.saturating_sub(used)
        })
        .min()
        .unwrap_or(0)
}

/// The earliest counter a limit needs (older ones cannot count).
pub fn counters_since(limit: &LeaseLimit) -> Option<Millis> {
    match limit {
        LeaseLimit::Windows(w) => w.iter().map(|(first, _)| *first).min(),
        LeaseLimit::FreeTier { period_start, .. } => Some(*period_start),
        LeaseLimit::Grant => None,
    }
}

/// The pool's name in the store.
pub fn pool_key(pool: LeasePool) -> String {
    match pool {
        LeasePool::Layer(i) => format!("layer:{i}"),
        LeasePool::Grant(id) => format!("grant:{id}"),
    }
}

/// Parses [`pool_key`]'s names.
pub fn parse_pool_key(key: &str) -> Option<LeasePool> {
    let (kind, n) = key.split_once(':')?;
    match kind {
        "layer" => n.parse().ok().map(LeasePool::Layer),
        "grant" => n.parse().ok().map(LeasePool::Grant),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waterfall::{MINUTE_MS, Period, Window};

    #[test]
    fn a_slice_is_the_want_or_a_quarter_of_what_is_free_never_more_than_free() {
        assert_eq!(slice(3, 100), 25);
        assert_eq!(slice(30, 100), 30);
        assert_eq!(slice(30, 10), 10);
        assert_eq!(slice(5, 0), 0);
        assert_eq!(slice(1, 3), 1);
    }

    /// The limit of the windows of `w` at `now`, as a replica asks.
    fn limit(w: &[Window], now: Millis) -> SmallVec<[(Millis, Units); 2]> {
        w.iter().map(|w| (w.span(now).0, w.limit)).collect()
    }

    #[test]
    fn window_room_counts_only_minutes_inside_each_window() {
        let now = 100 * MINUTE_MS + 30_000;
        // 5 units 10 minutes ago, 2 units this minute.
        let counters = [(90 * MINUTE_MS, 5), (100 * MINUTE_MS, 2)];
        let room = |w: &[Window]| window_room(&limit(w, now), &counters);
        assert_eq!(room(&[Window::rolling("a", 10, 20)]), 18);
        assert_eq!(room(&[Window::rolling("a", 11, 20)]), 13);
        let both = [Window::rolling("a", 11, 20), Window::rolling("b", 5, 3)];
        assert_eq!(room(&both), 1);
        assert_eq!(room(&[Window::rolling("a", 11, 4)]), 0);
        assert_eq!(
            counters_since(&LeaseLimit::Windows(limit(
                &[Window::rolling("a", 11, 4)],
                now
            ))),
            Some(90 * MINUTE_MS)
        );
    }

    #[test]
    fn a_calendar_windows_room_counts_from_its_local_midnight() {
        // 2026-11-24 12:00 UTC is 07:00 in New York; its day began at 05:00 UTC.
        let day = |h: i64| 1_795_478_400_000 + h * 3_600_000; // 2026-11-24 00:00 UTC + h
        let now = day(12);
        let counters = [(day(4), 5), (day(5), 2), (day(11), 1)];
        let ny = [Window::calendar(
            "day",
            Period::Day,
            chrono_tz::America::New_York,
            10,
        )];
        assert_eq!(window_room(&limit(&ny, now), &counters), 7);
        assert_eq!(
            counters_since(&LeaseLimit::Windows(limit(&ny, now))),
            Some(day(5))
        );
        let utc = [Window::calendar("day", Period::Day, chrono_tz::UTC, 10)];
        assert_eq!(window_room(&limit(&utc, now), &counters), 2);
    }

    #[test]
    fn pool_keys_round_trip() {
        for pool in [
            LeasePool::Layer(0),
            LeasePool::Layer(7),
            LeasePool::Grant(123),
        ] {
            assert_eq!(parse_pool_key(&pool_key(pool)), Some(pool));
        }
        assert_eq!(parse_pool_key("layer:x"), None);
        assert_eq!(parse_pool_key("other:1"), None);
    }
}
