//! The checker fed rows by hand, in the store's order: how a charge's rows are grouped, and
//! what it keeps between rows.

use super::*;
use crate::reconcile::rows::{BalanceUpdate, ChargeUpdate, Grant, PriceTable};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[identity]
mode = "api_key"
[store]
url = "sqlite://unused.db"
[upstreams.up]
url = "http://127.0.0.1:9"
[[routes]]
method = "POST"
path = "/t"
feature = "task"
upstream = "up"
cost = { header = "x-units" }
[plans.p]
price_version = "v1"
prices = { task = 5 }
[[plans.p.layers]]
kind = "credits"
"#;

/// Two units at 5 credits, from grant 1.
const DRAWS: &str = r#"[{"layer":0,"pool":"grant","grant_id":1,"units":2,"credits":10}]"#;

fn checker() -> Checker {
    Checker::new(&Settings::parse(CONFIG).expect("test config"))
}

fn usage(id: i64) -> ChargedUsage<'static> {
    ChargedUsage {
        id,
        decision_id: "dec",
        account_id: "alice",
        feature: "task",
        units: 2,
    }
}

/// A clean charge of 2 units, 10 credits, for usage event `usage_event_id`.
fn monetization(id: i64, usage_event_id: i64) -> Monetization<'static> {
    Monetization {
        id,
        usage_event_id,
        account_id: "alice",
        feature: "task",
        units: 2,
        forgiven_units: 0,
        credits: 10,
        postpaid_credits: 0,
        credits_per_unit: 5,
        plan: "p",
        price_version: "v1",
        draws: DRAWS,
        refunded_at: None,
        model: None,
        dimensions: None,
    }
}

fn update(id: i64, reason: &'static str, delta: i64) -> ChargeUpdate<'static> {
    ChargeUpdate {
        id,
        reason,
        delta,
        forgiven: 0,
    }
}

fn row<'a>(
    usage: Option<ChargedUsage<'a>>,
    monetization: Option<Monetization<'a>>,
    update: Option<ChargeUpdate<'a>>,
) -> Row<'a> {
    Row::Charge(Charge {
        usage,
        monetization,
        update,
    })
}

/// The checks that failed, in order.
fn found(report: &Report) -> Vec<&'static str> {
    report.differences.iter().map(|d| d.check).collect()
}

#[test]
fn a_charge_split_over_grants_and_refunded_adds_up_across_its_rows() {
    let mut c = checker();
    let mut refunded = monetization(1, 1);
    refunded.refunded_at = Some(5);
    c.feed(row(
        Some(usage(1)),
        Some(refunded),
        Some(update(1, "debit", -6)),
    ));
    c.feed(row(
        Some(usage(1)),
        Some(refunded),
        Some(update(2, "debit", -4)),
    ));
    c.feed(row(
        Some(usage(1)),
        Some(refunded),
        Some(update(3, "refund", 10)),
    ));
    c.feed(row(
        Some(usage(2)),
        Some(monetization(2, 2)),
        Some(update(4, "debit", -10)),
    ));
    let report = c.finish();
    assert_eq!(
        found(&report),
        Vec::<&str>::new(),
        "{:?}",
        report.differences
    );
    assert_eq!(report.monetization_events, 2);
}

#[test]
fn a_refund_must_be_marked_and_within_its_charge() {
    let mut c = checker();
    let m = monetization(1, 1);
    c.feed(row(Some(usage(1)), Some(m), Some(update(1, "debit", -10))));
    c.feed(row(Some(usage(1)), Some(m), Some(update(2, "refund", 11))));
    let report = c.finish();
    assert_eq!(
        found(&report),
        ["refund_unmarked", "refund_exceeds_charge"],
        "{:?}",
        report.differences
    );
}

#[test]
fn a_usage_event_without_its_charge_and_a_charge_without_its_usage_event_are_named() {
    let mut c = checker();
    // Usage event 1 was never monetized; 2 is; monetization event 9 has no charged usage
    // event (and no debit either).
    c.feed(row(Some(usage(1)), None, None));
    c.feed(row(
        Some(usage(2)),
        Some(monetization(2, 2)),
        Some(update(1, "debit", -10)),
    ));
    c.feed(row(None, Some(monetization(9, 7)), None));
    let report = c.finish();
    assert_eq!(
        found(&report),
        ["monetization_count", "monetization_without_usage", "debits"],
        "{:?}",
        report.differences
    );
    assert_eq!(report.differences[0].record, "usage_event 1 (decision dec)");
    assert_eq!(
        report.differences[1].record,
        "monetization_event 9 (usage_event 7)"
    );
    assert_eq!(report.monetization_events, 2);
}

/// What `flowgate reconcile` holds does not grow with the ledger: a running balance per grant
/// and the price versions, the same after ten charges as after a hundred thousand.
#[test]
fn what_the_checker_keeps_grows_with_grants_not_events() {
    let mut c = checker();
    let held = |events: i64, c: &mut Checker, from: i64| {
        for i in from..from + events {
            let grant_id = 1 + i % 2;
            c.feed(Row::BalanceUpdate(BalanceUpdate {
                id: i,
                account_id: "alice",
                grant_id,
                reason: "debit",
                delta: -10,
                balance_after: -10 * (1 + i / 2),
                forgiven: 0,
                monetization_event_id: Some(i),
            }));
        }
        c.entries()
    };
    let after_ten = held(10, &mut c, 0);
    let after_many = held(100_000, &mut c, 10);
    assert_eq!(after_ten, 2 + 1, "two grants and one price version");
    assert_eq!(after_many, after_ten);
    c.feed(Row::PriceTable(PriceTable {
        plan: "p",
        version: "v1",
        prices: r#"{"credits":{"task":5}}"#,
    }));
    for id in 1..=2 {
        c.feed(Row::Grant(Grant {
            id,
            account_id: "alice",
            external_id: "g",
            balance: -10 * 50_005,
        }));
    }
    for i in 0..100_010 {
        let m = monetization(i, i);
        c.feed(row(Some(usage(i)), Some(m), Some(update(i, "debit", -10))));
        if i == 10 || i == 100_009 {
            assert_eq!(c.entries(), after_ten, "after {i} charges");
        }
    }
    let report = c.finish();
    assert_eq!(
        found(&report),
        Vec::<&str>::new(),
        "{:?}",
        report.differences
    );
    assert_eq!(
        (
            report.grants,
            report.balance_updates,
            report.monetization_events
        ),
        (2, 100_010, 100_010)
    );
}
