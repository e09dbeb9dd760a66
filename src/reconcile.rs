//! `flowgate reconcile`: re-derives what the ledger should say from its own records and the
//! prices in force, and reports every place where what is stored differs.
//!
//! What is checked (pure: a [`Checker`] is fed the ledger's rows one at a time, in the order
//! the store streams them, [`Row`]; `Store::reconcile` does both):
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
//!
//! Memory grows with grants and price versions, never with events: the store joins each
//! charge with its usage event and balance updates, so the checker holds one running balance
//! per grant and the one charge (and usage event) whose rows it is reading.

use std::collections::HashMap;

use serde::Serialize;

use crate::config::Settings;
pub mod rows;

use crate::waterfall::{Draw, Pool, PricesDoc};
pub use rows::{Charge, ChargedUsage, Monetization, Row};

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

/// Reconciles a ledger fed to it row by row ([`Checker::feed`], in the store's order), then
/// [`Checker::finish`]es into the [`Report`].
#[derive(Debug)]
pub struct Checker {
    /// Price versions by plan, then version: the config's, replaced by the ledger's own.
    prices: HashMap<String, HashMap<String, PricesDoc>>,
    /// The running sum of each grant's balance updates (one entry per grant).
    running: HashMap<i64, i64>,
    /// The charged usage event whose rows are being read.
    usage: Option<OpenUsage>,
    /// The monetization event whose balance updates are being read.
    charge: Option<OpenCharge>,
    /// Per-layer (layer, units, credits) of the charge being checked: kept to reuse its
    /// allocation from one charge to the next.
    by_layer: Vec<(u8, i64, i64)>,
    /// What has been found so far.
    report: Report,
}

/// A charged usage event and how many monetization events its rows have named.
#[derive(Debug)]
struct OpenUsage {
    /// Its id.
    id: i64,
    /// Its decision, to name it in a difference.
    decision_id: String,
    /// Its account.
    account_id: String,
    /// Monetization events seen for it.
    monetized: usize,
}

/// A monetization event and what its balance updates have added up to so far.
#[derive(Debug)]
struct OpenCharge {
    /// Its id.
    id: i64,
    /// Its account.
    account_id: String,
    /// Credits it charged.
    credits: i64,
    /// Whether it is marked refunded.
    marked_refunded: bool,
    /// Credits debited or forgiven for it.
    paid: i64,
    /// Credits refunded for it.
    refunded: i64,
}

/// What a balance update does to the charge it names.
enum Effect {
    /// A debit or a forgiveness: this many credits taken or forgiven.
    Paid(i64),
    /// A refund: this many credits given back.
    Refunded(i64),
}

/// The one place that says which balance updates belong to a charge.
fn effect(reason: &str, delta: i64, forgiven: i64) -> Option<Effect> {
    match reason {
        "debit" | "overdraft_forgiven" => Some(Effect::Paid(forgiven - delta)),
        "refund" => Some(Effect::Refunded(delta)),
        _ => None,
    }
}

fn monetization_record(id: i64) -> String {
    format!("monetization_event {id}")
}

impl Checker {
    /// A checker for a ledger written under `settings`' plans (whose price versions stand in
    /// for those the ledger has not stored).
    pub fn new(settings: &Settings) -> Checker {
        let mut prices: HashMap<String, HashMap<String, PricesDoc>> = HashMap::new();
        for (name, plan) in &settings.plans {
            for table in &plan.prices {
                prices.entry(name.clone()).or_default().insert(
                    table.version.to_string(),
                    table.document(&settings.features),
                );
            }
        }
        Checker {
            prices,
            running: HashMap::new(),
            usage: None,
            charge: None,
            by_layer: Vec::new(),
            report: Report::default(),
        }
    }

