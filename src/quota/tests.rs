//! The headers of a snapshot, written and then read back with an RFC 9651 parser.

use chrono::{TimeZone, Utc};
use sfv::{BareItem, List, ListEntry, Parser};

use super::*;
use crate::waterfall::{FeatureSet, Grant, GrantKind, Layer, PriceTable, Units, decide, reserve};

const TASK: FeatureId = FeatureId(0);
const VIDEO: FeatureId = FeatureId(1);
const MIN: Millis = MINUTE_MS;

/// 2026-11-23 10:00:00 UTC: the start of a minute.
fn t0() -> Millis {
    Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0)
        .single()
        .map(|t| t.timestamp_millis())
        .expect("valid instant")
}

fn window(name: &str, minutes: u32, limit: Units) -> Window {
    Window::rolling(name, minutes, limit)
}

/// Tasks: a `5h` window of 3 and a `week` window of 10, then credits. Videos: credits only.
fn plan() -> Plan {
    Plan {
        name: "pro".into(),
        layers: vec![
            Layer {
                name: "limits".into(),
                features: FeatureSet::EMPTY.with(TASK),
                kind: LayerKind::UsageLimit {
                    windows: vec![window("5h", 300, 3), window("week", 7 * 24 * 60, 10)],
                },
            },
            Layer {
                name: "credits".into(),
                features: FeatureSet::ALL,
                kind: LayerKind::Credits,
            },
        ],
        prices: vec![PriceTable::flat("v1", vec![Some(5), Some(2)])],
        strict: false,
    }
}

fn state(plan: &Plan, credits: u64) -> AccountState {
    let grant = Grant {
        id: 1,
        kind: GrantKind::Credits,
        balance: credits,
        unsettled: 0,
        version: 0,
        expires_at: crate::waterfall::NEVER,
        priority: 0,
        features: FeatureSet::ALL,
    };
    AccountState::new(plan, vec![grant], t0())
}

fn take(plan: &Plan, state: &mut AccountState, units: Units, now: Millis) {
    let d = decide(plan, state, TASK, units, now);
    assert!(d.admitted(), "{units} at {now}: {:?}", d.denial);
    reserve(plan, state, &d, now);
}

fn headers(plan: &Plan, state: &AccountState, feature: FeatureId, now: Millis) -> HeaderMap {
    let mut h = HeaderMap::new();
    Quota::snapshot(plan, state, feature, now).apply(&mut h, &HeaderNames::new([plan]));
    h
}

fn get<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} in {h:?}"))
        .to_str()
        .expect("text")
}

/// Every line of the field `name`, combined as RFC 9651 §4.2 says, parsed as a List.
fn list(h: &HeaderMap, name: &str) -> List {
    let lines: Vec<&[u8]> = h.get_all(name).iter().map(|v| v.as_bytes()).collect();
    assert!(!lines.is_empty(), "no {name} in {h:?}");
    Parser::new(&lines.join(&b", "[..]))
        .parse::<List>()
        .unwrap_or_else(|e| panic!("{name} is not an sf-list: {e}: {lines:?}"))
}

/// A List's members as (String value, [(parameter, Integer)]); panics on anything else.
fn members(list: &List) -> Vec<(String, Vec<(String, i64)>)> {
    list.iter()
        .map(|entry| {
            let ListEntry::Item(item) = entry else {
                panic!("an inner list: {entry:?}")
            };
            let BareItem::String(name) = &item.bare_item else {
                panic!("not a String: {item:?}")
            };
            let params = item
                .params
                .iter()
                .map(|(k, v)| match v {
                    BareItem::Integer(i) => (k.as_str().to_owned(), i64::from(*i)),
                    other => panic!("{k:?} is not an Integer: {other:?}"),
                })
                .collect();
            (name.as_str().to_owned(), params)
        })
        .collect()
}

