//! `[usage_page]`: the HTML page a key's owner reads their usage on (`/usage`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::ConfigError;

/// The environment variable holding the usage page's session secret itself (at least
/// [`SESSION_SECRET_BYTES_MIN`] bytes); it wins over `usage_page.session_secret_file`.
pub const SESSION_SECRET_ENV: &str = "FLOWGATE_USAGE_PAGE_SECRET";

/// The shortest session secret accepted: an HMAC-SHA256 key of at least its output's size.
pub const SESSION_SECRET_BYTES_MIN: usize = 32;

/// `[usage_page]`: whether `/usage` is served, and how its sign-in sessions work.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsagePageSettings {
    /// Whether the gateway serves `/usage` (then no route may use it).
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// How long a sign-in lasts, in seconds (60 s to 30 days).
    #[serde(default = "defaults::session_ttl_s")]
    pub session_ttl_s: u64,
    /// When the session cookie is marked `Secure`.
    #[serde(default)]
    pub secure_cookie: SecureCookie,
    /// How often the open page refreshes its numbers, in seconds (1 to 3600).
    #[serde(default = "defaults::refresh_interval_s")]
    pub refresh_interval_s: u64,
    /// A file holding the secret that signs sessions (read at start and at every reload), so
    /// that sessions survive restarts and are accepted by every replica. Without it (and
    /// without `FLOWGATE_USAGE_PAGE_SECRET`) each process draws a random one: a restart signs
    /// everyone out, and a session is valid only on the replica that made it.
    pub session_secret_file: Option<PathBuf>,
    /// The secret read from the environment or the file ([`UsagePageSettings::read_secret`]).
    #[serde(skip)]
    pub session_secret: Option<SessionSecret>,
}

impl Default for UsagePageSettings {
    fn default() -> Self {
        UsagePageSettings {
            enabled: true,
            session_ttl_s: defaults::session_ttl_s(),
            secure_cookie: SecureCookie::default(),
            refresh_interval_s: defaults::refresh_interval_s(),
            session_secret_file: None,
            session_secret: None,
        }
    }
}

/// When the session cookie carries `Secure` (sent back over HTTPS only). flowgate itself
/// speaks plain HTTP; TLS ends in front of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecureCookie {
    /// When the sign-in request says it came over HTTPS (`X-Forwarded-Proto: https` or
    /// `Forwarded: proto=https`, set by the TLS proxy in front). A client that claims it
    /// falsely only gets a cookie its own plain-HTTP browser will not send back.
    #[default]
    Auto,
    /// Always (the page is only ever reached over HTTPS).
    Always,
    /// Never (plain HTTP on a trusted network).
    Never,
}

/// The key sessions are signed with. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSecret(Arc<[u8]>);

impl SessionSecret {
    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(..)")
    }
}

