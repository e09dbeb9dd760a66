//! Resident memory of the cached view with 1,000,000 accounts (each on a two-window plan with
//! one API key and two grants, as loaded from a store).
//!
//!     cargo bench --bench memory

use sha2::{Digest, Sha256};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use flowgate::accounts::{Account, Accounts};
use flowgate::waterfall::{
    AccountState, FeatureId, FeatureSet, Grant, GrantKind, Layer, LayerKind, Plan, PriceTable,
    Window, decide, reserve,
};

const ACCOUNTS: usize = 1_000_000;

/// Counts live heap bytes, so that the bench can say which part of an account costs what
/// (RSS alone adds the allocator's own overhead and cannot split it). Over mimalloc, the
/// allocator `flowgate serve` runs on (`src/main.rs`), so that the RSS is the product's.
struct Counting;
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { INNER.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { INNER.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

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
    // Live heap bytes by part: the account's state (windows, grants), the rest of the account
    // (its struct and id), its place in the map by id, its API key's place in the key map.
    let (mut state_bytes, mut account_bytes, mut by_id_bytes, mut key_bytes) = (0, 0, 0, 0);
    for i in 0..ACCOUNTS {
        let named = live();
        let id: Arc<str> = format!("acct-{i:07}").into();
        account_bytes += live() - named;
        let start = live();
        let grants = vec![
            Grant {
                id: 2 * i as i64,
                kind: GrantKind::Credits,
                balance: 1_000,
                unsettled: 0,
                version: 0,
                expires_at: flowgate::waterfall::NEVER,
                priority: 0,
                features: FeatureSet::ALL,
            },
            Grant {
                id: 2 * i as i64 + 1,
                kind: GrantKind::Promotion,
                balance: 100,
                unsettled: 0,
                version: 0,
                expires_at: now + 86_400_000,
                priority: 0,
                features: FeatureSet::ALL,
            },
        ];
        let mut state = AccountState::new(&plan, grants, now);
        // One request of history in the windows, as after a restart.
        let d = decide(&plan, &state, FeatureId(0), 1, now);
        reserve(&plan, &mut state, &d, now);
        drop(d);
        let stated = live();
        let account = Account::new(id.into(), plan.clone(), false, state);
        let made = live();
        accounts.insert(account);
        let inserted = live();
        // A stored key hash as the admin API writes it: SHA-256 hex of the key.
        let key_hash = hex::encode(Sha256::digest(format!("fg_live_{i}").as_bytes()));
        let keyed = live();
        accounts.insert_key(&key_hash, account_id(&accounts, i));
        key_bytes += live() - keyed;
        state_bytes += stated - start;
        account_bytes += made - stated;
        by_id_bytes += inserted - made;
    }
    let n = accounts.len();
    let after = rss_kib();
    let mib = (after - before) as f64 / 1024.0;
    println!(
        "{n} accounts in the cached view: RSS {:.0} MiB ({:.0} bytes per account; target ≤ 512 MiB)",
        mib,
        (after - before) as f64 * 1024.0 / n as f64
    );
    let per = |bytes: i64| bytes as f64 / n as f64;
    println!(
        "live heap bytes per account: state {:.0}, account and id {:.0}, map by id {:.0}, key map {:.0}",
        per(state_bytes),
        per(account_bytes),
        per(by_id_bytes),
        per(key_bytes),
    );
}

/// The id of account `i` as the view holds it (a clone of its `Arc<str>`, as a load makes).
fn account_id(accounts: &Accounts, i: usize) -> flowgate::ids::AccountId {
    accounts
        .get(&format!("acct-{i:07}"))
        .expect("just inserted")
        .id
        .clone()
}