fn params(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[test]
fn two_windows_and_credits_in_both_header_families() {
    let plan = plan();
    let mut s = state(&plan, 100);
    take(&plan, &mut s, 1, t0());
    let h = headers(&plan, &s, TASK, t0());

    assert_eq!(get(&h, "x-ratelimit-limit-5h"), "3");
    assert_eq!(get(&h, "x-ratelimit-remaining-5h"), "2");
    assert_eq!(get(&h, "x-ratelimit-reset-5h"), "5h0m0s");
    assert_eq!(get(&h, "x-ratelimit-limit-week"), "10");
    assert_eq!(get(&h, "x-ratelimit-remaining-week"), "9");
    assert_eq!(get(&h, "x-ratelimit-reset-week"), "168h0m0s");
    assert_eq!(get(&h, "x-credits-remaining"), "100");
    assert_eq!(
        get(&h, "ratelimit-policy"),
        r#""5h";q=3;w=18000, "week";q=10;w=604800"#
    );
    assert_eq!(
        get(&h, "ratelimit"),
        r#""5h";r=2;t=18000;flowgate-credits=100, "week";r=9;t=604800;flowgate-credits=100"#
    );

    assert_eq!(
        members(&list(&h, "ratelimit-policy")),
        vec![
            ("5h".to_owned(), params(&[("q", 3), ("w", 18_000)])),
            ("week".to_owned(), params(&[("q", 10), ("w", 604_800)])),
        ]
    );
    assert_eq!(
        members(&list(&h, "ratelimit")),
        vec![
            (
                "5h".to_owned(),
                params(&[("r", 2), ("t", 18_000), ("flowgate-credits", 100)])
            ),
            (
                "week".to_owned(),
                params(&[("r", 9), ("t", 604_800), ("flowgate-credits", 100)])
            ),
        ]
    );
}

#[test]
fn t_is_when_a_rolling_window_next_gives_units_back_reset_when_it_gives_all() {
    let plan = plan();
    let mut s = state(&plan, 100);
    take(&plan, &mut s, 1, t0());
    take(&plan, &mut s, 1, t0() + 10 * MIN);
    // 20 minutes and 30 seconds in: 1 of 3 left in the 5-hour window. The first unit slides
    // out at 5h, the second at 5h10m.
    let now = t0() + 20 * MIN + 30_000;
    let h = headers(&plan, &s, TASK, now);
    assert_eq!(get(&h, "x-ratelimit-remaining-5h"), "1");
    assert_eq!(get(&h, "x-ratelimit-reset-5h"), "4h49m30s");
    let limits = members(&list(&h, "ratelimit"));
    assert_eq!(
        limits[0],
        (
            "5h".to_owned(),
            params(&[
                ("r", 1),
                ("t", (5 * 3600 - 20 * 60 - 30)),
                ("flowgate-credits", 100)
            ])
        )
    );
    // The policy does not move with usage.
    assert_eq!(
        get(&h, "ratelimit-policy"),
        r#""5h";q=3;w=18000, "week";q=10;w=604800"#
    );
}

#[test]
fn an_exhausted_window_says_when_the_first_unit_comes_back_as_retry_after_does() {
    let plan = plan();
    let mut s = state(&plan, 0);
    take(&plan, &mut s, 2, t0());
    take(&plan, &mut s, 1, t0() + 30 * MIN);
    let now = t0() + 60 * MIN;
    let d = decide(&plan, &s, TASK, 1, now);
    let Some(crate::waterfall::Denial::UsageLimitReached { retry_at }) = d.denial else {
        panic!("denied for the window: {:?}", d.denial)
    };
    let h = headers(&plan, &s, TASK, now);
    let limits = members(&list(&h, "ratelimit"));
    assert_eq!(limits[0].1[0], ("r".to_owned(), 0));
    let t = limits[0].1[1].1;
    assert_eq!(
        t,
        4 * 3600,
        "the two units of the first minute slide out at 5h"
    );
    // Retry-After (the request's unit fits) is not before the end of the effective window
    // (draft §6).
    assert_eq!(seconds_until(retry_at, now), t as u64);
    assert_eq!(get(&h, "x-ratelimit-reset-5h"), "4h30m0s");
}

#[test]
fn an_unused_window_offers_its_whole_limit_for_its_whole_length() {
    let plan = plan();
    let s = state(&plan, 7);
    let h = headers(&plan, &s, TASK, t0() + 12_345);
    assert_eq!(get(&h, "x-ratelimit-reset-5h"), "0s");
    assert_eq!(
        get(&h, "ratelimit"),
        r#""5h";r=3;t=18000;flowgate-credits=7, "week";r=10;t=604800;flowgate-credits=7"#
    );
}

#[test]
fn a_feature_without_windows_has_no_ietf_fields_but_its_credits() {
    let plan = plan();
    let s = state(&plan, 40);
    let h = headers(&plan, &s, VIDEO, t0());
    assert_eq!(get(&h, "x-credits-remaining"), "40");
    assert!(h.get("ratelimit").is_none());
    assert!(h.get("ratelimit-policy").is_none());
    assert!(h.keys().all(|k| !k.as_str().starts_with("x-ratelimit-")));
}

#[test]
fn numbers_past_fifteen_digits_are_the_largest_sf_integer() {
    let mut plan = plan();
    plan.layers[0].kind = LayerKind::UsageLimit {
        windows: vec![window("huge", 60, u64::MAX)],
    };
    let s = state(&plan, 10u64.pow(18));
    let h = headers(&plan, &s, TASK, t0());
    assert_eq!(get(&h, "x-credits-remaining"), "1000000000000000000");
    let max = SF_INTEGER_MAX as i64;
    assert_eq!(
        members(&list(&h, "ratelimit-policy")),
        vec![("huge".to_owned(), params(&[("q", max), ("w", 3600)]))]
    );
    assert_eq!(
        members(&list(&h, "ratelimit")),
        vec![(
            "huge".to_owned(),
            params(&[("r", max), ("t", 3600), ("flowgate-credits", max)])
        )]
    );
}

#[test]
fn policy_names_keep_their_case_header_names_are_lower_case() {
    let mut plan = plan();
    plan.layers[0].kind = LayerKind::UsageLimit {
        windows: vec![window("Daily_Max", 24 * 60, 5)],
    };
    let s = state(&plan, 0);
    let h = headers(&plan, &s, TASK, t0());
    assert_eq!(get(&h, "x-ratelimit-limit-daily_max"), "5");
    assert_eq!(members(&list(&h, "ratelimit"))[0].0, "Daily_Max");
}

#[test]
fn an_upstreams_own_ratelimit_fields_pass_through_beside_the_gateways() {
    let plan = plan();
    let s = state(&plan, 1);
    let mut h = HeaderMap::new();
    h.insert(
        "ratelimit",
        HeaderValue::from_static(r#""upstream";r=50;t=30"#),
    );
    h.insert(
        "ratelimit-policy",
        HeaderValue::from_static(r#""upstream";q=100;w=60"#),
    );
    Quota::snapshot(&plan, &s, TASK, t0()).apply(&mut h, &HeaderNames::new([&plan]));
    let names = |field: &str| -> Vec<String> {
        members(&list(&h, field))
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    assert_eq!(names("ratelimit"), ["upstream", "5h", "week"]);
    assert_eq!(names("ratelimit-policy"), ["upstream", "5h", "week"]);
}

#[test]
fn a_window_unknown_at_start_up_still_gets_its_headers() {
    let plan = plan();
    let s = state(&plan, 3);
    let mut h = HeaderMap::new();
    Quota::snapshot(&plan, &s, TASK, t0()).apply(&mut h, &HeaderNames::default());
    assert_eq!(get(&h, "x-ratelimit-limit-week"), "10");
    assert_eq!(members(&list(&h, "ratelimit-policy")).len(), 2);
}

#[test]
fn sf_strings_are_quoted_escaped_and_printable_ascii_only() {
    assert_eq!(sf_string("5h").as_deref(), Some(r#""5h""#));
    assert_eq!(sf_string(r#"a"b\c"#).as_deref(), Some(r#""a\"b\\c""#));
    assert_eq!(sf_string("wöche"), None);
    assert_eq!(sf_string("tab\t"), None);
    // What the parser reads back is the name.
    let s = sf_string(r#"a"b\c d"#).expect("printable");
    let item: sfv::Item = Parser::new(&*s).parse().expect("an sf-string");
    assert_eq!(
        item.bare_item,
        BareItem::String(sfv::String::from_string(r#"a"b\c d"#.to_owned()).expect("valid"))
    );
}

#[test]
fn the_parameter_keys_are_sf_keys() {
    for key in ["q", "w", "r", "t", CREDITS_PARAM] {
        sfv::KeyRef::from_str(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
}

#[test]
fn a_calendar_window_offers_its_limit_until_the_period_ends() {
    use crate::waterfall::{Period, Tz};
    let mut plan = plan();
    plan.layers[0].kind = LayerKind::UsageLimit {
        windows: vec![Window::calendar("day", Period::Day, Tz::UTC, 4)],
    };
    let mut s = state(&plan, 0);
    let ten_pm = t0() + 12 * 3_600_000; // 22:00 UTC
    let h = headers(&plan, &s, TASK, ten_pm);
    assert_eq!(
        members(&list(&h, "ratelimit-policy")),
        [("day".to_owned(), params(&[("q", 4), ("w", 86_400)]))]
    );
    assert_eq!(
        members(&list(&h, "ratelimit")),
        [(
            "day".to_owned(),
            params(&[("r", 4), ("t", 7_200), ("flowgate-credits", 0)])
        )]
    );
    // Used: everything comes back at midnight, in two hours still.
    take(&plan, &mut s, 3, ten_pm);
    let h = headers(&plan, &s, TASK, ten_pm + 1_800_000);
    assert_eq!(
        members(&list(&h, "ratelimit")),
        [(
            "day".to_owned(),
            params(&[("r", 1), ("t", 5_400), ("flowgate-credits", 0)])
        )]
    );
}
