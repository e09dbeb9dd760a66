//! In-memory idempotency: one request per `Idempotency-Key` at a time, one charge per key, and
//! no paid work done twice for one key (Stripe's model).
//!
//! A key seen while its first request is still running is refused with 409 (the client
//! retries later). A key already charged is answered from here, never forwarded again: with
//! the original response when it was small enough to keep, else with a 409 naming the
//! original decision. A key sent again with a different request (method, path or body) is
//! refused with 422. A key whose request failed is free to be retried and charged.
//!
//! Entries live for `idempotency_ttl_s` and the registry is bounded in bytes
//! ([`REGISTRY_BYTES_MAX`]); what it forgets (or loses to a restart) the store still enforces
//! for charging: its unique charge key records a repeat as a duplicate and the in-memory hold
//! is given back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use uuid::Uuid;

use crate::ids::{AccountId, IdempotencyKey};

/// Most bytes the registry keeps (keys and stored responses); past it the least recently used
/// keys are forgotten (the store's unique key still catches their repeats for charging).
pub const REGISTRY_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Largest response body kept to answer a repeat of its key.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// What one key costs the registry beside its stored response, for the byte bound.
const KEY_OVERHEAD_BYTES: u32 = 512;

/// What identifies the request a key was first used for: SHA-256 of method, path, body and
/// the cost the route read from it (a cost can come from a header the body does not show).
pub type Fingerprint = [u8; 32];

/// The fingerprint of a request of `units`.
pub fn fingerprint(method: &http::Method, uri: &http::Uri, units: u64, body: &[u8]) -> Fingerprint {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0]);
    h.update(units.to_le_bytes());
    h.update(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

/// A completed response kept to answer repeats of its key.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    /// Its status.
    pub status: http::StatusCode,
    /// Its `content-type`, if it had one.
    pub content_type: Option<HeaderValue>,
    /// Its whole body.
    pub body: Bytes,
}

/// A key within its account: two fields, never one joined string, so no two accounts can
/// share a key whatever their ids and keys contain.
type ScopedKey = (AccountId, IdempotencyKey);

/// What is known about a key.
#[derive(Debug, Clone)]
pub struct KeyState {
    /// The decision that ran (or runs) the key's request.
    decision: Uuid,
    /// The request it ran.
    fingerprint: Fingerprint,
    /// `None` while running; once charged, the response if it was kept.
    charged: Option<Option<Arc<StoredResponse>>>,
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
    /// The key was already charged, by this decision; its response if it was kept.
    Charged(Uuid, Option<Arc<StoredResponse>>),
    /// The key was used for a different request (method, path or body), by this decision.
    Mismatch(Uuid),
}

/// A key owned by one request. Dropping it without [`ClaimedKey::charged`] frees the key.
#[derive(Debug)]
pub struct ClaimedKey {
    key: ScopedKey,
    fingerprint: Fingerprint,
    registry: Idempotency,
    charged: bool,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

impl Idempotency {
    /// A registry remembering keys for `ttl`, in at most `bytes_max` bytes.
    pub fn new(ttl: Duration, bytes_max: u64) -> Idempotency {
        Idempotency {
            keys: moka::sync::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(bytes_max)
                .weigher(|(_, key): &ScopedKey, state: &KeyState| {
                    let response = match &state.charged {
                        Some(Some(r)) => r.body.len(),
                        _ => 0,
                    };
                    let size = key.as_str().len().saturating_add(response);
                    KEY_OVERHEAD_BYTES.saturating_add(u32::try_from(size).unwrap_or(u32::MAX))
                })
                .build(),
        }
    }

