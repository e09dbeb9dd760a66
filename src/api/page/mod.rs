//! The usage page (`/usage`): the user API's numbers as HTML for the key's owner — every
//! window with its reset clock, the free tier, credits and promotions with their expiries,
//! and the recent decisions explained — readable on a phone and a desktop, with no build step
//! (askama templates in `templates/usage/`, checked at compile time, HTML-escaped).
//!
//! - `GET /usage`: the page, or the sign-in form.
//! - `POST /usage/session`: signs in with the API key in the form's body (never in a URL);
//!   sets an HttpOnly, `SameSite=Strict` cookie on `/usage` holding a signed, expiring token
//!   ([`session`]), and sends the browser back to `/usage`.
//! - `POST /usage/sign-out`: clears the cookie.
//! - `GET /usage/live`: the live part of the page, which its script fetches every
//!   `refresh_interval_s` (401 when signed out: the script reloads to the sign-in form).
//! - `GET /usage/page.js`: that script.
//!
//! With `identity.mode = "trusted_header"` there is no sign-in: the header the layer in
//! front sets identifies the caller, as for the API. The numbers are those of
//! `/v1/me/usage` ([`UsageBody::of`]) and `/v1/me/decisions` (the store's ledger page), never
//! computed a second time. The key and the cookie are never logged.

pub mod session;
pub mod view;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use cookie::{Cookie, SameSite};
use http::{HeaderMap, HeaderValue, header};

use crate::accounts::Account;
use crate::api::model::{LedgerEventBody, UsageBody};
use crate::app::App;
use crate::config::{IdentityMode, SecureCookie};
use crate::identity::identify;
use crate::rescue::page::PageError;
use crate::store::Page;
use session::Token;
use view::PageView;

/// How many recent decisions the page shows.
pub const RECENT_DECISIONS: u32 = 20;

/// Largest sign-in form read (a key is far shorter).
pub const SIGN_IN_BYTES_MAX: usize = 4 * 1024;

/// What every page answer carries: no caching (the numbers are one account's), no framing,
/// scripts only from the gateway itself, no referrer.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const SCRIPT: &str = include_str!("../../../templates/usage/page.js");

/// The page's routes, to merge into the gateway's router when `[usage_page] enabled`.
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/usage", get(show))
        .route("/usage/live", get(live))
        .route("/usage/session", post(sign_in))
        .route("/usage/sign-out", post(sign_out))
        .route("/usage/page.js", get(script))
        .layer(axum::middleware::map_response(protect))
}

/// The whole page.
#[derive(Template)]
#[template(path = "usage/page.html")]
struct FullPage<'a> {
    view: &'a PageView,
    refresh_ms: u64,
    /// A session made by signing in (not a trusted header): it can be ended here.
    can_sign_out: bool,
}

/// The live part alone, for the script's refresh.
#[derive(Template)]
#[template(path = "usage/live.html")]
struct LivePart<'a> {
    view: &'a PageView,
}

/// The sign-in form.
#[derive(Template)]
#[template(path = "usage/sign_in.html")]
struct SignIn<'a> {
    message: Option<&'a str>,
    session_hours: u64,
}

/// Who is signed in, if anyone: the trusted header's account, or a valid session's.
enum Visitor {
    /// Identified by the layer in front (`trusted_header` mode).
    Trusted(Arc<Account>),
    /// Signed in with an API key; the session is valid.
    Session(Arc<Account>),
    /// No session; `ended` when the browser sent one that is no longer valid.
    Anonymous { ended: bool },
}

async fn show(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let ttl = app.settings.usage_page.session_ttl_s;
    let shown = async {
        let (account, can_sign_out) = match visitor(&app, &headers).await? {
            Visitor::Trusted(account) => (account, false),
            Visitor::Session(account) => (account, true),
            Visitor::Anonymous { ended } => return sign_in_form(&app, &headers, ended),
        };
        let view = view(&app, &account).await?;
        let page = FullPage {
            view: &view,
            refresh_ms: app.settings.usage_page.refresh_interval_s * 1000,
            can_sign_out,
        };
        Ok(html(page.render())?.into_response())
    };
    shown.await.unwrap_or_else(|e: PageError| e.respond(ttl))
}

