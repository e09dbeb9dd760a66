//! `flowgate reconcile`: re-derives what the ledger should say from its own records and the
//! prices in force, and reports every place where what is stored differs.
//!
//! What is checked (pure: [`check`] takes a [`LedgerSnapshot`] and the plans):
//! - each grant's balance equals the sum of its balance updates, and each update's
//!   `balance_after` equals the running sum at that update;
//! - each charged usage event has exactly one monetization event, and each monetization event
//!   belongs to a charged usage event of the same account and feature;
//! - each monetization event adds up: its draws cover its units, units plus forgiven units are
//!   the units used, each layer's credit-paid draws cost `units × credits_per_unit`, its credits are what its
//!   grant draws cost, and its price is the plan's for that price version;
//! - each charge's debits and forgiven credits add up to its credits, and every debit,
//!   forgiveness or refund belongs to a monetization event; a refund never exceeds its charge
//!   and only a charge marked refunded has one.

use std::collections::HashMap;

use serde::Serialize;

use crate::config::Settings;
use crate::store::{LedgerSnapshot, MonetizationRow};
use crate::waterfall::{Draw, Pool, PricesDoc};

/// One difference between what the ledger stores and what it should.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// What kind of check failed (`grant_balance`, `balance_after`, `missing_monetization`, …).
    pub check: &'static str,
    /// Whose records.
    pub account: String,
    /// Which record: `grant 3`, `usage_event 17 (decision …)`, `monetization_event 9`, ….
    pub record: String,
    /// What it should be.
    pub expected: String,
    /// What is stored.
    pub stored: String,
}

/// What a reconciliation found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Grants checked.
    pub grants: usize,
    /// Balance updates checked.
    pub balance_updates: usize,
    /// Monetization events checked.
    pub monetization_events: usize,
    /// Monetization events whose price version neither the ledger nor the config has (price
    /// not checked).
    pub unknown_price_versions: usize,
    /// Every difference found.
    pub differences: Vec<Difference>,
}

