//! The pure core: a ledger made by a model of the gateway (the engine, sequentially), replayed
//! under the same config, gives the ledger's charges back (proptest); holds overlap as their
//! times say (concurrency); a refund gives credits back at its time.

use proptest::prelude::*;

use super::*;
use crate::store::ReplayCharge;
use crate::waterfall::{FeatureSet, cover_up_to, decide, release, reserve, trim};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "sqlite://unused.db"
[identity]
mode = "api_key"
[upstreams.up]
url = "http://127.0.0.1:1"
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
kind = "concurrency"
name = "running"
limit = __RUNNING__

[[plans.p.layers]]
kind = "usage_limit"
name = "limits"
windows = [{ name = "1h", duration = "1h", limit = __LIMIT__ }]

[[plans.p.layers]]
kind = "free_tier"
units = 2
period = "day"

[[plans.p.layers]]
kind = "credits"
"#;

/// The test plan with a window of `limit` (none for 0) and `running` requests at a time.
fn settings(limit: u64, running: u32) -> Arc<Settings> {
    let mut text = CONFIG.to_owned();
    if limit == 0 {
        let window = "[[plans.p.layers]]\nkind = \"usage_limit\"\nname = \"limits\"\nwindows = [{ name = \"1h\", duration = \"1h\", limit = __LIMIT__ }]\n";
        assert!(text.contains(window));
        text = text.replace(window, "");
    }
    let text = text
        .replace("__LIMIT__", &limit.to_string())
        .replace("__RUNNING__", &running.to_string());
    Arc::new(Settings::parse(&text).expect("test config"))
}

/// A stored usage event, owned (the store lends [`ReplayEvent`]s borrowed from its rows).
#[derive(Debug, Clone)]
struct Ev {
    account: String,
    units: u64,
    outcome: &'static str,
    code: Option<&'static str>,
    decided_at: Millis,
    completed_at: Millis,
    charge: Option<Ch>,
}

#[derive(Debug, Clone)]
struct Ch {
    credits: u64,
    estimated: u64,
    draws: String,
    refunded_at: Option<Millis>,
}

impl Ev {
    fn view(&self) -> ReplayEvent<'_> {
        ReplayEvent {
            account: &self.account,
            feature: "task",
            units: self.units,
            outcome: self.outcome,
            code: self.code,
            decided_at: self.decided_at,
            completed_at: self.completed_at,
            charge: self.charge.as_ref().map(|c| ReplayCharge {
                credits: c.credits,
                postpaid_credits: 0,
                estimated_units: c.estimated,
                draws: &c.draws,
                model: None,
                dimensions: None,
                refunded_at: c.refunded_at,
            }),
        }
    }
}

fn account(id: &str) -> StoredAccount {
    StoredAccount {
        id: id.into(),
        plan: "p".into(),
        suspended: false,
        workspace: None,
        shadow: false,
        key_hashes: Vec::new(),
        grants: Vec::new(),
    }
}

fn grant(id: i64, account: &str, amount: u64, created_at: Millis) -> GrantHistory {
    GrantHistory {
        id,
        account: account.into(),
        kind: GrantKind::Credits,
        amount,
        expires_at: None,
        priority: 0,
        features: None,
        created_at,
    }
}

fn run(
    settings: Arc<Settings>,
    accounts: &[&str],
    grants: Vec<GrantHistory>,
    events: &[Ev],
) -> Report {
    let accounts: Vec<StoredAccount> = accounts.iter().map(|a| account(a)).collect();
    let mut replay =
        Replay::new(settings, &accounts, grants, ReplayOptions::default()).expect("replay starts");
    for e in events {
        replay.push(e.view());
    }
    replay.finish()
}

/// One request of a generated history.
#[derive(Debug, Clone)]
struct Request {
    account: usize,
    units: u64,
    /// What the response reported (settlement), as a signed change of the estimate.
    settle: i64,
    failed: bool,
    gap_minutes: i64,
}

fn request() -> impl Strategy<Value = Request> {
    (
        0usize..2,
        0u64..6,
        -3i64..4,
        proptest::bool::weighted(0.2),
        0i64..40,
    )
        .prop_map(|(account, units, settle, failed, gap_minutes)| Request {
            account,
            units,
            settle,
            failed,
            gap_minutes,
        })
}