async fn live(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let ttl = app.settings.usage_page.session_ttl_s;
    let shown = async {
        let account = match visitor(&app, &headers).await? {
            Visitor::Trusted(account) | Visitor::Session(account) => account,
            Visitor::Anonymous { .. } => return Err(PageError::SignedOut),
        };
        let view = view(&app, &account).await?;
        Ok(html(LivePart { view: &view }.render())?.into_response())
    };
    shown.await.unwrap_or_else(|e: PageError| e.respond(ttl))
}

/// Signs in with the form's `key`: the key's owner gets a session cookie, and is sent to the
/// page (303 See Other, so that reloading it does not post the key again).
async fn sign_in(State(app): State<Arc<App>>, request: Request) -> Response {
    let settings = &app.settings.usage_page;
    let signed = async {
        if app.settings.identity.mode == IdentityMode::TrustedHeader {
            return Ok(Redirect::to(session::COOKIE_PATH).into_response());
        }
        let headers = request.headers().clone();
        // A browser says where a request comes from; one posted by another site's page is
        // refused (that would sign the visitor in as someone else).
        if headers
            .get("sec-fetch-site")
            .is_some_and(|site| site.as_bytes() == b"cross-site")
        {
            return Err(PageError::CrossSite);
        }
        let key = form_key(request.into_body()).await?;
        let account = app.accounts.by_api_key(&key).ok_or(PageError::InvalidKey)?;
        let secret = session::secret(&app.settings).map_err(|e| PageError::Internal {
            reason: format!("no random session secret: {e}"),
        })?;
        let ttl_s = i64::try_from(settings.session_ttl_s).unwrap_or(i64::MAX / 1000);
        let expires_at = app.clock.now_ms().saturating_add(ttl_s * 1000);
        let token = session::sign(
            secret,
            &account.id,
            expires_at,
            &crate::config::sha256(&key),
        );
        let cookie = Cookie::build((session::COOKIE, token))
            .path(session::COOKIE_PATH)
            .http_only(true)
            .same_site(SameSite::Strict)
            .secure(secure(settings.secure_cookie, &headers))
            .max_age(cookie::time::Duration::seconds(ttl_s))
            .build();
        Ok(with_cookie(Redirect::to(session::COOKIE_PATH), &cookie))
    };
    signed
        .await
        .unwrap_or_else(|e: PageError| e.respond(settings.session_ttl_s))
}

async fn sign_out(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    with_cookie(
        Redirect::to(session::COOKIE_PATH),
        &ended_cookie(app.settings.usage_page.secure_cookie, &headers),
    )
}

async fn script() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        )],
        SCRIPT,
    )
        .into_response()
}

/// The headers every page answer carries (see [`CONTENT_SECURITY_POLICY`]).
async fn protect(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Who the request is from (see [`Visitor`]).
async fn visitor(app: &App, headers: &HeaderMap) -> Result<Visitor, PageError> {
    if app.settings.identity.mode == IdentityMode::TrustedHeader {
        return identify(app, headers)
            .map(Visitor::Trusted)
            .map_err(PageError::Identity);
    }
    let Some(value) = session_cookie(headers) else {
        return Ok(Visitor::Anonymous { ended: false });
    };
    let ended = Ok(Visitor::Anonymous { ended: true });
    let Some(token) = Token::parse(&value) else {
        return ended;
    };
    let now = app.clock.now_ms();
    if now >= token.expires_at {
        return ended;
    }
    let Some(account) = app.accounts.get(&token.account) else {
        return ended;
    };
    let secret = session::secret(&app.settings).map_err(|e| PageError::Internal {
        reason: format!("no random session secret: {e}"),
    })?;
    // The key that signed in must still be live: revoking it ends its sessions.
    let keys = app.store.api_keys(&token.account).await?;
    let live = keys.iter().filter(|k| k.revoked_at.is_none()).any(|k| {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&k.key_hash, &mut digest).is_ok()
            && token.signed_by(secret, &digest, now)
    });
    Ok(if live {
        Visitor::Session(account)
    } else {
        Visitor::Anonymous { ended: true }
    })
}

