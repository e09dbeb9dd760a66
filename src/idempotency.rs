//! In-memory idempotency: one request per `Idempotency-Key` at a time, one charge per key.
//!
//! This is the fast first line; the store's unique `charge_key` is the guarantee. A key seen
//! while its first request is still running is refused with 409 (the client retries later);
//! a key already charged is forwarded again but never charged again; a key whose request
//! failed is free to be retried and charged. Entries live for `idempotency_ttl_s`; after that
//! (or after a restart) a repeat is still caught by the store, which records it as a duplicate
//! and has the in-memory hold given back.

use std::time::Duration;

use uuid::Uuid;

use crate::ids::{AccountId, IdempotencyKey};

/// Most keys remembered at once; past it the least recently used are forgotten (the store's
/// unique key still catches their repeats). About 200 bytes each: ~200 MiB at the bound.
pub const KEYS_MAX: u64 = 1_000_000;

/// A key within its account: two fields, never one joined string, so no two accounts can
/// share a key whatever their ids and keys contain.
type ScopedKey = (AccountId, IdempotencyKey);

/// What is known about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// A request with this key is running, under this decision.
    InFlight(Uuid),
    /// A request with this key was charged, under this decision.
    Charged(Uuid),
}

/// The registry of recent keys, scoped by account.
#[derive(Clone)]
pub struct Idempotency {
    keys: moka::sync::Cache<ScopedKey, KeyState>,
}

/// The result of claiming a key.
#[derive(Debug)]
pub enum Claim {
    /// This request owns the key; release or confirm it through the [`ClaimedKey`].
    Claimed(ClaimedKey),
    /// Another request with this key is still running.
    InFlight(Uuid),
    /// The key was already charged, by this decision.
    Charged(Uuid),
}

/// A key owned by one request. Dropping it without [`ClaimedKey::charged`] frees the key.
#[derive(Debug)]
pub struct ClaimedKey {
    key: ScopedKey,
    registry: Idempotency,
    charged: bool,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

impl Idempotency {
    /// A registry remembering at most `max` keys, each for `ttl`.
    pub fn new(ttl: Duration, max: u64) -> Idempotency {
        Idempotency {
            keys: moka::sync::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(max)
                .build(),
        }
    }

    /// Claims `key` of `account` for the request deciding as `decision`.
    pub fn claim(&self, account: &AccountId, key: &IdempotencyKey, decision: Uuid) -> Claim {
        let scoped = (account.clone(), key.clone());
        let entry = self
            .keys
            .entry(scoped.clone())
            .or_insert_with(|| KeyState::InFlight(decision));
        if entry.is_fresh() {
            return Claim::Claimed(ClaimedKey {
                key: scoped,
                registry: self.clone(),
                charged: false,
            });
        }
        match entry.into_value() {
            KeyState::InFlight(id) => Claim::InFlight(id),
            KeyState::Charged(id) => Claim::Charged(id),
        }
    }
}

impl ClaimedKey {
    /// Marks the key charged by `decision`: later requests with it are replays.
    pub fn charged(mut self, decision: Uuid) {
        self.registry
            .keys
            .insert(self.key.clone(), KeyState::Charged(decision));
        self.charged = true;
    }
}

impl Drop for ClaimedKey {
    fn drop(&mut self) {
        if !self.charged {
            self.registry.keys.invalidate(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_claimed_once_then_replayed_or_freed() {
        let reg = Idempotency::new(Duration::from_secs(60), 100);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let acct = AccountId::from("acct");
        let other = AccountId::from("other");
        let k1 = IdempotencyKey::parse("k1").unwrap();
        let k2 = IdempotencyKey::parse("k2").unwrap();
        let Claim::Claimed(first) = reg.claim(&acct, &k1, a) else {
            panic!("first claim")
        };
        assert!(matches!(reg.claim(&acct, &k1, b), Claim::InFlight(id) if id == a));
        // Another account's identical key is independent.
        assert!(matches!(reg.claim(&other, &k1, b), Claim::Claimed(_)));
        first.charged(a);
        assert!(matches!(reg.claim(&acct, &k1, b), Claim::Charged(id) if id == a));

        let Claim::Claimed(failed) = reg.claim(&acct, &k2, a) else {
            panic!("claim k2")
        };
        drop(failed);
        assert!(matches!(reg.claim(&acct, &k2, b), Claim::Claimed(_)));
    }

    #[test]
    fn ids_and_keys_that_join_to_the_same_string_stay_apart() {
        let reg = Idempotency::new(Duration::from_secs(60), 100);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let Claim::Claimed(first) = reg.claim(
            &AccountId::from("a"),
            &IdempotencyKey::parse("b:c").unwrap(),
            a,
        ) else {
            panic!("first claim")
        };
        first.charged(a);
        let second = reg.claim(
            &AccountId::from("a:b"),
            &IdempotencyKey::parse("c").unwrap(),
            b,
        );
        assert!(matches!(second, Claim::Claimed(_)), "{second:?}");
    }
}
