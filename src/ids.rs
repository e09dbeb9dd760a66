//! Identifiers parsed at the boundary, as types that cannot be mixed up.
//!
//! An account id and a client's idempotency key are both strings; joined into one string they
//! must never be confused; here each is its own type, checked once where it enters.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// An account's id, shared cheaply (one allocation per account, not per request).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(Arc<str>);

impl AccountId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for AccountId {
    fn from(id: &str) -> AccountId {
        AccountId(id.into())
    }
}

impl From<Arc<str>> for AccountId {
    fn from(id: Arc<str>) -> AccountId {
        AccountId(id)
    }
}

impl From<String> for AccountId {
    fn from(id: String) -> AccountId {
        AccountId(id.into())
    }
}

impl std::ops::Deref for AccountId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for AccountId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client's `Idempotency-Key`: 1 to 255 visible ASCII characters (as Stripe accepts).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Arc<str>);

/// Longest idempotency key accepted, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

/// Why a value is not an idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII characters")]
pub struct InvalidIdempotencyKey;

impl IdempotencyKey {
    /// Checks and keeps a key.
    pub fn parse(key: &str) -> Result<IdempotencyKey, InvalidIdempotencyKey> {
        let ok = !key.is_empty()
            && key.len() <= IDEMPOTENCY_KEY_BYTES_MAX
            && key.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(IdempotencyKey(key.into()))
        } else {
            Err(InvalidIdempotencyKey)
        }
    }

    /// The key as the client sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_up_to_255_bytes() {
        assert!(IdempotencyKey::parse("order-1001:a/b").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert_eq!(
            IdempotencyKey::parse(&"k".repeat(256)),
            Err(InvalidIdempotencyKey)
        );
        assert_eq!(IdempotencyKey::parse(""), Err(InvalidIdempotencyKey));
        assert_eq!(IdempotencyKey::parse("a b"), Err(InvalidIdempotencyKey));
        assert_eq!(IdempotencyKey::parse("clé"), Err(InvalidIdempotencyKey));
    }
}