/// The page's numbers: what `/v1/me/usage` and `/v1/me/decisions` answer, made by the same
/// functions.
async fn view(app: &App, account: &Account) -> Result<PageView, PageError> {
    let usage = UsageBody::of(account, &app.settings, app.clock.now_ms());
    let events = app
        .store
        .ledger_page(&account.id, Page::Before(None), RECENT_DECISIONS)
        .await?;
    let events: Vec<LedgerEventBody> = events.into_iter().map(Into::into).collect();
    Ok(view::page(usage, events))
}

/// The sign-in form; `ended`: the browser's session is no longer valid, and its cookie is
/// replaced (with the `Secure` it was set with, or the browser would keep it).
fn sign_in_form(app: &App, headers: &HeaderMap, ended: bool) -> Result<Response, PageError> {
    let form = SignIn {
        message: ended.then_some("Your session has ended. Sign in again."),
        session_hours: app.settings.usage_page.session_ttl_s.div_ceil(3600),
    };
    let page = html(form.render())?;
    Ok(if ended {
        with_cookie(
            page,
            &ended_cookie(app.settings.usage_page.secure_cookie, headers),
        )
    } else {
        page.into_response()
    })
}

fn html(rendered: Result<String, askama::Error>) -> Result<Html<String>, PageError> {
    rendered.map(Html).map_err(|e| PageError::Internal {
        reason: format!("template: {e}"),
    })
}

/// The session cookie's value, if the browser sent one.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == session::COOKIE)
        .map(|c| c.value().to_owned())
}

/// A cookie that replaces the session's with nothing, at once.
fn ended_cookie(secure_cookie: SecureCookie, headers: &HeaderMap) -> Cookie<'static> {
    Cookie::build((session::COOKIE, ""))
        .path(session::COOKIE_PATH)
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure(secure_cookie, headers))
        .max_age(cookie::time::Duration::ZERO)
        .build()
}

fn with_cookie(response: impl IntoResponse, cookie: &Cookie<'_>) -> Response {
    let mut response = response.into_response();
    match HeaderValue::from_str(&cookie.to_string()) {
        Ok(value) => {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
        // A token is hex and digits: it always makes a valid header.
        Err(_) => tracing::error!("usage page cookie is not a valid header"),
    }
    response
}

/// Whether to mark the cookie `Secure` (see [`SecureCookie`]).
fn secure(setting: SecureCookie, headers: &HeaderMap) -> bool {
    match setting {
        SecureCookie::Always => true,
        SecureCookie::Never => false,
        SecureCookie::Auto => {
            let said = |name: &str, https: fn(&str) -> bool| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(https)
            };
            said("x-forwarded-proto", |v| {
                v.split(',')
                    .next()
                    .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
            }) || said("forwarded", |v| {
                v.split([';', ','])
                    .any(|p| p.trim().eq_ignore_ascii_case("proto=https"))
            })
        }
    }
}

/// The `key` of a URL-encoded sign-in form (a `Bearer ` prefix pasted with it is dropped).
async fn form_key(body: Body) -> Result<String, PageError> {
    let bytes = axum::body::to_bytes(body, SIGN_IN_BYTES_MAX)
        .await
        .map_err(|_| PageError::Invalid {
            field: "body",
            message: format!("the form is larger than {SIGN_IN_BYTES_MAX} bytes"),
        })?;
    let fields: Vec<(String, String)> =
        serde_urlencoded::from_bytes(&bytes).map_err(|e| PageError::Invalid {
            field: "body",
            message: format!("not a URL-encoded form: {e}"),
        })?;
    let key = fields
        .into_iter()
        .find(|(name, _)| name == "key")
        .map(|(_, key)| key)
        .unwrap_or_default();
    let key = key.trim();
    let key = key.strip_prefix("Bearer ").unwrap_or(key).trim();
    if key.is_empty() {
        return Err(PageError::Invalid {
            field: "key",
            message: "enter your API key".to_owned(),
        });
    }
    Ok(key.to_owned())
}
