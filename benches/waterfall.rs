//! One waterfall decision (decide + reserve + release, as the hot path does per request), for a
//! typical account and a worst case, with the heap allocations counted per decision.
//!
//!     cargo bench --bench waterfall

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::waterfall::{
    AccountState, FeatureId, FeatureSet, Grant, GrantKind, Layer, LayerKind, Period, Plan,
    PriceTable, Tz, Window, decide, release, reserve,
};

/// Counts allocations, to show the decision path makes none, over the allocator
/// `flowgate serve` runs on (mimalloc), so that an allocation costs here what it costs there.
struct Counting;
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TASK: FeatureId = FeatureId(0);
const NOW: i64 = 1_795_428_000_000; // 2026-11-23T10:00:00Z

fn plan() -> Plan {
    let layer = |name: &str, kind| Layer {
        name: name.into(),
        features: FeatureSet::ALL,
        kind,
    };
    Plan {
        name: "pro".into(),
        layers: vec![
            layer(
                "limits",
                LayerKind::UsageLimit {
                    windows: vec![
                        Window::rolling("5h", 300, 50),
                        Window::rolling("week", 10_080, 500),
                    ],
                },
            ),
            layer(
                "free",
                LayerKind::FreeTier {
                    units: 10,
                    period: Period::Month,
                    zone: Tz::UTC,
                },
            ),
            layer("credits", LayerKind::Credits),
            layer("promotions", LayerKind::Promotions),
        ],
        prices: vec![PriceTable::flat("v1", vec![Some(5)])],
        strict: false,
    }
}

/// The same plan with calendar-aligned limits: 50 a day from New York's midnight and 500 a
/// week, a free tier that resets on the 1st in Paris.
fn calendar_plan() -> Plan {
    let mut plan = plan();
    plan.layers[0].kind = LayerKind::UsageLimit {
        windows: vec![
            Window::calendar("day", Period::Day, chrono_tz::America::New_York, 50),
            Window::calendar("week", Period::Week, chrono_tz::America::New_York, 500),
        ],
    };
    plan.layers[1].kind = LayerKind::FreeTier {
        units: 10,
        period: Period::Month,
        zone: chrono_tz::Europe::Paris,
    };
    plan
}

fn grant(id: i64, kind: GrantKind, balance: u64, expires: Option<i64>) -> Grant {
    Grant {
        id,
        kind,
        balance,
        unsettled: 0,
        version: 0,
        expires_at: expires.unwrap_or(flowgate::waterfall::NEVER),
        priority: 0,
        features: FeatureSet::ALL,
    }
}

/// A typical account: both windows used up (history in them), free tier used, two credit
/// grants and a promotion — the request walks every layer and splits across grants.
fn typical(plan: &Plan) -> AccountState {
    let grants = vec![
        grant(1, GrantKind::Credits, 30, Some(NOW + 86_400_000)),
        grant(2, GrantKind::Credits, 100_000_000, None),
        grant(3, GrantKind::Promotion, 50, Some(NOW + 3_600_000)),
    ];
    let mut s = AccountState::new(plan, grants, NOW);
    // 60 units over the last hours: the 5h window is full.
    for m in 0..60 {
        let d = decide(plan, &s, TASK, 1, NOW - (60 - m) * 60_000);
        reserve(plan, &mut s, &d, NOW - (60 - m) * 60_000);
    }
    s
}

/// The worst case: 200 grants, most expired or for other features, walked on every decision.
fn worst(plan: &Plan) -> AccountState {
    let grants = (0..200)
        .map(|i| Grant {
            features: if i % 3 == 0 {
                FeatureSet::EMPTY.with(FeatureId(1))
            } else {
                FeatureSet::ALL
            },
            expires_at: if i % 2 == 0 { NOW - 1 } else { NOW + i * 1000 },
            ..grant(i, GrantKind::Credits, 3, None)
        })
        .collect();
    typical_with(plan, grants)
}

/// A heavy user: one unit every minute for a week, within windows that allow it (300 per 5 hours,
/// 20 000 a week), so the week window counts 10 080 minutes and the 5-hour one is full.
fn week_of_minutes() -> (Plan, AccountState) {
    let mut plan = plan();
    plan.layers[0].kind = LayerKind::UsageLimit {
        windows: vec![
            Window::rolling("5h", 300, 300),
            Window::rolling("week", 10_080, 20_000),
        ],
    };
    let mut s = AccountState::new(
        &plan,
        vec![grant(2, GrantKind::Credits, 100_000_000, None)],
        NOW,
    );
    for m in 0..10_080 {
        let at = NOW - (10_080 - m) * 60_000;
        let d = decide(&plan, &s, TASK, 1, at);
        reserve(&plan, &mut s, &d, at);
    }
    (plan, s)
}

fn typical_with(plan: &Plan, grants: Vec<Grant>) -> AccountState {
    let mut s = typical(plan);
    for g in grants {
        s.add_grant(Grant {
            id: g.id + 1000,
            ..g
        });
    }
    s
}

/// What the hot path does for one request: decide, hold, and (here) release again.
fn one_request(plan: &Plan, s: &mut AccountState, units: u64) -> usize {
    let d = decide(plan, s, TASK, black_box(units), NOW);
    reserve(plan, s, &d, NOW);
    release(plan, s, &d.draws, NOW);
    d.draws.len()
}

fn allocations_per_decision(plan: &Plan, s: &mut AccountState, units: u64) -> f64 {
    const N: u64 = 10_000;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..N {
        black_box(one_request(plan, s, units));
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64
}

fn bench(c: &mut Criterion) {
    let plan = plan();
    let mut s = typical(&plan);
    assert!(decide(&plan, &s, TASK, 40, NOW).admitted());
    let calendar = calendar_plan();
    let mut cal = typical(&calendar);
    println!(
        "allocations per decision: typical {:.2}, worst case {:.2}, calendar windows {:.2}",
        allocations_per_decision(&plan, &mut s, 40),
        allocations_per_decision(&plan, &mut worst(&plan), 40),
        allocations_per_decision(&calendar, &mut cal, 40),
    );
    c.bench_function("decide_typical_split_3_pools", |b| {
        b.iter(|| one_request(&plan, &mut s, 40))
    });
    let mut w = worst(&plan);
    c.bench_function("decide_worst_200_grants", |b| {
        b.iter(|| one_request(&plan, &mut w, 40))
    });
    c.bench_function("decide_typical_calendar_windows", |b| {
        b.iter(|| one_request(&calendar, &mut cal, 40))
    });
    let (week_plan, mut week) = week_of_minutes();
    c.bench_function("decide_week_of_minutes", |b| {
        b.iter(|| one_request(&week_plan, &mut week, 40))
    });
    let mut denied = typical(&plan);
    c.bench_function("decide_denied", |b| {
        b.iter(|| decide(&plan, &denied, TASK, black_box(1_000_000_000), NOW).admitted())
    });
    let _ = &mut denied;
}

criterion_group!(benches, bench);
criterion_main!(benches);
