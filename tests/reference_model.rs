//! A reference model of the waterfall and the ledger, independent of the engine and the store
//! (plain integers and lists, no code shared with `src/`), driven by the same random histories
//! as a real gateway, backend and store, and compared after every step.
//!
//! The account is the test config's alice on plan `pro`: a usage-limit layer (3 tasks per 5 h;
//! the week's 10 never binds in a history this short), then credits at 5 per task, spent from
//! the grant that expires first. Histories: admin grants (some expiring), tasks that settle
//! below or above their estimate (or report nothing), fail upstream, or reuse one of three
//! idempotency keys (with the same or another cost), refunds, clock moves (a manual clock, so
//! expiry is exact) and restarts. After every step the model and the gateway must agree on:
//! the answer (admitted, denied, failed, replayed or refused as a reused key), the
//! `x-ratelimit-remaining-5h` of an admitted answer, the credits the account can spend, every
//! unexpired grant's stored balance, and which keys the store charged (once each).
//! Shrinking gives a minimal failing history.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::api::with_admin;
use common::{Harness, StoreKind, header};
use flowgate::clock::Clock;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::Method;

const PRICE: u64 = 5;
const WINDOW: u64 = 3;
const MINUTE: i64 = 60_000;

#[derive(Debug, Clone)]
enum Op {
    Grant {
        amount: u64,
        expires_in_min: Option<i64>,
    },
    Task {
        units: u64,
        used: Option<u64>,
        key: Option<u8>,
        fail: bool,
    },
    Refund {
        nth: usize,
    },
    Advance {
        minutes: i64,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1u64..60, prop::option::of(1i64..30))
            .prop_map(|(amount, expires_in_min)| Op::Grant { amount, expires_in_min }),
        7 => (1u64..9, prop::option::of(0u64..12), prop::option::of(0u8..3), prop::bool::weighted(0.15))
            .prop_map(|(units, used, key, fail)| Op::Task { units, used, key, fail }),
        1 => (0usize..8).prop_map(|nth| Op::Refund { nth }),
        2 => (1i64..20).prop_map(|minutes| Op::Advance { minutes }),
        2 => Just(Op::Restart),
    ]
}

/// A grant as the model knows it.
#[derive(Debug, Clone)]
struct Grant {
    balance: u64,
    expires_at: Option<i64>,
}

/// A charge: its decision, and what it finally took from the window and from which grants.
#[derive(Debug, Clone)]
struct Charge {
    decision: String,
    window_units: u64,
    credits: Vec<(usize, u64)>,
    refunded: bool,
}

/// The model: everything in plain numbers.
#[derive(Debug)]
struct Model {
    now: i64,
    window_used: u64,
    /// In creation order (= the store's id order).
    grants: Vec<Grant>,
    charges: Vec<Charge>,
    /// Keys the store charged, ever.
    charged_keys: BTreeSet<u8>,
    /// Keys this gateway process remembers as charged, with the units they were charged for.
    remembered: BTreeMap<u8, u64>,
}

impl Model {
    fn usable(&self, g: &Grant) -> bool {
        g.balance > 0 && g.expires_at.is_none_or(|at| self.now < at)
    }

    fn spendable(&self) -> u64 {
        self.grants
            .iter()
            .filter(|g| self.usable(g))
            .map(|g| g.balance)
            .sum()
    }

    /// Grant indexes in spending order: earliest expiry first, never-expiring last.
    fn spend_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.grants.len()).collect();
        order.sort_by_key(|&i| (self.grants[i].expires_at.unwrap_or(i64::MAX), i));
        order
    }

    /// Takes `credits` from usable grants in spending order.
    fn take_credits(&mut self, mut credits: u64) -> Vec<(usize, u64)> {
        let mut taken = Vec::new();
        for i in self.spend_order() {
            if credits == 0 {
                break;
            }
            if !self.usable(&self.grants[i]) {
                continue;
            }
            let take = self.grants[i].balance.min(credits);
            self.grants[i].balance -= take;
            credits -= take;
            taken.push((i, take));
        }
        assert_eq!(credits, 0, "the model drew more than it had");
        taken
    }

    fn give_back(&mut self, taken: &[(usize, u64)]) {
        for &(i, c) in taken {
            self.grants[i].balance += c;
        }
    }

    /// Covers `units` from the window's room, then credits; returns (window, credits drawn,
    /// units nobody could pay).
    fn cover(&mut self, units: u64) -> (u64, Vec<(usize, u64)>, u64) {
        let w = units.min(WINDOW.saturating_sub(self.window_used));
        self.window_used += w;
        let c = (units - w).min(self.spendable() / PRICE);
        let taken = self.take_credits(c * PRICE);
        (w, taken, units - w - c)
    }
}