    /// Checks one row.
    pub fn feed(&mut self, row: Row<'_>) {
        match row {
            Row::BalanceUpdate(u) => {
                self.report.balance_updates += 1;
                let sum = self.running.entry(u.grant_id).or_default();
                *sum += u.delta;
                if u.balance_after != *sum {
                    let expected = *sum;
                    self.diff(
                        "balance_after",
                        u.account_id,
                        format!("balance_update {} (grant {})", u.id, u.grant_id),
                        expected,
                        u.balance_after,
                    );
                }
                if u.monetization_event_id.is_none()
                    && effect(u.reason, u.delta, u.forgiven).is_some()
                {
                    self.diff(
                        "update_without_charge",
                        u.account_id,
                        format!("balance_update {} ({})", u.id, u.reason),
                        0,
                        u.forgiven - u.delta,
                    );
                }
            }
            Row::Grant(g) => {
                self.report.grants += 1;
                let sum = self.running.get(&g.id).copied().unwrap_or(0);
                if g.balance != sum {
                    self.diff(
                        "grant_balance",
                        g.account_id,
                        format!("grant {} ({})", g.id, g.external_id),
                        sum,
                        g.balance,
                    );
                }
            }
            // Each charge is priced by the version it names: as the ledger stored it, or, for
            // a ledger from before price versions were stored, as the config has it.
            Row::PriceTable(t) => match serde_json::from_str::<PricesDoc>(t.prices) {
                Ok(doc) => {
                    self.prices
                        .entry(t.plan.to_owned())
                        .or_default()
                        .insert(t.version.to_owned(), doc);
                }
                Err(e) => self.report.differences.push(Difference {
                    check: "price_table_unreadable",
                    account: String::new(),
                    record: format!("price_table {}/{}", t.plan, t.version),
                    expected: "a JSON price table".into(),
                    stored: e.to_string(),
                }),
            },
            Row::Charge(c) => self.charge(c),
        }
    }

    /// The report, once every row has been fed.
    pub fn finish(mut self) -> Report {
        self.close_charge();
        self.close_usage();
        self.report
    }