impl UsagePageSettings {
    /// Checks what serde cannot: the ranges.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError {
            key: format!("usage_page.{key}"),
            line: None,
            message: message.to_owned(),
        };
        if !(60..=30 * 24 * 3600).contains(&self.session_ttl_s) {
            return Err(bad(
                "session_ttl_s",
                "must be between 60 (a minute) and 2592000 (30 days)",
            ));
        }
        if !(1..=3600).contains(&self.refresh_interval_s) {
            return Err(bad("refresh_interval_s", "must be between 1 and 3600"));
        }
        Ok(())
    }

    /// Reads the session secret: `env` (the value of [`SESSION_SECRET_ENV`]) if set, else
    /// `session_secret_file` (surrounding whitespace trimmed). Either must hold at least
    /// [`SESSION_SECRET_BYTES_MIN`] bytes.
    pub fn read_secret(&mut self, env: Option<String>) -> Result<(), ConfigError> {
        let short = |key: &str| ConfigError {
            key: key.to_owned(),
            line: None,
            message: format!(
                "the session secret must be at least {SESSION_SECRET_BYTES_MIN} bytes (e.g. `openssl rand -hex 32`)"
            ),
        };
        let secret = match (env, &self.session_secret_file) {
            (Some(value), _) => {
                let value = value.trim().as_bytes().to_vec();
                if value.len() < SESSION_SECRET_BYTES_MIN {
                    return Err(short(SESSION_SECRET_ENV));
                }
                value
            }
            (None, Some(path)) => {
                let value = read_file(path)?;
                if value.len() < SESSION_SECRET_BYTES_MIN {
                    return Err(short("usage_page.session_secret_file"));
                }
                value
            }
            (None, None) => return Ok(()),
        };
        self.session_secret = Some(SessionSecret(secret.into()));
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError {
        key: "usage_page.session_secret_file".to_owned(),
        line: None,
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    Ok(bytes.trim_ascii().to_vec())
}

mod defaults {
    pub fn yes() -> bool {
        true
    }
    pub fn session_ttl_s() -> u64 {
        12 * 3600
    }
    pub fn refresh_interval_s() -> u64 {
        5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_from_the_environment_first_and_must_be_long_enough() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        std::fs::write(&file, format!("{}\n", "f".repeat(40))).expect("write");
        let mut page = UsagePageSettings {
            session_secret_file: Some(file.clone()),
            ..UsagePageSettings::default()
        };
        page.read_secret(None).expect("the file's secret");
        assert_eq!(
            page.session_secret.as_ref().map(|s| s.bytes().len()),
            Some(40)
        );
        page.read_secret(Some("e".repeat(32)))
            .expect("the environment's");
        assert_eq!(
            page.session_secret.as_ref().map(|s| s.bytes()),
            Some("e".repeat(32).as_bytes())
        );
        let e = page.read_secret(Some("short".into())).unwrap_err();
        assert_eq!(e.key, SESSION_SECRET_ENV);
        std::fs::write(&file, "short").expect("write");
        let e = page.read_secret(None).unwrap_err();
        assert_eq!(e.key, "usage_page.session_secret_file");
        page.session_secret_file = Some(dir.path().join("missing"));
        let e = page.read_secret(None).unwrap_err();
        assert!(e.message.contains("cannot read"), "{e}");
        assert_eq!(
            format!("{:?}", page.session_secret),
            "Some(SessionSecret(..))"
        );
    }

    const WITH_USAGE_ROUTE: &str = r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "sqlite://x.db"
[identity]
mode = "api_key"
[upstreams.b]
url = "http://127.0.0.1:1"
[[routes]]
method = "GET"
path = "/usage/report"
feature = "f"
upstream = "b"
cost = { fixed = 1 }
"#;

    #[test]
    fn the_page_reserves_its_paths_only_while_enabled() {
        let e = super::super::Settings::parse(WITH_USAGE_ROUTE).unwrap_err();
        assert_eq!(e.key, "routes[0].path");
        assert!(e.message.contains("enabled = false"), "{e}");
        let off = format!("{WITH_USAGE_ROUTE}[usage_page]\nenabled = false\n");
        let settings = super::super::Settings::parse(&off).expect("the product may have /usage");
        assert!(!settings.usage_page.enabled);
        let on =
            super::super::Settings::parse(&WITH_USAGE_ROUTE.replace("/usage/report", "/v1/usage"))
                .expect("/v1/usage is not the page's");
        assert!(on.usage_page.enabled, "on by default");
        assert_eq!(on.usage_page.session_ttl_s, 12 * 3600);
    }

    #[test]
    fn out_of_range_and_unknown_settings_name_their_key() {
        let base = WITH_USAGE_ROUTE.replace("/usage/report", "/v1/x");
        for (section, key) in [
            ("session_ttl_s = 10", "usage_page.session_ttl_s"),
            ("refresh_interval_s = 0", "usage_page.refresh_interval_s"),
        ] {
            let e = super::super::Settings::parse(&format!("{base}[usage_page]\n{section}\n"))
                .unwrap_err();
            assert_eq!(e.key, key);
        }
        let e = super::super::Settings::parse(&format!("{base}[usage_page]\nsecret = \"x\"\n"))
            .unwrap_err();
        assert!(e.message.contains("unknown field `secret`"), "{e}");
        let e = super::super::Settings::parse(&format!(
            "{base}[usage_page]\nsecure_cookie = \"sometimes\"\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("auto"), "{e}");
    }
}