/// The gateway, modelled sequentially with the engine: decide, hold, then settle (the hold's
/// adjustment) or release; what the ledger then records.
fn ledger(settings: &Settings, requests: &[Request], grants: &[GrantHistory]) -> Vec<Ev> {
    let plan = settings.plans["p"].clone();
    let feature = settings.feature_id("task").unwrap();
    let ids = ["a", "b"];
    let mut states: Vec<AccountState> = ids
        .iter()
        .map(|_| AccountState::new(&plan, Vec::new(), 0))
        .collect();
    let mut given = 0;
    let mut now: Millis = 1_800_000_000_000;
    let mut events = Vec::new();
    for r in requests {
        now += r.gap_minutes * 60_000 + 7;
        while given < grants.len() && grants[given].created_at <= now {
            let g = &grants[given];
            let i = ids.iter().position(|a| *a == g.account).unwrap();
            states[i].add_grant(Grant {
                id: g.id,
                kind: g.kind,
                balance: g.amount,
                unsettled: 0,
                version: 0,
                expires_at: crate::waterfall::NEVER,
                priority: 0,
                features: FeatureSet::ALL,
            });
            given += 1;
        }
        let state = &mut states[r.account];
        let d = decide(&plan, state, feature, r.units, now);
        let mut ev = Ev {
            account: ids[r.account].into(),
            units: r.units,
            outcome: "denied",
            code: None,
            decided_at: now,
            completed_at: now,
            charge: None,
        };
        if let Some(denial) = &d.denial {
            ev.code = Some(denial_code(denial));
            events.push(ev);
            continue;
        }
        reserve(&plan, state, &d, now);
        let done = now + 3;
        ev.completed_at = done;
        if r.failed {
            release(&plan, state, &d.draws, done);
            ev.outcome = "upstream_error";
            events.push(ev);
            continue;
        }
        let used = r.units.saturating_add_signed(r.settle);
        let mut draws = d.draws.clone();
        if used < r.units {
            let back = trim(&mut draws, r.units - used, d.credits_per_unit);
            release(&plan, state, &back, done);
        } else if used > r.units {
            let (extra, _) = cover_up_to(&plan, state, d.ongoing(), used - r.units, done);
            if let Some(extra) = extra {
                reserve(&plan, state, &extra, done);
                draws.extend(extra.draws);
            }
        }
        ev.outcome = "completed";
        ev.units = used;
        ev.charge = Some(Ch {
            credits: draws.iter().map(|x| x.credits).sum(),
            estimated: r.units,
            draws: serde_json::to_string(&draws).unwrap(),
            refunded_at: None,
        });
        events.push(ev);
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Replayed under the config that made it, a ledger's every request gets the same answer,
    /// the same denial code and the same charge from the same pools.
    #[test]
    fn the_same_config_reproduces_the_ledger(
        requests in proptest::collection::vec(request(), 1..60),
        limit in 0u64..6,
        late_grant in 0i64..600,
    ) {
        let settings = settings(limit, 5);
        let start: Millis = 1_800_000_000_000;
        let grants = vec![
            grant(1, "a", 40, start),
            grant(2, "b", 15, start),
            grant(3, "a", 30, start + late_grant * 60_000),
        ];
        let events = ledger(&settings, &requests, &grants);
        let report = run(settings, &["a", "b"], grants, &events);
        prop_assert_eq!(report.events.counted, requests.len() as u64);
        for a in &report.accounts {
            prop_assert_eq!(&a.summary.before, &a.summary.after, "{}", a.account);
            prop_assert_eq!(a.summary.newly_denied + a.summary.newly_admitted, 0);
        }
        let charged: u64 = events.iter().filter_map(|e| e.charge.as_ref()).map(|c| c.credits).sum();
        prop_assert_eq!(report.totals.after.credits, charged);
    }
}

fn task(account: &str, units: u64, at: Millis, until: Millis, credits: u64) -> Ev {
    let draws = if credits > 0 {
        serde_json::json!([{"layer": 3, "pool": "grant", "grant_id": 1, "units": units, "credits": credits}])
    } else {
        serde_json::json!([])
    };
    Ev {
        account: account.into(),
        units,
        outcome: "completed",
        code: None,
        decided_at: at,
        completed_at: until,
        charge: Some(Ch {
            credits,
            estimated: units,
            draws: draws.to_string(),
            refunded_at: None,
        }),
    }
}

/// Holds overlap exactly as the events' times say: with one request at a time, the second of
/// two overlapping requests is denied; one that starts as the first ends is not.
#[test]
fn holds_last_from_decision_to_completion() {
    let t = 1_800_000_000_000;
    let overlapping = [
        task("a", 1, t, t + 500, 5),
        task("a", 1, t + 100, t + 200, 5),
    ];
    let report = run(
        settings(0, 1),
        &["a"],
        vec![grant(1, "a", 100, 0)],
        &overlapping,
    );
    let after = &report.totals.after;
    assert_eq!(
        after.denials.get("concurrency_limit_reached"),
        Some(&1),
        "{report:#?}"
    );
    assert_eq!(report.totals.newly_denied, 1);
    let in_turn = [
        task("a", 1, t, t + 500, 5),
        task("a", 1, t + 500, t + 600, 5),
    ];
    let report = run(
        settings(0, 1),
        &["a"],
        vec![grant(1, "a", 100, 0)],
        &in_turn,
    );
    assert_eq!(report.totals.after.denied, 0, "{report:#?}");
    // The free tier (2 a day) pays the first two units, credits the rest.
    assert_eq!(report.totals.after.credits, 0);
    assert_eq!(report.totals.after.pools["free_tier"].units, 2);
}

/// A refunded charge gives its credits back at its refund's time, and counts on neither side.
#[test]
fn a_refund_gives_the_credits_back_when_it_happened() {
    let t = 1_800_000_000_000;
    // Free tier first: 2 units free, then 3 units of credits (15) of a 20-credit grant.
    let mut first = task("a", 5, t, t + 10, 15);
    let second = task("a", 3, t + 60_000, t + 60_010, 15);
    let grants = vec![grant(1, "a", 20, 0)];
    let report = run(
        settings(0, 5),
        &["a"],
        grants.clone(),
        &[first.clone(), second.clone()],
    );
    assert_eq!(
        report.totals.after.denied, 1,
        "20 credits pay one of the two: {report:#?}"
    );
    first.charge.as_mut().unwrap().refunded_at = Some(t + 30_000);
    let report = run(settings(0, 5), &["a"], grants, &[first, second]);
    assert_eq!(report.totals.after.denied, 0, "{report:#?}");
    assert_eq!(report.totals.refunded, 1);
    // The second task: the free tier given back pays 2 units, credits 1 (the ledger: 3).
    assert_eq!(report.totals.before.credits, 15);
    assert_eq!(report.totals.after.credits, 5);
}

/// A grant counts from when it was given, not before.
#[test]
fn grants_start_when_they_were_given() {
    let t = 1_800_000_000_000;
    let events = [task("a", 4, t, t + 1, 10)];
    let early = run(
        settings(0, 5),
        &["a"],
        vec![grant(1, "a", 10, t - 1)],
        &events,
    );
    assert_eq!(early.totals.after.credits, 10);
    let late = run(
        settings(0, 5),
        &["a"],
        vec![grant(1, "a", 10, t + 1)],
        &events,
    );
    assert_eq!(
        late.totals.after.denials.get("insufficient_credits"),
        Some(&1)
    );
}

#[test]
fn unknown_plans_and_accounts_are_named() {
    let accounts = [account("a")];
    let options = ReplayOptions {
        plan: Some("gold".into()),
        ..ReplayOptions::default()
    };
    let e = Replay::new(settings(1, 1), &accounts, Vec::new(), options).err();
    assert_eq!(e, Some(ReplayError::UnknownOverridePlan("gold".into())));
    let mut other = account("b");
    other.plan = "gone".into();
    let e = Replay::new(
        settings(1, 1),
        &[other],
        Vec::new(),
        ReplayOptions::default(),
    )
    .err();
    assert!(matches!(e, Some(ReplayError::UnknownPlan { .. })), "{e:?}");
}