    /// How many entries the checker holds (running balances and price versions): it does not
    /// grow with events, which is what keeps `flowgate reconcile` in bounded memory.
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.running.len() + self.prices.values().map(HashMap::len).sum::<usize>()
    }

    fn diff(
        &mut self,
        check: &'static str,
        account: &str,
        record: String,
        expected: i64,
        stored: i64,
    ) {
        self.report.differences.push(Difference {
            check,
            account: account.to_owned(),
            record,
            expected: expected.to_string(),
            stored: stored.to_string(),
        });
    }

    /// One row of a charge: a new usage event or monetization event ends the previous one.
    fn charge(&mut self, c: Charge<'_>) {
        if self.usage.as_ref().map(|u| u.id) != c.usage.map(|u| u.id) {
            self.close_charge();
            self.close_usage();
            self.usage = c.usage.map(|u| OpenUsage {
                id: u.id,
                decision_id: u.decision_id.to_owned(),
                account_id: u.account_id.to_owned(),
                monetized: 0,
            });
        }
        let Some(m) = c.monetization else { return };
        if self.charge.as_ref().map(|o| o.id) != Some(m.id) {
            self.close_charge();
            if let Some(u) = &mut self.usage {
                u.monetized += 1;
            }
            self.report.monetization_events += 1;
            self.check_monetization(&m, c.usage.as_ref());
            self.charge = Some(OpenCharge {
                id: m.id,
                account_id: m.account_id.to_owned(),
                credits: m.credits,
                marked_refunded: m.refunded_at.is_some(),
                paid: 0,
                refunded: 0,
            });
        }
        if let (Some(b), Some(open)) = (c.update, &mut self.charge) {
            match effect(b.reason, b.delta, b.forgiven) {
                Some(Effect::Paid(n)) => open.paid += n,
                Some(Effect::Refunded(n)) => open.refunded += n,
                None => {}
            }
        }
    }

    /// Every balance update of the charge has been read: do they add up?
    fn close_charge(&mut self) {
        let Some(o) = self.charge.take() else { return };
        if o.refunded > 0 && !o.marked_refunded {
            self.diff(
                "refund_unmarked",
                &o.account_id,
                monetization_record(o.id),
                0,
                o.refunded,
            );
        }
        if o.refunded > o.credits {
            self.diff(
                "refund_exceeds_charge",
                &o.account_id,
                monetization_record(o.id),
                o.credits,
                o.refunded,
            );
        }
        if o.paid != o.credits {
            self.diff(
                "debits",
                &o.account_id,
                monetization_record(o.id),
                o.credits,
                o.paid,
            );
        }
    }

    /// Every monetization event of the usage event has been read: exactly one?
    fn close_usage(&mut self) {
        let Some(u) = self.usage.take() else { return };
        if u.monetized != 1 {
            self.diff(
                "monetization_count",
                &u.account_id,
                format!("usage_event {} (decision {})", u.id, u.decision_id),
                1,
                u.monetized as i64,
            );
        }
    }

    /// The checks of a monetization event that need none of its balance updates.
    fn check_monetization(&mut self, m: &Monetization<'_>, usage: Option<&ChargedUsage<'_>>) {
        let record = || monetization_record(m.id);
        match usage {
            None => self.diff(
                "monetization_without_usage",
                m.account_id,
                format!("{} (usage_event {})", record(), m.usage_event_id),
                0,
                1,
            ),
            Some(u) => {
                if u.account_id != m.account_id || u.feature != m.feature {
                    self.report.differences.push(Difference {
                        check: "monetization_mismatch",
                        account: m.account_id.to_owned(),
                        record: record(),
                        expected: format!("{}/{}", u.account_id, u.feature),
                        stored: format!("{}/{}", m.account_id, m.feature),
                    });
                }
                if m.units + m.forgiven_units != u.units {
                    self.diff(
                        "units_used",
                        m.account_id,
                        record(),
                        u.units,
                        m.units + m.forgiven_units,
                    );
                }
            }
        }
        let draws: Vec<Draw> = match serde_json::from_str(m.draws) {
            Ok(d) => d,
            Err(e) => {
                self.report.differences.push(Difference {
                    check: "draws_unreadable",
                    account: m.account_id.to_owned(),
                    record: record(),
                    expected: "a JSON array of draws".into(),
                    stored: e.to_string(),
                });
                return;
            }
        };
        let units: u64 = draws.iter().map(|d| d.units).sum();
        if units as i64 != m.units {
            self.diff("draw_units", m.account_id, record(), units as i64, m.units);
        }
        let mut grant_credits = 0i64;
        let mut postpaid = 0i64;
        // A unit may be split between two grants, so a single draw's credits need not be its
        // units at the price; each layer's draws together must be.
        let mut by_layer = std::mem::take(&mut self.by_layer);
        by_layer.clear();
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
        for &(layer, units, credits) in &by_layer {
            if credits != units * m.credits_per_unit {
                self.diff(
                    "draw_credits",
                    m.account_id,
                    format!("{} (layer {layer})", record()),
                    units * m.credits_per_unit,
                    credits,
                );
            }
        }
        self.by_layer = by_layer;
        if grant_credits != m.credits {
            self.diff("credits", m.account_id, record(), grant_credits, m.credits);
        }
        if postpaid != m.postpaid_credits {
            self.diff(
                "postpaid_credits",
                m.account_id,
                record(),
                postpaid,
                m.postpaid_credits,
            );
        }
        let Some(doc) = self.prices.get(m.plan).and_then(|v| v.get(m.price_version)) else {
            self.report.unknown_price_versions += 1;
            return;
        };
        let price = doc.credits.get(m.feature).map_or(-1, |p| *p as i64);
        let dimensions = m
            .dimensions
            .and_then(|d| dimension_difference(m, d, doc, record()));
        if price != m.credits_per_unit {
            self.diff("price", m.account_id, record(), price, m.credits_per_unit);
        }
        self.report.differences.extend(dimensions);
    }
}

/// What is wrong, if anything, with a dimension-priced charge: the units it used must be its
/// dimensions at the rates of its version, for its model.
fn dimension_difference(
    m: &Monetization<'_>,
    dimensions: &str,
    doc: &PricesDoc,
    record: String,
) -> Option<Difference> {
    let used = m.units + m.forgiven_units;
    let measured: Result<std::collections::BTreeMap<String, u64>, _> =
        serde_json::from_str(dimensions);
    let expected = match (measured, doc.rates.get(m.feature)) {
        (Ok(q), Some(rates)) => rates
            .rates()
            .units(m.model, q.iter().map(|(d, n)| (d.as_str(), *n)))
            .map_or_else(|| "a priced model".to_owned(), |u| u.to_string()),
        (Ok(_), None) => "rates for the feature in its price version".to_owned(),
        (Err(e), _) => format!("a JSON object of quantities ({e})"),
    };
    (expected != used.to_string()).then(|| Difference {
        check: "dimension_price",
        account: m.account_id.to_owned(),
        record,
        expected,
        stored: used.to_string(),
    })
}

#[cfg(test)]
mod tests;