    /// Claims `key` of `account` for the request deciding as `decision`.
    /// Claims `key` of `account` for the request `fingerprint`, deciding as `decision`.
    pub fn claim(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        decision: Uuid,
    ) -> Claim {
        let scoped = (account.clone(), key.clone());
        let entry = self.keys.entry(scoped.clone()).or_insert_with(|| KeyState {
            decision,
            fingerprint,
            charged: None,
        });
        if entry.is_fresh() {
            return Claim::Claimed(ClaimedKey {
                key: scoped,
                fingerprint,
                registry: self.clone(),
                charged: false,
            });
        }
        let state = entry.into_value();
        match state.charged {
            _ if state.fingerprint != fingerprint => Claim::Mismatch(state.decision),
            None => Claim::InFlight(state.decision),
            Some(response) => Claim::Charged(state.decision, response),
        }
    }
}

impl ClaimedKey {
    /// Marks the key charged by `decision`: later requests with it are answered with
    /// `response` (or, without one, told the key has completed) and never forwarded.
    pub fn charged(mut self, decision: Uuid, response: Option<StoredResponse>) {
        let state = KeyState {
            decision,
            fingerprint: self.fingerprint,
            charged: Some(response.map(Arc::new)),
        };
        self.registry.keys.insert(self.key.clone(), state);
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
        let reg = Idempotency::new(Duration::from_secs(60), 1 << 20);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let f = [7; 32];
        let acct = AccountId::from("acct");
        let other = AccountId::from("other");
        let k1 = IdempotencyKey::parse("k1").unwrap();
        let k2 = IdempotencyKey::parse("k2").unwrap();
        let Claim::Claimed(first) = reg.claim(&acct, &k1, f, a) else {
            panic!("first claim")
        };
        assert!(matches!(reg.claim(&acct, &k1, f, b), Claim::InFlight(id) if id == a));
        // Another account's identical key is independent.
        assert!(matches!(reg.claim(&other, &k1, f, b), Claim::Claimed(_)));
        first.charged(a, None);
        assert!(matches!(reg.claim(&acct, &k1, f, b), Claim::Charged(id, None) if id == a));
        // The same key for another request is refused, naming the first.
        assert!(matches!(reg.claim(&acct, &k1, [8; 32], b), Claim::Mismatch(id) if id == a));

        let Claim::Claimed(failed) = reg.claim(&acct, &k2, f, a) else {
            panic!("claim k2")
        };
        drop(failed);
        assert!(matches!(reg.claim(&acct, &k2, f, b), Claim::Claimed(_)));
    }

    #[test]
    fn ids_and_keys_that_join_to_the_same_string_stay_apart() {
        let reg = Idempotency::new(Duration::from_secs(60), 1 << 20);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let Claim::Claimed(first) = reg.claim(
            &AccountId::from("a"),
            &IdempotencyKey::parse("b:c").unwrap(),
            [0; 32],
            a,
        ) else {
            panic!("first claim")
        };
        first.charged(a, None);
        let second = reg.claim(
            &AccountId::from("a:b"),
            &IdempotencyKey::parse("c").unwrap(),
            [0; 32],
            b,
        );
        assert!(matches!(second, Claim::Claimed(_)), "{second:?}");
    }

    #[test]
    fn the_registry_is_bounded_in_bytes() {
        let reg = Idempotency::new(Duration::from_secs(60), 64 * 1024);
        let acct = AccountId::from("acct");
        for i in 0..1_000 {
            let key = IdempotencyKey::parse(&format!("k{i}")).unwrap();
            if let Claim::Claimed(c) = reg.claim(&acct, &key, [0; 32], Uuid::now_v7()) {
                let body = Bytes::from(vec![b'x'; 1024]);
                let response = StoredResponse {
                    status: http::StatusCode::OK,
                    content_type: None,
                    body,
                };
                c.charged(Uuid::now_v7(), Some(response));
            }
        }
        reg.keys.run_pending_tasks();
        assert!(
            reg.keys.weighted_size() <= 64 * 1024,
            "{}",
            reg.keys.weighted_size()
        );
        assert!(reg.keys.entry_count() < 1_000);
    }
}
