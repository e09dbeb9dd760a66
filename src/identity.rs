//! Who a request acts for, found the same way by the proxy and the user API.

use std::sync::Arc;

use http::HeaderMap;

use crate::accounts::Account;
use crate::app::App;
use crate::config::IdentityMode;
use crate::rescue::GatewayError;

/// The account a request acts for: its API key's owner, or the account a trusted header
/// names. Unknown: 401; the caller checks suspension.
pub fn identify(app: &App, headers: &HeaderMap) -> Result<Arc<Account>, GatewayError> {
    let identity = &app.settings.identity;
    let value = headers
        .get(identity.header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| GatewayError::MissingCredentials {
            header: identity.header.clone(),
        })?;
    let (found, missing) = match identity.mode {
        IdentityMode::ApiKey => {
            let key = value.strip_prefix("Bearer ").unwrap_or(value).trim();
            (app.accounts.by_api_key(key), GatewayError::InvalidApiKey)
        }
        IdentityMode::TrustedHeader => (app.accounts.get(value), GatewayError::UnknownAccount),
    };
    let result = if found.is_some() { "hit" } else { "miss" };
    app.metrics.cache_lookups.with_label_values(&[result]).inc();
    found.ok_or(missing)
}
