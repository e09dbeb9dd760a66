//! Helpers for the admin and user API tests: a gateway with an admin token, and requests.

use reqwest::{Method, RequestBuilder};

use super::{Harness, StoreKind};

/// The admin token the API tests configure (as its SHA-256, like an operator would).
pub const ADMIN_TOKEN: &str = "adm-7Qx2-test-only-token";

/// `config` with `[admin]` accepting [`ADMIN_TOKEN`].
pub fn with_admin(config: String) -> String {
    let digest = hex::encode(flowgate::config::sha256(ADMIN_TOKEN));
    format!("{config}\n[admin]\ntoken_hashes = [\"{digest}\"]\n")
}

/// A harness whose admin API accepts [`ADMIN_TOKEN`].
pub async fn start(kind: StoreKind) -> Harness {
    Harness::start_with(kind, with_admin).await
}

impl Harness {
    /// A request to the gateway with the admin token.
    pub fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// A GET to the gateway as the holder of `key`.
    pub fn get_as(&self, path: &str, key: &str) -> RequestBuilder {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
    }
}
