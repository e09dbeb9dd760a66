//! The usage page (`/usage`) in a real headless Chromium against a real gateway, backend and
//! store: it shows the numbers `/v1/me/usage` shows, its script updates them after a request
//! without a reload, it explains a denial, and the key is never in a URL. Its sessions are
//! checked over plain HTTP too (cookie attributes, tampering, expiry, revocation), and its
//! screenshots at phone and desktop sizes are kept in the target directory.

mod common;

use std::path::PathBuf;

use common::api::with_admin;
use common::browser::Browser;
use common::process::ChildGateway;
use common::{Harness, PgDatabase, StoreKind};
use flowgate::clock::Clock;
use flowgate::demo::backend::MockBackend;
use reqwest::Method;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

store_tests!(
    the_page_shows_the_apis_numbers_and_follows_requests,
    sessions_are_signed_cookies_that_end_with_their_key_or_time,
    a_trusted_header_identifies_the_page_as_it_does_the_api,
    a_configured_secret_keeps_sessions_across_processes_and_out_of_the_logs,
);

/// The test config with an admin token, and a page that refreshes every second (the default
/// is 5 s: the tests would only wait longer).
fn refreshing_every_second(config: String) -> String {
    format!(
        "{}\n[usage_page]\nrefresh_interval_s = 1\n",
        with_admin(config)
    )
}

/// Reads the page's numbers from its DOM, in the shape of `/v1/me/usage`'s.
const READ_NUMBERS: &str = r#"(() => {
  const num = (el, field) => Number(el.querySelector(`[data-field="${field}"]`).textContent);
  const windows = {};
  document.querySelectorAll('[data-window]').forEach(w => {
    windows[w.dataset.window] = {
      used: num(w, 'used'), remaining: num(w, 'remaining'), limit: num(w, 'limit'),
      reset_at: w.querySelector('time[data-countdown]').getAttribute('datetime'),
    };
  });
  const pools = {};
  document.querySelectorAll('[data-pool]').forEach(p => { pools[p.dataset.pool] = num(p, 'credits'); });
  const grants = {};
  document.querySelectorAll('[data-grant]').forEach(g => { grants[g.dataset.grant] = num(g, 'balance'); });
  return { windows, pools, grants };
})()"#;

/// The same numbers from the API's answer.
fn api_numbers(usage: &Value) -> Value {
    let mut windows = serde_json::Map::new();
    for layer in usage["layers"].as_array().unwrap() {
        for w in layer["windows"].as_array().into_iter().flatten() {
            windows.insert(
                w["name"].as_str().unwrap().to_owned(),
                json!({ "used": w["used"], "remaining": w["remaining"], "limit": w["limit"], "reset_at": w["reset_at"] }),
            );
        }
    }
    let mut grants = serde_json::Map::new();
    for g in usage["grants"].as_array().unwrap() {
        grants.insert(g["id"].to_string(), g["balance"].clone());
    }
    json!({ "windows": windows, "pools": usage["pools"], "grants": grants })
}

/// The page shows the API's windows and grants, and each pool it shows at the API's number:
/// those of the plan's layers (alice's plan has no enterprise pool, empty, not shown).
fn assert_same(page: &Value, api: &Value) {
    assert_eq!(
        page["windows"], api["windows"],
        "windows as /v1/me/usage shows them"
    );
    assert_eq!(
        page["grants"], api["grants"],
        "grants as /v1/me/usage shows them"
    );
    let pools = page["pools"].as_object().unwrap();
    assert!(
        pools.contains_key("credits") && pools.contains_key("promotion"),
        "{pools:?}"
    );
    assert!(!pools.contains_key("enterprise"), "{pools:?}");
    for (pool, credits) in pools {
        assert_eq!(credits, &api["pools"][pool], "pool {pool}");
    }
}