/// What the gateway should answer a task.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Admitted { remaining_5h: u64 },
    Denied,
    Failed,
    Replayed,
    KeyReused,
}

fn config(c: String) -> String {
    with_admin(c.replace(
        "cost = { header = \"x-units\" }",
        "cost = { header = \"x-units\" }\nsettle = { header = \"x-usage-units\" }",
    ))
}

/// The model's step; returns the answer it expects for a task.
fn expect_task(
    m: &mut Model,
    units: u64,
    used: Option<u64>,
    key: Option<u8>,
    fail: bool,
) -> (Answer, Option<Charge>) {
    if let Some(k) = key
        && let Some(&charged_units) = m.remembered.get(&k)
    {
        let answer = if charged_units == units {
            Answer::Replayed
        } else {
            Answer::KeyReused
        };
        return (answer, None);
    }
    let room = WINDOW.saturating_sub(m.window_used);
    if units > room + m.spendable() / PRICE {
        return (Answer::Denied, None);
    }
    let (w, taken, _) = m.cover(units);
    let remaining_5h = WINDOW - m.window_used;
    if fail {
        m.window_used -= w;
        m.give_back(&taken);
        return (Answer::Failed, None);
    }
    if let Some(k) = key {
        m.remembered.insert(k, units);
        if m.charged_keys.contains(&k) {
            // Charged before a restart: the store records a duplicate, the hold is given back.
            m.window_used -= w;
            m.give_back(&taken);
            return (Answer::Admitted { remaining_5h }, None);
        }
        m.charged_keys.insert(k);
    }
    let (mut window_units, mut credits) = (w, taken);
    match used {
        Some(u) if u < units => {
            // The excess goes back, the last pools first: credits (last drawn first), then
            // the window.
            let mut excess = units - u;
            let credit_units = units - w;
            let back = excess.min(credit_units);
            let mut owed = back * PRICE;
            while owed > 0 {
                let (i, c) = credits.pop().expect("credits to give back");
                let give = c.min(owed);
                m.grants[i].balance += give;
                owed -= give;
                if give < c {
                    credits.push((i, c - give));
                }
            }
            excess -= back;
            window_units -= excess;
            m.window_used -= excess;
        }
        Some(u) if u > units => {
            let (w2, more, _forgiven) = m.cover(u - units);
            window_units += w2;
            credits.extend(more);
        }
        _ => {}
    }
    let charge = Charge {
        decision: String::new(),
        window_units,
        credits,
        refunded: false,
    };
    (Answer::Admitted { remaining_5h }, Some(charge))
}

async fn charged_keys_in_store(h: &Harness) -> BTreeMap<String, i64> {
    let sql = "SELECT idempotency_key, COUNT(*) FROM usage_events
               WHERE account_id = 'alice' AND charge_key LIKE 'k:%' GROUP BY idempotency_key";
    if h.pg().is_some() {
        let pool = sqlx::PgPool::connect(&h.store_url).await.unwrap();
        sqlx::query_as(sql)
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect()
    } else {
        let pool = sqlx::SqlitePool::connect(&h.store_url).await.unwrap();
        sqlx::query_as(sql)
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }
}

