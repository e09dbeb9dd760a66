//! Resident memory of the cached view with 1,000,000 accounts (each on a two-window plan with
//! one API key and two grants, as loaded from a store).
//!
//!     cargo bench --bench memory

use std::sync::Arc;

use flowgate::accounts::{Account, Accounts};
use flowgate::waterfall::{
    AccountState, FeatureId, FeatureSet, Grant, GrantKind, Layer, LayerKind, Plan, PriceTable,
    Window, decide, reserve,
};

const ACCOUNTS: usize = 1_000_000;

/// The process's resident memory; a machine that cannot say fails the bench rather than
/// report 0 MiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .expect("VmRSS in /proc/self/status: this bench needs Linux's /proc")
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: only measure for the former.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let plan = Arc::new(Plan {
        name: "pro".into(),
        layers: vec![
            Layer {
                name: "limits".into(),
                features: FeatureSet::ALL,
                kind: LayerKind::UsageLimit {
                    windows: vec![
                        Window::rolling("5h", 300, 50),
                        Window::rolling("week", 10_080, 500),
                    ],
                },
            },
            Layer {
                name: "credits".into(),
                features: FeatureSet::ALL,
                kind: LayerKind::Credits,
            },
        ],
        prices: vec![PriceTable::flat("v1", vec![Some(5)])],
        strict: false,
    });
    let now = 1_795_428_000_000;
    let before = rss_kib();
    let accounts = Accounts::new();
    for i in 0..ACCOUNTS {
        let id: Arc<str> = format!("acct-{i:07}").into();
        let grants = vec![
            Grant {
                id: 2 * i as i64,
                kind: GrantKind::Credits,
                balance: 1_000,
                unsettled: 0,
                expires_at: None,
                priority: 0,
                features: FeatureSet::ALL,
            },
            Grant {
                id: 2 * i as i64 + 1,
                kind: GrantKind::Promotion,
                balance: 100,
                unsettled: 0,
                expires_at: Some(now + 86_400_000),
                priority: 0,
                features: FeatureSet::ALL,
            },
        ];
        let mut state = AccountState::new(&plan, grants, now);
        // One request of history in the windows, as after a restart.
        let d = decide(&plan, &state, FeatureId(0), 1, now);
        reserve(&plan, &mut state, &d, now);
        accounts.insert_key(&format!("{:064x}", i), id.clone().into());
        accounts.insert(Account::new(id.into(), plan.clone(), false, state));
    }
    let n = accounts.len();
    let after = rss_kib();
    let mib = (after - before) as f64 / 1024.0;
    println!(
        "{n} accounts in the cached view: RSS {:.0} MiB ({:.0} bytes per account; target < 1024 MiB)",
        mib,
        (after - before) as f64 * 1024.0 / n as f64
    );
}
