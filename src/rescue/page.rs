//! Every way a usage page request can fail, and its answer: an HTML page for a person (with
//! the sign-in form again where signing in is what went wrong), or for the page's own
//! refresh a short answer its script acts on (401: reload, which shows the sign-in form).

use askama::Template;
use axum::response::{Html, IntoResponse, Response};
use http::StatusCode;

use super::GatewayError;
use crate::store::StoreError;

/// Why a usage page request failed.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// Trusted-header mode: the header is missing or names no account.
    #[error(transparent)]
    Identity(GatewayError),
    /// The page's refresh came without a valid session (it ended, or its key was revoked).
    #[error("signed out")]
    SignedOut,
    /// The key given to sign in identifies no account (unknown or revoked).
    #[error("invalid API key")]
    InvalidKey,
    /// The sign-in form is wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// The form field at fault.
        field: &'static str,
        /// What is wrong, for a person.
        message: String,
    },
    /// A sign-in posted from another site (a login CSRF attempt).
    #[error("cross-site sign-in")]
    CrossSite,
    /// Something other than the caller failed; the reason is logged, not shown.
    #[error("internal: {reason}")]
    Internal {
        /// What failed.
        reason: String,
    },
    /// The store failed; logged, not shown.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The page a failure is shown on.
#[derive(Template)]
#[template(path = "usage/problem.html")]
struct Problem<'a> {
    title: &'a str,
    code: &'a str,
    message: &'a str,
    /// Shows the sign-in form under the message.
    sign_in: bool,
    session_hours: u64,
}

impl PageError {
    /// The answer, with the sign-in form offered for sessions of `session_ttl_s`.
    pub fn respond(self, session_ttl_s: u64) -> Response {
        use PageError as E;
        let (status, title, code, message, sign_in): (_, _, _, String, _) = match &self {
            E::Identity(e) => (
                StatusCode::UNAUTHORIZED,
                "Not signed in",
                "identity",
                match e {
                    GatewayError::MissingCredentials { header } => format!(
                        "The request carried no {header} header: the sign-in in front of the gateway sets it. Sign in there, then come back."
                    ),
                    GatewayError::UnknownAccount => {
                        "The account the sign-in in front of the gateway names is not known here."
                            .to_owned()
                    }
                    other => format!("The gateway could not tell who you are ({other})."),
                },
                false,
            ),
            E::SignedOut => (
                StatusCode::UNAUTHORIZED,
                "Signed out",
                "signed_out",
                "Your session has ended. Sign in again.".to_owned(),
                true,
            ),
            E::InvalidKey => (
                StatusCode::UNAUTHORIZED,
                "Sign in",
                "invalid_key",
                "This API key is not valid (or was revoked).".to_owned(),
                true,
            ),
            E::Invalid { field, message } => (
                StatusCode::BAD_REQUEST,
                "Sign in",
                "invalid_form",
                format!("{field}: {message}"),
                true,
            ),
            E::CrossSite => (
                StatusCode::FORBIDDEN,
                "Sign in",
                "cross_site",
                "A sign-in from another site was refused. Sign in on this page.".to_owned(),
                true,
            ),
            E::Internal { reason } => {
                tracing::error!(%reason, "usage page failed");
                internal()
            }
            E::Store(e) => {
                tracing::error!(error = %e, "usage page failed in the store");
                internal()
            }
        };
        let page = Problem {
            title,
            code,
            message: &message,
            sign_in,
            session_hours: session_ttl_s.div_ceil(3600),
        };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(e) => {
                tracing::error!(error = %e, "usage page problem could not be rendered");
                (status, message).into_response()
            }
        }
    }
}

fn internal() -> (StatusCode, &'static str, &'static str, String, bool) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something failed",
        "internal_error",
        "The gateway could not show your usage just now; reloading the page is safe.".to_owned(),
        false,
    )
}
