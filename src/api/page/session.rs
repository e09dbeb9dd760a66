//! The usage page's sign-in: a signed, expiring token in a cookie, never the API key.
//!
//! `v1.<account id, hex>.<expiry, epoch ms>.<HMAC-SHA256, hex>`, where the MAC covers the
//! account, the expiry and the SHA-256 digest of the key that signed in. The digest is not in
//! the cookie (a leaked cookie must not be a way to brute-force a weak key); the token is
//! checked against the account's live keys, so revoking the key ends its sessions, on every
//! replica that shares the secret.

use std::sync::OnceLock;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Settings;
use crate::waterfall::Millis;

/// The cookie's name.
pub const COOKIE: &str = "flowgate_usage";

/// The path the cookie is sent to: the page and nothing else of the gateway.
pub const COOKIE_PATH: &str = "/usage";

const VERSION: &str = "v1";

/// What the MAC is computed under, so that no other use of the secret can make a token.
const CONTEXT: &[u8] = b"flowgate usage page session v1\0";

/// A session token read from a cookie: well-formed, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The account it claims.
    pub account: String,
    /// When it ends (epoch ms).
    pub expires_at: Millis,
    mac: Vec<u8>,
}

/// The secret sessions are signed with: the configured one, or one drawn at random once per
/// process (then a restart signs everyone out, and other replicas do not accept it).
pub fn secret(settings: &Settings) -> Result<&[u8], getrandom::Error> {
    static RANDOM: OnceLock<[u8; 32]> = OnceLock::new();
    if let Some(secret) = &settings.usage_page.session_secret {
        return Ok(secret.bytes());
    }
    if let Some(random) = RANDOM.get() {
        return Ok(random);
    }
    let mut drawn = [0u8; 32];
    getrandom::fill(&mut drawn)?;
    // Two first callers may race: the first stored wins, both use it.
    Ok(RANDOM.get_or_init(|| drawn))
}

fn mac(secret: &[u8], account: &str, expires_at: Millis, key_digest: &[u8; 32]) -> Hmac<Sha256> {
    // HMAC takes a key of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(CONTEXT);
    mac.update(&(account.len() as u64).to_be_bytes());
    mac.update(account.as_bytes());
    mac.update(&expires_at.to_be_bytes());
    mac.update(key_digest);
    mac
}

/// A token for `account`, signed in with the key whose SHA-256 is `key_digest`, ending at
/// `expires_at`.
pub fn sign(secret: &[u8], account: &str, expires_at: Millis, key_digest: &[u8; 32]) -> String {
    let tag = mac(secret, account, expires_at, key_digest)
        .finalize()
        .into_bytes();
    format!(
        "{VERSION}.{}.{expires_at}.{}",
        hex::encode(account),
        hex::encode(tag)
    )
}

impl Token {
    /// Reads a cookie's value; `None` when it is not a token of this version.
    pub fn parse(value: &str) -> Option<Token> {
        let mut parts = value.split('.');
        let (version, account, expires_at, mac) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != VERSION || parts.next().is_some() {
            return None;
        }
        Some(Token {
            account: String::from_utf8(hex::decode(account).ok()?).ok()?,
            expires_at: expires_at.parse().ok()?,
            mac: hex::decode(mac).ok()?,
        })
    }

    /// Whether it is unexpired at `now` and was signed with `secret` for a key whose SHA-256 is
    /// `key_digest` (compared in constant time).
    pub fn signed_by(&self, secret: &[u8], key_digest: &[u8; 32], now: Millis) -> bool {
        now < self.expires_at
            && mac(secret, &self.account, self.expires_at, key_digest)
                .verify_slice(&self.mac)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_token_is_valid_for_its_account_key_and_time_only() {
        let key = crate::config::sha256("sk-alice");
        let other_key = crate::config::sha256("sk-other");
        let token = sign(SECRET, "alice", 2_000, &key);
        assert!(!token.contains("sk-alice"), "the key is never in the token");
        let parsed = Token::parse(&token).expect("well-formed");
        assert_eq!(
            (parsed.account.as_str(), parsed.expires_at),
            ("alice", 2_000)
        );
        assert!(parsed.signed_by(SECRET, &key, 1_999));
        assert!(!parsed.signed_by(SECRET, &key, 2_000), "expired");
        assert!(!parsed.signed_by(SECRET, &other_key, 1_000), "another key");
        assert!(
            !parsed.signed_by(b"another secret, as long as it is!", &key, 1_000),
            "another secret"
        );
    }

    #[test]
    fn a_changed_token_is_refused() {
        let key = crate::config::sha256("sk-alice");
        let token = sign(SECRET, "alice", 2_000, &key);
        // Another account, a later expiry, a flipped MAC: each fails.
        let forged_account = token.replace(&hex::encode("alice"), &hex::encode("bob"));
        let forged_expiry = token.replace(".2000.", ".9000.");
        let mut forged_mac = token.clone();
        let last = forged_mac.pop().unwrap();
        forged_mac.push(if last == '0' { '1' } else { '0' });
        for forged in [forged_account, forged_expiry, forged_mac] {
            let parsed = Token::parse(&forged).expect("still well-formed");
            assert!(!parsed.signed_by(SECRET, &key, 1_000), "{forged}");
        }
        for junk in [
            "",
            "v1",
            "v1.zz.1.00",
            "v2.616c696365.2000.00",
            "v1.61.x.00",
            "a.b.c.d.e",
        ] {
            assert_eq!(Token::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn without_a_configured_secret_the_process_draws_one() {
        let settings = Settings::parse(
            "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://x.db\"\n[identity]\nmode = \"api_key\"\n",
        )
        .expect("minimal config");
        let a = secret(&settings).expect("random").to_vec();
        let b = secret(&settings).expect("random").to_vec();
        assert_eq!(a, b, "one per process");
        assert_eq!(a.len(), 32);
        assert_ne!(a, vec![0u8; 32]);
    }
}