async fn my_usage(h: &Harness, key: &str) -> Value {
    h.get_as("/v1/me/usage", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Signs in as the browser's user would: types the key into the form and presses the button.
async fn sign_in(browser: &mut Browser, base: &str, key: &str) {
    browser.goto(&format!("{base}/usage")).await;
    browser
        .wait_for("document.querySelector('form[action=\"/usage/session\"] input[name=key]')")
        .await;
    browser
        .eval(&format!(
            "document.getElementById('key').value = {}; document.querySelector('form[action=\"/usage/session\"] button').click(); true",
            json!(key)
        ))
        .await;
    browser
        .wait_for("location.pathname === '/usage' && document.getElementById('live') && document.readyState === 'complete'")
        .await;
}

async fn the_page_shows_the_apis_numbers_and_follows_requests(store: StoreKind) {
    let h = Harness::start_with(store, refreshing_every_second).await;
    // A promotion that expires, so that the page has one to show.
    let r = h
        .admin(Method::POST, "/admin/v1/accounts/alice/grants")
        .header("idempotency-key", "promo-1")
        .json(&json!({ "kind": "promotion", "amount": 30, "expires_at": "2099-01-01T00:00:00Z" }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    h.task("sk-alice", 2).await.text().await.unwrap();

    let mut browser = Browser::launch().await;
    sign_in(&mut browser, &h.base, "sk-alice").await;
    assert_eq!(
        browser
            .eval("document.querySelector('[data-field=account]').textContent")
            .await,
        "alice"
    );

    // The numbers are the API's.
    let page = browser.eval(READ_NUMBERS).await;
    let api = api_numbers(&my_usage(&h, "sk-alice").await);
    assert_same(&page, &api);
    assert_eq!(page["windows"]["5h"]["used"], 2);
    assert_eq!(page["pools"]["promotion"], 30);
    let text = browser.eval("document.body.innerText").await;
    let text = text.as_str().unwrap();
    assert!(
        text.contains("promotion #"),
        "the promotion is listed: {text}"
    );
    assert!(
        browser
            .eval("document.querySelectorAll('time[data-countdown]').length")
            .await
            .as_u64()
            >= Some(3),
        "a reset clock for each window and the promotion's expiry"
    );
    // The reset clocks count down by themselves.
    let clock = "document.querySelector('[data-window=\"5h\"] time[data-countdown]').textContent";
    let first = browser.eval(clock).await;
    let first = first.as_str().unwrap();
    assert!(first.starts_with("in 4h 5") || first == "in 5h", "{first}");

    assert_eq!(
        browser
            .eval("document.getElementById('live').dataset.refreshMs")
            .await,
        "1000",
        "the configured refresh interval reaches the script"
    );
    // A request through the gateway: the open page follows without a reload.
    browser.eval("window.__notReloaded = true").await;
    let r = h.task("sk-alice", 1).await;
    assert_eq!(r.status(), 200);
    let allowed = common::header(&r, "x-flowgate-decision-id");
    r.text().await.unwrap();
    browser
        .wait_for(
            "document.querySelector('[data-window=\"5h\"] [data-field=used]').textContent === '3'",
        )
        .await;
    assert_eq!(
        browser.eval("window.__notReloaded === true").await,
        true,
        "updated in place"
    );
    assert!(
        browser
            .eval("Number(document.getElementById('live').dataset.refreshes)")
            .await
            .as_u64()
            >= Some(1)
    );
    h.settle_ledger().await;
    let page = browser.eval(READ_NUMBERS).await;
    assert_same(&page, &api_numbers(&my_usage(&h, "sk-alice").await));

    // A denial: the 5-hour window is full, and 50 units cost more credits than alice has.
    let r = h.task("sk-alice", 50).await;
    assert_eq!(r.status(), 402);
    let denied = common::header(&r, "x-flowgate-decision-id");
    r.text().await.unwrap();
    h.settle_ledger().await;
    let denied_li = format!("document.querySelector('[data-decision=\"{denied}\"]')");
    browser.wait_for(&denied_li).await;
    let reason = browser.eval(&format!("{denied_li}.innerText")).await;
    let reason = reason.as_str().unwrap();
    let decisions: Value = h
        .get_as("/v1/me/decisions", "sk-alice")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let denial = &decisions["events"][0]["usage_event"]["decision"]["denial"];
    assert_eq!(denial["reason"], "insufficient_credits");
    assert!(reason.contains("Not enough credits"), "{reason}");
    assert!(
        reason.contains(&format!(
            "the {} credits you have; they would need {} more credits",
            denial["available_credits"], denial["needed_credits"]
        )),
        "the API's numbers explain it: {reason}"
    );
    assert_eq!(
        browser.eval(&format!("{denied_li}.dataset.outcome")).await,
        "denied"
    );
    // The allowed one says which pool paid.
    let paid = browser
        .eval(&format!(
            "document.querySelector('[data-decision=\"{allowed}\"] ul.paid').innerText"
        ))
        .await;
    assert!(paid.as_str().unwrap().contains("limits: 1 unit"), "{paid}");

    // The session cookie is out of the script's reach, strict and scoped to the page.
    assert_eq!(
        browser
            .eval("document.cookie.includes('flowgate_usage')")
            .await,
        false
    );
    let cookies = browser
        .call(
            "Network.getCookies",
            json!({ "urls": [format!("{}/usage", h.base)] }),
        )
        .await;
    let cookie = cookies["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "flowgate_usage")
        .expect("the session cookie");
    assert_eq!(cookie["httpOnly"], true);
    assert_eq!(cookie["sameSite"], "Strict");
    assert_eq!(cookie["path"], "/usage");
    assert!(!cookie["value"].as_str().unwrap().contains("sk-alice"));

    // Sign out: the form again, and the refresh is refused.
    browser
        .eval("document.querySelector('form[action=\"/usage/sign-out\"] button').click(); true")
        .await;
    browser
        .wait_for("document.querySelector('form[action=\"/usage/session\"]') && document.readyState === 'complete'")
        .await;
    assert_eq!(
        browser
            .eval("fetch('/usage/live').then(r => r.status)")
            .await,
        401
    );

    // The key was never in any address the browser asked for.
    let urls = browser.requested_urls().await;
    assert!(
        urls.iter().any(|u| u.ends_with("/usage/session")),
        "{urls:?}"
    );
    assert!(
        urls.iter().any(|u| u.ends_with("/usage/live")),
        "the script refreshed: {urls:?}"
    );
    for url in &urls {
        assert!(!url.contains("sk-alice"), "the key is in a URL: {url}");
    }
    browser.close().await;
}

/// Posts the sign-in form as a browser would.
async fn post_sign_in(h: &Harness, body: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/usage/session", h.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// The `name=value` of a Set-Cookie header.
fn cookie_pair(r: &reqwest::Response) -> String {
    let set = r
        .headers()
        .get(SET_COOKIE)
        .expect("a cookie")
        .to_str()
        .unwrap();
    set.split(';').next().unwrap().to_owned()
}

async fn page(h: &Harness, path: &str, cookie: &str) -> reqwest::Response {
    h.http
        .get(format!("{}{path}", h.base))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap()
}

async fn sessions_are_signed_cookies_that_end_with_their_key_or_time(store: StoreKind) {
    let clock = Clock::manual(flowgate::clock::now_ms());
    let h = Harness::start_with_clock(store, clock.clone(), with_admin).await;

    // A good key: 303 to the page, with the session cookie (not Secure over plain HTTP).
    let r = post_sign_in(&h, "key=sk-alice").await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[LOCATION], "/usage");
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/usage",
        "Max-Age=43200",
    ] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    assert!(!set.contains("Secure"), "{set}");
    assert!(!set.contains("sk-alice"), "{set}");
    let cookie = cookie_pair(&r);
    let r = page(&h, "/usage", &cookie).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let html = r.text().await.unwrap();
    assert!(html.contains(r#"data-field="account">alice<"#), "{html}");
    assert_eq!(page(&h, "/usage/live", &cookie).await.status(), 200);

    // Behind a TLS proxy the cookie is Secure; a pasted "Bearer " is fine.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/usage/session", h.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body("key=Bearer+sk-alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()[SET_COOKIE].to_str().unwrap().contains("Secure"));

    // Wrong or missing keys, another site's form: the form again with the reason, no cookie.
    for (body, status, says) in [
        ("key=sk-nobody", 401, "not valid"),
        ("key=", 400, "key: enter your API key"),
        ("other=1", 400, "key: enter your API key"),
    ] {
        let r = post_sign_in(&h, body).await;
        assert_eq!(r.status(), status, "{body}");
        assert!(r.headers().get(SET_COOKIE).is_none(), "{body}");
        let html = r.text().await.unwrap();
        assert!(html.contains(says), "{body}: {html}");
        assert!(
            html.contains(r#"action="/usage/session""#),
            "the form is offered again"
        );
    }
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/usage/session", h.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "cross-site")
        .body("key=sk-alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get(SET_COOKIE).is_none());
    let r = post_sign_in(&h, &format!("key={}", "k".repeat(5000))).await;
    assert_eq!(r.status(), 400, "a form over the bound");

    // A changed token is no session: the form, and the cookie is cleared.
    let forged = cookie.replace(&hex::encode("alice"), &hex::encode("dave"));
    assert_ne!(forged, cookie);
    for bad in [forged.as_str(), "flowgate_usage=garbage", ""] {
        let r = page(&h, "/usage", bad).await;
        assert_eq!(r.status(), 200, "{bad}");
        let cleared = r
            .headers()
            .get(SET_COOKIE)
            .map(|v| v.to_str().unwrap().to_owned());
        let html = r.text().await.unwrap();
        assert!(html.contains(r#"action="/usage/session""#), "{bad}: {html}");
        assert!(!html.contains("data-field=\"account\""), "{bad}");
        if !bad.is_empty() {
            assert!(cleared.unwrap().contains("Max-Age=0"), "{bad}");
        }
        assert_eq!(page(&h, "/usage/live", bad).await.status(), 401, "{bad}");
    }

    // Time: the session ends after session_ttl_s.
    clock.advance_ms(43_200 * 1000 - 1000);
    assert_eq!(page(&h, "/usage/live", &cookie).await.status(), 200);
    clock.advance_ms(1000);
    assert_eq!(
        page(&h, "/usage/live", &cookie).await.status(),
        401,
        "expired"
    );

    // Revocation: a session made with a key ends when the key is revoked, not before.
    let r = h
        .admin(Method::POST, "/admin/v1/accounts/dave/api-keys")
        .send()
        .await
        .unwrap();
    let made: Value = r.json().await.unwrap();
    let (key, prefix) = (
        made["api_key"].as_str().unwrap(),
        made["prefix"].as_str().unwrap(),
    );
    let dave_cookie = cookie_pair(&post_sign_in(&h, &format!("key={key}")).await);
    let old_cookie = cookie_pair(&post_sign_in(&h, "key=sk-dave").await);
    assert_eq!(page(&h, "/usage/live", &dave_cookie).await.status(), 200);
    let r = h
        .admin(
            Method::DELETE,
            &format!("/admin/v1/accounts/dave/api-keys/{prefix}"),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(
        page(&h, "/usage/live", &dave_cookie).await.status(),
        401,
        "revoked"
    );
    assert_eq!(
        page(&h, "/usage/live", &old_cookie).await.status(),
        200,
        "the account's other key still signs its own session"
    );

    // Signing out clears the cookie.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/usage/sign-out", h.base))
        .header(COOKIE, &old_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(
        r.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

async fn a_trusted_header_identifies_the_page_as_it_does_the_api(store: StoreKind) {
    let h = Harness::start_with(store, |c| {
        c.replace(
            "[identity]\nmode = \"api_key\"",
            "[identity]\nmode = \"trusted_header\"\nheader = \"x-account\"",
        )
    })
    .await;
    // carol's plan allows 2 units per 5 hours and nothing after: the third is refused.
    for (units, status) in [(1, 200), (1, 200), (1, 429)] {
        let r = h
            .post("/v1/tasks", "")
            .header("x-account", "carol")
            .header("x-units", units)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        r.text().await.unwrap();
    }
    h.settle_ledger().await;
    let get = |path: &str| h.http.get(format!("{}{path}", h.base));
    let api: Value = get("/v1/me/usage")
        .header("x-account", "carol")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = get("/usage")
        .header("x-account", "carol")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains(r#"data-field="account">carol<"#));
    let window = &api["layers"][0]["windows"][0];
    assert!(html.contains(&format!(
        r#"<span class="num" data-field="remaining">{}</span> of <span class="num" data-field="limit">{}</span>"#,
        window["remaining"], window["limit"]
    )));
    assert!(!html.contains("/usage/sign-out"), "nothing to sign out of");
    // The refusal, explained: which limit, and when more is allowed.
    assert!(
        html.contains("Usage limit reached: your limits are used up and no pool after them could pay. More is allowed in ")
            && (html.contains("allowed in 4h") || html.contains("allowed in 5h")),
        "{html}"
    );
    assert!(html.contains(r#"data-outcome="denied""#) && html.contains("limits: 1 unit"));
    let r = get("/usage").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.text().await.unwrap().contains("x-account"),
        "names the header"
    );
    let r = get("/usage/live")
        .header("x-account", "nobody")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Where screenshots are written: the target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Decodes a PNG and checks it is `width`×`height` and shows something (many colours, not
/// one flat fill).
fn check_png(bytes: &[u8], width: u32, height: u32) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut pixels).expect("a frame");
    assert_eq!((info.width, info.height), (width, height));
    let channels = info.color_type.samples();
    let colours: std::collections::BTreeSet<&[u8]> =
        pixels[..info.buffer_size()].chunks(channels).collect();
    assert!(
        colours.len() > 50,
        "a near-blank screenshot: {} colours",
        colours.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots_at_phone_and_desktop_sizes() {
    let h = Harness::start_with(StoreKind::Sqlite, refreshing_every_second).await;
    // A promotion ending in three weeks, as a real one would.
    let expires_at = flowgate::clock::rfc3339(flowgate::clock::now_ms() + 21 * 86_400_000);
    let r = h
        .admin(Method::POST, "/admin/v1/accounts/alice/grants")
        .header("idempotency-key", "welcome")
        .json(&json!({ "kind": "promotion", "amount": 25, "expires_at": expires_at }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    for units in [2, 1, 4, 60] {
        h.task("sk-alice", units).await.text().await.unwrap();
    }
    h.settle_ledger().await;
    let mut browser = Browser::launch().await;
    sign_in(&mut browser, &h.base, "sk-alice").await;
    browser
        .wait_for("document.querySelectorAll('[data-decision]').length === 4")
        .await;
    let dir = target_dir();
    std::fs::create_dir_all(&dir).expect("target dir");
    for (name, width, height, mobile) in [("phone", 375, 812, true), ("desktop", 1280, 800, false)]
    {
        let png = browser.screenshot(width, height, mobile).await;
        check_png(&png, width, height);
        // Readable at its width: nothing wider than the screen.
        let overflow = browser
            .eval("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            .await;
        assert_eq!(overflow, 0, "{name}: the page is wider than the screen");
        let path = dir.join(format!("usage-page-{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
    }
    browser.close().await;
}

/// `flowgate serve` itself, with `session_secret_file`: a session made by one process is
/// accepted by the next (SQLite: after a restart) or by another replica (PostgreSQL), and
/// neither the key nor the cookie is ever in the log.
async fn a_configured_secret_keeps_sessions_across_processes_and_out_of_the_logs(store: StoreKind) {
    let backend = MockBackend::start().await.expect("backend");
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = match store {
        StoreKind::Sqlite => None,
        StoreKind::Postgres => Some(PgDatabase::create().await),
    };
    let store_url = match &pg {
        None => format!("sqlite://{}", dir.path().join("ledger.db").display()),
        Some(db) => db.url.clone(),
    };
    let secret = dir.path().join("usage-secret");
    std::fs::write(&secret, "4f2c6a1e9b7d30585e1a2c4b6d8f0e1a3c5b7d9f\n").expect("secret");
    let config = format!(
        "{}\n[usage_page]\nsession_secret_file = {:?}\n",
        common::CONFIG
            .replace("127.0.0.1:0", "__LISTEN__")
            .replace("__STORE__", &store_url)
            .replace("__BACKEND__", &backend.url()),
        secret.display().to_string()
    );
    let mut first = ChildGateway::start(dir.path(), "first", &config).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .post(format!("{}/usage/session", first.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("key=sk-alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = cookie_pair(&r);
    let live = |base: &str| {
        http.get(format!("{base}/usage/live"))
            .header(COOKIE, &cookie)
            .send()
    };
    assert_eq!(live(&first.base).await.unwrap().status(), 200);
    let r = http
        .post(format!("{}/usage/session", first.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("key=sk-wrong-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let second = match store {
        // One process at a time on a SQLite file: the next one, after a restart.
        StoreKind::Sqlite => {
            assert!(first.terminate().await.success());
            ChildGateway::start(dir.path(), "second", &config).await
        }
        // Another replica on the same database, beside the first.
        StoreKind::Postgres => ChildGateway::start(dir.path(), "second", &config).await,
    };
    let r = live(&second.base).await.unwrap();
    assert_eq!(r.status(), 200, "the other process accepts the session");
    assert!(r.text().await.unwrap().contains("data-window=\"5h\""));

    let token = cookie.split_once('=').unwrap().1.to_owned();
    for log in [first.log(), second.log()] {
        assert!(!log.is_empty(), "the processes log");
        for secret in ["sk-alice", "sk-wrong-key", token.as_str()] {
            assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
        }
    }
    drop(second);
    drop(first);
    drop(pg);
}
