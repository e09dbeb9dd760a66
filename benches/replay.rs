//! The what-if replay's pure core (`flowgate::replay::Replay`), without the store: events/s of
//! the simulation alone, for the plan benches/replay.sh fills its ledger for (a 5-hour window
//! and a weekly one, then credits), so that the two numbers together say where the time goes.
//!
//!     cargo bench --bench replay

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowgate::config::Settings;
use flowgate::replay::{Replay, ReplayOptions};
use flowgate::store::{GrantHistory, ReplayCharge, ReplayEvent, StoredAccount};
use flowgate::waterfall::GrantKind;

const ACCOUNTS: usize = 1_000;
const EVENTS: usize = 200_000;
const START: i64 = 1_798_761_600_000;

const CANDIDATE: &str = r#"
[server]
listen = "127.0.0.1:0"
[identity]
mode = "api_key"
[store]
url = "sqlite://unused.db"
[upstreams.api]
url = "http://127.0.0.1:9"
[[routes]]
method = "POST"
path = "/v1/tasks"
feature = "task"
upstream = "api"
cost = { header = "x-units" }
[plans.pro]
price_version = "v-6"
prices = { task = 6 }
[[plans.pro.layers]]
kind = "usage_limit"
name = "limits"
windows = [{ name = "5h", duration = "5h", limit = 30 }, { name = "week", duration = "7days", limit = 500 }]
[[plans.pro.layers]]
kind = "credits"
"#;

/// One stored event, owned (the store lends them borrowed from its rows).
struct Stored {
    account: String,
    units: u64,
    outcome: &'static str,
    code: Option<&'static str>,
    at: i64,
    draws: Option<String>,
}

/// The same history benches/replay.sh writes with SQL.
fn history() -> Vec<Stored> {
    (1..=EVENTS as u64)
        .map(|i| {
            let account = i % ACCOUNTS as u64;
            let units = 1 + i % 3;
            let (outcome, code) = match i % 20 {
                0 => ("denied", Some("usage_limit_reached")),
                1 => ("upstream_error", None),
                _ => ("completed", None),
            };
            Stored {
                account: format!("acct-{account}"),
                units,
                outcome,
                code,
                at: START + i as i64 * 260,
                draws: (outcome == "completed").then(|| {
                    format!(
                        r#"[{{"layer":1,"pool":"grant","grant_id":{},"units":{units},"credits":{}}}]"#,
                        account + 1,
                        5 * units
                    )
                }),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let candidate = Arc::new(Settings::parse(CANDIDATE).expect("bench config"));
    let accounts: Vec<StoredAccount> = (0..ACCOUNTS)
        .map(|a| StoredAccount {
            id: format!("acct-{a}"),
            plan: "pro".into(),
            suspended: false,
            workspace: None,
            shadow: false,
            key_hashes: Vec::new(),
            grants: Vec::new(),
        })
        .collect();
    let grants: Vec<GrantHistory> = (0..ACCOUNTS)
        .map(|a| GrantHistory {
            id: a as i64 + 1,
            account: format!("acct-{a}"),
            kind: GrantKind::Credits,
            amount: 1_000_000_000,
            expires_at: None,
            priority: 0,
            features: None,
            created_at: 0,
        })
        .collect();
    let events = history();
    let mut group = c.benchmark_group("replay");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    group.bench_function("pure core, 200k events, 1k accounts", |b| {
        b.iter(|| {
            let mut replay = Replay::new(
                candidate.clone(),
                &accounts,
                grants.clone(),
                ReplayOptions::default(),
            )
            .expect("replay starts");
            for e in &events {
                replay.push(ReplayEvent {
                    account: &e.account,
                    feature: "task",
                    units: e.units,
                    outcome: e.outcome,
                    code: e.code,
                    decided_at: e.at,
                    completed_at: e.at + 40,
                    charge: e.draws.as_deref().map(|draws| ReplayCharge {
                        credits: 5 * e.units,
                        postpaid_credits: 0,
                        estimated_units: e.units,
                        draws,
                        model: None,
                        dimensions: None,
                        refunded_at: None,
                    }),
                });
            }
            black_box(replay.finish())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