/// Checks `snapshot` against itself and the plans of `settings`.
pub fn check(snapshot: &LedgerSnapshot, settings: &Settings) -> Report {
    let mut report = Report {
        grants: snapshot.grants.len(),
        balance_updates: snapshot.balance_updates.len(),
        monetization_events: snapshot.monetization.len(),
        ..Report::default()
    };
    let mut out: Vec<Difference> = Vec::new();
    let diff = |out: &mut Vec<Difference>,
                check: &'static str,
                account: &str,
                record: String,
                expected: i64,
                stored: i64| {
        out.push(Difference {
            check,
            account: account.to_owned(),
            record,
            expected: expected.to_string(),
            stored: stored.to_string(),
        });
    };

    // Balances: the running sum of each grant's updates.
    let mut unknown_price_versions = 0;
    let mut running: HashMap<i64, i64> = HashMap::new();
    let mut charged_by_updates: HashMap<i64, i64> = HashMap::new();
    let mut refunded_by_updates: HashMap<i64, i64> = HashMap::new();
    for u in &snapshot.balance_updates {
        let sum = running.entry(u.grant_id).or_default();
        *sum += u.delta;
        if u.balance_after != *sum {
            diff(
                &mut out,
                "balance_after",
                &u.account_id,
                format!("balance_update {} (grant {})", u.id, u.grant_id),
                *sum,
                u.balance_after,
            );
        }
        match (u.reason.as_str(), u.monetization_event_id) {
            ("debit" | "overdraft_forgiven", Some(m)) => {
                *charged_by_updates.entry(m).or_default() += u.forgiven - u.delta;
            }
            ("refund", Some(m)) => *refunded_by_updates.entry(m).or_default() += u.delta,
            ("debit" | "overdraft_forgiven" | "refund", None) => diff(
                &mut out,
                "update_without_charge",
                &u.account_id,
                format!("balance_update {} ({})", u.id, u.reason),
                0,
                u.forgiven - u.delta,
            ),
            _ => {}
        }
    }
    for g in &snapshot.grants {
        let sum = running.get(&g.id).copied().unwrap_or(0);
        if g.balance != sum {
            diff(
                &mut out,
                "grant_balance",
                &g.account_id,
                format!("grant {} ({})", g.id, g.external_id),
                sum,
                g.balance,
            );
        }
    }

    // Charges: one monetization event per charged usage event, and each one adding up.
    let usage: HashMap<i64, _> = snapshot.charged_usage.iter().map(|u| (u.id, u)).collect();
    let mut monetized: HashMap<i64, usize> = HashMap::new();
    // Each charge is priced by the version it names: as the ledger stored it, or, for a
    // ledger from before price versions were stored, as the config has it.
    let mut prices: HashMap<(String, String), PricesDoc> = HashMap::new();
    for (name, plan) in &settings.plans {
        for table in &plan.prices {
            prices.insert(
                (name.clone(), table.version.to_string()),
                table.document(&settings.features),
            );
        }
    }
    for t in &snapshot.price_tables {
        match serde_json::from_str::<PricesDoc>(&t.prices) {
            Ok(doc) => {
                prices.insert((t.plan.clone(), t.version.clone()), doc);
            }
            Err(e) => out.push(Difference {
                check: "price_table_unreadable",
                account: String::new(),
                record: format!("price_table {}/{}", t.plan, t.version),
                expected: "a JSON price table".into(),
                stored: e.to_string(),
            }),
        }
    }
    for m in &snapshot.monetization {
        *monetized.entry(m.usage_event_id).or_default() += 1;
        let record = format!("monetization_event {}", m.id);
        match usage.get(&m.usage_event_id) {
            None => diff(
                &mut out,
                "monetization_without_usage",
                &m.account_id,
                format!("{record} (usage_event {})", m.usage_event_id),
                0,
                1,
            ),
            Some(u) => {
                if u.account_id != m.account_id || u.feature != m.feature {
                    out.push(Difference {
                        check: "monetization_mismatch",
                        account: m.account_id.clone(),
                        record: record.clone(),
                        expected: format!("{}/{}", u.account_id, u.feature),
                        stored: format!("{}/{}", m.account_id, m.feature),
                    });
                }
                if m.units + m.forgiven_units != u.units {
                    diff(
                        &mut out,
                        "units_used",
                        &m.account_id,
                        record.clone(),
                        u.units,
                        m.units + m.forgiven_units,
                    );
                }
            }
        }
        let draws: Vec<Draw> = match serde_json::from_str(&m.draws) {
            Ok(d) => d,
            Err(e) => {
                out.push(Difference {
                    check: "draws_unreadable",
                    account: m.account_id.clone(),
                    record,
                    expected: "a JSON array of draws".into(),
                    stored: e.to_string(),
                });
                continue;
            }
        };
        let units: u64 = draws.iter().map(|d| d.units).sum();
        if units as i64 != m.units {
            diff(
                &mut out,
                "draw_units",
                &m.account_id,
                record.clone(),
                units as i64,
                m.units,
            );
        }
        let mut grant_credits = 0i64;
        let mut postpaid = 0i64;
        // A unit may be split between two grants, so a single draw's credits need not be its
        // units at the price; each layer's draws together must be.
        let mut by_layer: Vec<(u8, i64, i64)> = Vec::new();
        for d in &draws {
            match d.pool {
                Pool::Grant { .. } | Pool::Workspace { .. } => grant_credits += d.credits as i64,
                Pool::Postpaid => postpaid += d.credits as i64,
                _ => continue,
            }
            match by_layer.iter_mut().find(|(l, _, _)| *l == d.layer) {
                Some((_, units, credits)) => {
                    *units += d.units as i64;
                    *credits += d.credits as i64;
                }
                None => by_layer.push((d.layer, d.units as i64, d.credits as i64)),
            }
        }
        for (layer, units, credits) in by_layer {
            if credits != units * m.credits_per_unit {
                diff(
                    &mut out,
                    "draw_credits",
                    &m.account_id,
                    format!("{record} (layer {layer})"),
                    units * m.credits_per_unit,
                    credits,
                );
            }
        }
        if grant_credits != m.credits {
            diff(
                &mut out,
                "credits",
                &m.account_id,
                record.clone(),
                grant_credits,
                m.credits,
            );
        }
        if postpaid != m.postpaid_credits {
            diff(
                &mut out,
                "postpaid_credits",
                &m.account_id,
                record.clone(),
                postpaid,
                m.postpaid_credits,
            );
        }
        match prices.get(&(m.plan.clone(), m.price_version.clone())) {
            Some(doc) => {
                let price = doc.credits.get(&m.feature).map_or(-1, |p| *p as i64);
                if price != m.credits_per_unit {
                    diff(
                        &mut out,
                        "price",
                        &m.account_id,
                        record.clone(),
                        price,
                        m.credits_per_unit,
                    );
                }
                if let Some(dimensions) = &m.dimensions {
                    check_dimensions(&mut out, m, dimensions, doc, &record);
                }
            }
            None => unknown_price_versions += 1,
        }
        let refunded = refunded_by_updates.get(&m.id).copied().unwrap_or(0);
        if refunded > 0 && m.refunded_at.is_none() {
            diff(
                &mut out,
                "refund_unmarked",
                &m.account_id,
                record.clone(),
                0,
                refunded,
            );
        }
        if refunded > m.credits {
            diff(
                &mut out,
                "refund_exceeds_charge",
                &m.account_id,
                record.clone(),
                m.credits,
                refunded,
            );
        }
        let debited = charged_by_updates.get(&m.id).copied().unwrap_or(0);
        if debited != m.credits {
            diff(
                &mut out,
                "debits",
                &m.account_id,
                record,
                m.credits,
                debited,
            );
        }
    }
    for u in &snapshot.charged_usage {
        let n = monetized.get(&u.id).copied().unwrap_or(0);
        if n != 1 {
            diff(
                &mut out,
                "monetization_count",
                &u.account_id,
                format!("usage_event {} (decision {})", u.id, u.decision_id),
                1,
                n as i64,
            );
        }
    }
    report.unknown_price_versions = unknown_price_versions;
    report.differences = out;
    report
}

/// A dimension-priced charge: the units it used are its dimensions at the rates of its
/// version, for its model.
fn check_dimensions(
    out: &mut Vec<Difference>,
    m: &MonetizationRow,
    dimensions: &str,
    doc: &PricesDoc,
    record: &str,
) {
    let used = m.units + m.forgiven_units;
    let measured: Result<std::collections::BTreeMap<String, u64>, _> =
        serde_json::from_str(dimensions);
    let expected = match (measured, doc.rates.get(&m.feature)) {
        (Ok(q), Some(rates)) => rates
            .rates()
            .units(m.model.as_deref(), q.iter().map(|(d, n)| (d.as_str(), *n)))
            .map_or_else(|| "a priced model".to_owned(), |u| u.to_string()),
        (Ok(_), None) => "rates for the feature in its price version".to_owned(),
        (Err(e), _) => format!("a JSON object of quantities ({e})"),
    };
    if expected != used.to_string() {
        out.push(Difference {
            check: "dimension_price",
            account: m.account_id.clone(),
            record: record.to_owned(),
            expected,
            stored: used.to_string(),
        });
    }
}