async fn run_history(kind: StoreKind, ops: Vec<Op>) {
    let clock = Clock::manual(flowgate::clock::now_ms());
    let mut h = Harness::start_with_clock(kind, clock.clone(), config).await;
    let mut m = Model {
        now: clock.now_ms(),
        window_used: 0,
        grants: vec![Grant {
            balance: 100,
            expires_at: None,
        }],
        charges: Vec::new(),
        charged_keys: BTreeSet::new(),
        remembered: BTreeMap::new(),
    };
    for (n, op) in ops.iter().enumerate() {
        macro_rules! at {
            () => {
                format!("step {n} ({op:?}) of {ops:?}\nmodel: {m:?}")
            };
        }
        match *op {
            Op::Grant {
                amount,
                expires_in_min,
            } => {
                let expires_at = expires_in_min.map(|min| m.now + min * MINUTE);
                let mut body = serde_json::json!({ "kind": "credits", "amount": amount });
                if let Some(at) = expires_at {
                    body["expires_at"] = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(at)
                        .unwrap()
                        .to_rfc3339()
                        .into();
                }
                let r = h
                    .admin(Method::POST, "/admin/v1/accounts/alice/grants")
                    .header("idempotency-key", format!("grant-{n}"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201, "{}", at!());
                m.grants.push(Grant {
                    balance: amount,
                    expires_at,
                });
            }
            Op::Task {
                units,
                used,
                key,
                fail,
            } => {
                let mut req = h
                    .post("/v1/tasks", "sk-alice")
                    .header("x-units", units)
                    .body("{}");
                if let Some(u) = used {
                    req = req.header("x-mock-usage", u);
                }
                if let Some(k) = key {
                    req = req.header("idempotency-key", format!("key-{k}"));
                }
                if fail {
                    req = req.header("x-mock-status", "500");
                }
                let (expected, charge) = expect_task(&mut m, units, used, key, fail);
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                let answer = match status {
                    200 if r.headers().contains_key("x-flowgate-replay-of") => Answer::Replayed,
                    200 => Answer::Admitted {
                        remaining_5h: header(&r, "x-ratelimit-remaining-5h").parse().unwrap(),
                    },
                    402 | 429 => Answer::Denied,
                    500 => Answer::Failed,
                    422 => Answer::KeyReused,
                    other => panic!("status {other}: {}", at!()),
                };
                let decision = r
                    .headers()
                    .get("x-flowgate-decision-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                r.bytes().await.unwrap();
                assert_eq!(answer, expected, "{}", at!());
                if let Some(mut charge) = charge {
                    charge.decision = decision;
                    m.charges.push(charge);
                }
            }
            Op::Refund { nth } => {
                let open: Vec<usize> = (0..m.charges.len())
                    .filter(|&i| !m.charges[i].refunded)
                    .collect();
                if open.is_empty() {
                    continue;
                }
                let i = open[nth % open.len()];
                h.settle_ledger().await;
                let path = format!("/admin/v1/decisions/{}/refund", m.charges[i].decision);
                let r = h.admin(Method::POST, &path).send().await.unwrap();
                assert_eq!(
                    r.status(),
                    200,
                    "{}: {}",
                    at!(),
                    r.text().await.unwrap_or_default()
                );
                let charge = m.charges[i].clone();
                m.window_used -= charge.window_units;
                m.give_back(&charge.credits);
                m.charges[i].refunded = true;
            }
            Op::Advance { minutes } => {
                clock.advance_ms(minutes * MINUTE);
                m.now += minutes * MINUTE;
            }
            Op::Restart => {
                h.restart().await;
                m.remembered.clear();
            }
        }

        // After every step: the credits the account can spend, every unexpired grant's
        // stored balance, and the keys the store charged.
        // (After the writer has committed: a duplicate is only known to the store.)
        h.settle_ledger().await;
        assert_eq!(
            h.cached_credits("alice", "task"),
            m.spendable(),
            "view: {}",
            at!()
        );
        let store = h.store().await;
        let stored = store.grants("alice").await.unwrap();
        assert_eq!(stored.len(), m.grants.len(), "{}", at!());
        for (s, g) in stored.iter().zip(&m.grants) {
            if m.usable(g) || g.expires_at.is_none_or(|t| m.now < t) {
                assert_eq!(s.balance, g.balance, "grant {}: {}", s.external_id, at!());
            }
        }
        let keys = charged_keys_in_store(&h).await;
        let expected: BTreeMap<String, i64> = m
            .charged_keys
            .iter()
            .map(|k| (format!("key-{k}"), 1))
            .collect();
        assert_eq!(keys, expected, "charged keys: {}", at!());
    }
}

fn run(kind: StoreKind, cases: u32) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 1..16), |ops| {
        rt.block_on(run_history(kind, ops));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn the_gateway_agrees_with_the_reference_model_sqlite() {
    run(StoreKind::Sqlite, 64);
}

#[test]
fn the_gateway_agrees_with_the_reference_model_postgres() {
    run(StoreKind::Postgres, 32);
}
