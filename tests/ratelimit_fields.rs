//! The IETF `RateLimit-Policy` and `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers-11)
//! on real answers of a real gateway, read with an RFC 9651 parser (sfv) as Lists, and held to
//! the numbers the `x-ratelimit-*` headers and the denial body show. Each test runs once per
//! store. The gateway's clock is manual and starts on a minute, so every number is exact.

mod common;

use common::{Harness, StoreKind, header};
use flowgate::clock::Clock;
use serde_json::Value;
use sfv::{BareItem, List, ListEntry, Parser};

store_tests!(
    an_admitted_answer_carries_both_fields,
    a_429_carries_both_fields_as_its_body_explains,
    a_402_carries_the_credits_its_body_states,
);

const MINUTE_MS: i64 = 60_000;

/// A manual clock at the start of the current minute.
fn minute_clock() -> Clock {
    Clock::manual(flowgate::clock::now_ms() / MINUTE_MS * MINUTE_MS)
}

/// One Item of a parsed List: its String name and Integer parameters in order.
#[derive(Debug, PartialEq)]
struct Member {
    name: String,
    params: Vec<(String, i64)>,
}

impl Member {
    fn param(&self, key: &str) -> i64 {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{} has no {key}: {self:?}", self.name))
            .1
    }

    fn keys(&self) -> Vec<&str> {
        self.params.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Every line of the field `name`, combined as RFC 9651 §4.2 says, parsed as a List whose
/// members must be Items with a String and Integer parameters (draft §3, §4).
fn list(r: &reqwest::Response, name: &str) -> Vec<Member> {
    let lines: Vec<&[u8]> = r
        .headers()
        .get_all(name)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    assert!(!lines.is_empty(), "no {name}: {:?}", r.headers());
    let joined = lines.join(&b", "[..]);
    let parsed: List = Parser::new(&joined).parse().unwrap_or_else(|e| {
        panic!(
            "{name} is not a structured-field List ({e}): {}",
            String::from_utf8_lossy(&joined)
        )
    });
    parsed
        .iter()
        .map(|entry| {
            let ListEntry::Item(item) = entry else {
                panic!("{name}: an inner list, not an Item: {entry:?}")
            };
            let BareItem::String(policy) = &item.bare_item else {
                panic!("{name}: the Item is not a String: {item:?}")
            };
            Member {
                name: policy.as_str().to_owned(),
                params: item
                    .params
                    .iter()
                    .map(|(k, v)| match v {
                        BareItem::Integer(i) => (k.as_str().to_owned(), i64::from(*i)),
                        other => panic!("{name}: {k:?} is not an Integer: {other:?}"),
                    })
                    .collect(),
            }
        })
        .collect()
}

fn int(r: &reqwest::Response, name: &str) -> i64 {
    header(r, name)
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `1h2m3s`, `6m0s`, `42s` (an `x-ratelimit-reset-*` value) in seconds.
fn seconds(duration: &str) -> i64 {
    let mut total = 0;
    let mut n = 0;
    for c in duration.chars() {
        match c {
            '0'..='9' => n = n * 10 + i64::from(c as u8 - b'0'),
            'h' => (total, n) = (total + n * 3600, 0),
            'm' => (total, n) = (total + n * 60, 0),
            's' => (total, n) = (total + n, 0),
            _ => panic!("not a duration: {duration}"),
        }
    }
    total
}

/// Each window's policy and service limit agree with its `x-ratelimit-*` headers, and every
/// service limit carries the credits of `x-credits-remaining`.
fn assert_matches_x_ratelimit(r: &reqwest::Response, windows: &[(&str, i64)]) {
    let policy = list(r, "ratelimit-policy");
    let limits = list(r, "ratelimit");
    let names: Vec<&str> = windows.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        policy.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        names
    );
    assert_eq!(
        limits.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        names
    );
    for ((window, length_s), (p, l)) in windows.iter().zip(policy.iter().zip(&limits)) {
        assert_eq!(p.keys(), ["q", "w"], "{window}");
        assert_eq!(p.param("q"), int(r, &format!("x-ratelimit-limit-{window}")));
        assert_eq!(p.param("w"), *length_s, "{window}");
        assert_eq!(l.keys(), ["r", "t", "flowgate-credits"], "{window}");
        assert_eq!(
            l.param("r"),
            int(r, &format!("x-ratelimit-remaining-{window}"))
        );
        let reset = seconds(&header(r, &format!("x-ratelimit-reset-{window}")));
        if l.param("r") < p.param("q") {
            // The effective window ends when units next come back: no later than all of them.
            assert!(0 < l.param("t") && l.param("t") <= reset, "{window}: {l:?}");
        } else {
            // Nothing counted: the whole limit for the window's whole length.
            assert_eq!((l.param("t"), reset), (*length_s, 0), "{window}");
        }
        assert_eq!(
            l.param("flowgate-credits"),
            int(r, "x-credits-remaining"),
            "{window}"
        );
    }
}

const FIVE_HOURS: i64 = 5 * 3600;
const WEEK: i64 = 7 * 24 * 3600;

async fn an_admitted_answer_carries_both_fields(store: StoreKind) {
    let clock = minute_clock();
    let h = Harness::start_with_clock(store, clock.clone(), |c| c).await;
    let r = h.task("sk-alice", 2).await;
    assert_eq!(r.status(), 200);
    assert_matches_x_ratelimit(&r, &[("5h", FIVE_HOURS), ("week", WEEK)]);
    // All usage in one minute: t is x-ratelimit-reset, to the second.
    let limits = list(&r, "ratelimit");
    assert_eq!(limits[0].param("t"), FIVE_HOURS);
    assert_eq!(header(&r, "x-ratelimit-reset-5h"), "5h0m0s");
    assert_eq!(limits[1].param("t"), WEEK);
    assert_eq!(
        header(&r, "ratelimit-policy"),
        r#""5h";q=3;w=18000, "week";q=10;w=604800"#
    );
    assert_eq!(
        header(&r, "ratelimit"),
        r#""5h";r=1;t=18000;flowgate-credits=100, "week";r=8;t=604800;flowgate-credits=100"#
    );
    r.text().await.unwrap();

    // Ten minutes later: the last unit of the 5-hour window and 5 credits. The 5-hour window
    // gives units back when the first minute slides out (4h50m), all of them only at 5h.
    clock.advance_ms(10 * MINUTE_MS);
    let r = h.task("sk-alice", 2).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-flowgate-pools"), "limits=1,credits=1");
    assert_matches_x_ratelimit(&r, &[("5h", FIVE_HOURS), ("week", WEEK)]);
    assert_eq!(header(&r, "x-ratelimit-reset-5h"), "5h0m0s");
    assert_eq!(
        header(&r, "ratelimit"),
        r#""5h";r=0;t=17400;flowgate-credits=95, "week";r=7;t=604200;flowgate-credits=95"#
    );
    // The policies do not move with usage.
    assert_eq!(
        header(&r, "ratelimit-policy"),
        r#""5h";q=3;w=18000, "week";q=10;w=604800"#
    );
}

async fn a_429_carries_both_fields_as_its_body_explains(store: StoreKind) {
    // carol's plan: one 5-hour window of 2, no credits.
    let clock = minute_clock();
    let h = Harness::start_with_clock(store, clock.clone(), |c| c).await;
    assert_eq!(h.task("sk-carol", 1).await.status(), 200);
    clock.advance_ms(10 * MINUTE_MS);
    assert_eq!(h.task("sk-carol", 1).await.status(), 200);
    clock.advance_ms(30_000);
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 429);
    assert_matches_x_ratelimit(&r, &[("5h", FIVE_HOURS)]);
    let policy = list(&r, "ratelimit-policy");
    let limit = &list(&r, "ratelimit")[0];
    let retry_after = int(&r, "retry-after");
    let reset = seconds(&header(&r, "x-ratelimit-reset-5h"));
    let body: Value = r.json().await.unwrap();
    let e = &body["error"];
    let w = &e["layers"][0]["windows"][0];
    assert_eq!(w["name"], "5h");
    assert_eq!(policy[0].param("q"), w["limit"].as_i64().unwrap());
    assert_eq!(limit.param("r"), w["remaining"].as_i64().unwrap());
    assert_eq!(limit.param("r"), 0);
    assert_eq!(
        limit.param("flowgate-credits"),
        e["credits_available"].as_i64().unwrap()
    );
    // The first unit comes back when the first minute slides out, 4h49m30s from now: that is
    // when the request fits (Retry-After, not before the end of the effective window, draft
    // §6); all of the window is free again 10 minutes later (the body's reset_at).
    let t = limit.param("t");
    assert_eq!(t, FIVE_HOURS - 10 * 60 - 30);
    assert_eq!(t, retry_after);
    assert_eq!(t, e["retry_after_seconds"].as_i64().unwrap());
    assert_eq!(reset, FIVE_HOURS - 30);
    let reset_at = chrono::DateTime::parse_from_rfc3339(w["reset_at"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    assert_eq!((reset_at - clock.now_ms()) / 1000, reset);
}

async fn a_402_carries_the_credits_its_body_states(store: StoreKind) {
    // dave: 3 units of window and 12 credits (2 units at 5): 6 units is one too many.
    let h = Harness::start_with_clock(store, minute_clock(), |c| c).await;
    let r = h.task("sk-dave", 6).await;
    assert_eq!(r.status(), 402);
    assert_matches_x_ratelimit(&r, &[("5h", FIVE_HOURS), ("week", WEEK)]);
    // Nothing was held: the whole limit, for the window's whole length.
    assert_eq!(
        header(&r, "ratelimit"),
        r#""5h";r=3;t=18000;flowgate-credits=12, "week";r=10;t=604800;flowgate-credits=12"#
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["credits_available"], 12);
}
