//! Unit and property tests of the engine. Time is passed in, so every boundary is exact.

use proptest::prelude::*;

use super::*;

const TASK: FeatureId = FeatureId(0);
const VIDEO: FeatureId = FeatureId(1);
const MIN: Millis = MINUTE_MS;
const HOUR: Millis = 60 * MIN;

/// 2026-11-23 10:00:00 UTC, a Monday.
fn t0() -> Millis {
    Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0)
        .single()
        .map(|t| t.timestamp_millis())
        .expect("valid instant")
}

fn window(name: &str, minutes: u32, limit: Units) -> Window {
    Window::rolling(name, minutes, limit)
}

fn layer(name: &str, kind: LayerKind) -> Layer {
    Layer {
        name: name.into(),
        features: FeatureSet::ALL,
        kind,
    }
}

fn grant(id: i64, kind: GrantKind, balance: Credits) -> Grant {
    Grant {
        id,
        kind,
        balance,
        unsettled: 0,
        version: 0,
        expires_at: NEVER,
        priority: 0,
        features: FeatureSet::ALL,
    }
}

/// Limits (5h: 3, week: 10) → free tier (2 a day) → credits → promotions; a task costs 5
/// credits, a video second 2.
fn plan() -> Plan {
    Plan {
        name: "pro".into(),
        layers: vec![
            layer(
                "limits",
                LayerKind::UsageLimit {
                    windows: vec![window("5h", 300, 3), window("week", 7 * 24 * 60, 10)],
                },
            ),
            layer(
                "free",
                LayerKind::FreeTier {
                    units: 2,
                    period: Period::Day,
                    zone: Tz::UTC,
                },
            ),
            layer("credits", LayerKind::Credits),
            layer("promotions", LayerKind::Promotions),
        ],
        prices: vec![PriceTable::flat("v1", vec![Some(5), Some(2)])],
        strict: false,
    }
}

fn admit(
    plan: &Plan,
    state: &mut AccountState,
    feature: FeatureId,
    units: Units,
    now: Millis,
) -> Decision {
    let d = decide(plan, state, feature, units, now);
    assert!(
        d.admitted(),
        "expected admission of {units}: {:?}",
        d.denial
    );
    reserve(plan, state, &d, now);
    d
}

fn pools(d: &Decision) -> Vec<(u8, Units, Credits)> {
    d.draws
        .iter()
        .map(|x| (x.layer, x.units, x.credits))
        .collect()
}

#[test]
fn a_plan_keeps_its_state_layout_only_with_the_same_stateful_layers() {
    let pro = plan();
    // Other limits, prices and grant layers: the same layout.
    let mut cheaper = plan();
    cheaper.prices = vec![PriceTable::flat("v1", vec![Some(1), Some(1)])];
    cheaper.layers[0].kind = LayerKind::UsageLimit {
        windows: vec![window("5h", 300, 30)],
    };
    cheaper.layers[3].kind = LayerKind::Credits;
    assert!(pro.same_state_layout(&cheaper));
    assert!(pro.same_state_layout(&pro));
    // A longer window than was kept for: its older usage was pruned.
    let mut longer = plan();
    longer.layers[0].kind = LayerKind::UsageLimit {
        windows: vec![window("month", 30 * 24 * 60, 100)],
    };
    assert!(!pro.same_state_layout(&longer));
    assert!(longer.same_state_layout(&pro));
    // Another free-tier period, layers swapped, one layer fewer, a concurrency gate instead.
    let mut weekly = plan();
    weekly.layers[1].kind = LayerKind::FreeTier {
        units: 2,
        period: Period::Week,
        zone: Tz::UTC,
    };
    assert!(!pro.same_state_layout(&weekly));
    let mut swapped = plan();
    swapped.layers.swap(0, 1);
    assert!(!pro.same_state_layout(&swapped));
    let mut fewer = plan();
    fewer.layers.pop();
    assert!(!pro.same_state_layout(&fewer));
    let mut gated = plan();
    gated.layers[2].kind = LayerKind::Concurrency { limit: 2 };
    assert!(!pro.same_state_layout(&gated));
    let mut limits_as_gate = plan();
    limits_as_gate.layers[0].kind = LayerKind::Concurrency { limit: 2 };
    assert!(!pro.same_state_layout(&limits_as_gate));
    let mut no_limits = plan();
    no_limits.layers[0].kind = LayerKind::Credits;
    assert!(!pro.same_state_layout(&no_limits));
    let mut no_free_tier = plan();
    no_free_tier.layers[1].kind = LayerKind::Promotions;
    assert!(!pro.same_state_layout(&no_free_tier));
}

#[test]
fn stored_names_round_trip_and_tags_are_the_documented_ones() {
    for kind in [
        GrantKind::Credits,
        GrantKind::Promotion,
        GrantKind::Enterprise,
    ] {
        assert_eq!(GrantKind::parse(kind.as_str()), Some(kind));
    }
    assert_eq!(GrantKind::Enterprise.as_str(), "enterprise");
    assert_eq!(GrantKind::parse("Credits"), None);
    let tags: Vec<&str> = [
        LayerKind::UsageLimit { windows: vec![] },
        LayerKind::FreeTier {
            units: 1,
            period: Period::Day,
            zone: Tz::UTC,
        },
        LayerKind::Credits,
        LayerKind::Promotions,
        LayerKind::Enterprise { postpaid: false },
        LayerKind::Enterprise { postpaid: true },
        LayerKind::Concurrency { limit: 1 },
    ]
    .iter()
    .map(LayerKind::tag)
    .collect();
    assert_eq!(
        tags,
        [
            "usage_limit",
            "free_tier",
            "credits",
            "promotions",
            "enterprise_pool",
            "enterprise_postpaid",
            "concurrency"
        ]
    );
}

#[test]
fn usage_just_outside_a_window_does_not_bring_its_reset_forward() {
    let w = window("10m", 10, 3);
    let now_minute = t0() / MIN;
    let mut log = UsageLog::default();
    log.add(now_minute - 10, 1, 0); // one minute before the window: not counted
    log.add(now_minute - 5, 3, 0); // fills it
    assert_eq!(log.used(&w, t0()), 3);
    // One unit is free when the minute-5 usage slides out, not the minute-10 one.
    assert_eq!(log.free_at(&w, 1, t0()), Some(t0() + 5 * MIN));
}

#[test]
fn a_log_forgets_exactly_the_minutes_no_window_can_count() {
    let m = t0() / MIN;
    let mut log = UsageLog::default();
    log.add(m, 1, 0);
    log.add(m + 1, 2, 1);
    log.prune(10, (m + 10) * MIN);
    let kept: Vec<(i64, u64, u64)> = log
        .buckets
        .iter()
        .map(|b| (b.minute, b.used, b.unsettled))
        .collect();
    assert_eq!(kept, [(m + 1, 2, 1)]);
}

#[test]
fn settling_last_periods_free_tier_leaves_this_periods_holds() {
    let plan = Plan {
        layers: vec![layer(
            "free",
            LayerKind::FreeTier {
                units: 2,
                period: Period::Day,
                zone: Tz::UTC,
            },
        )],
        ..plan()
    };
    let mut s = AccountState::new(&plan, vec![], t0());
    let yesterday = admit(&plan, &mut s, TASK, 1, t0());
    let today = t0() + 24 * HOUR;
    admit(&plan, &mut s, TASK, 1, today); // still held
    s.settled(&yesterday.draws);
    // Rebuilt from a store with nothing committed today: today's hold is still counted.
    s.resync_usage(&plan, &[], today);
    assert_eq!(s.free_tier_used(0, Period::Day.bounds(Tz::UTC, today).0), 1);
}

#[test]
fn a_reloaded_feature_table_renumbers_what_a_grant_pays_for() {
    let plan = Plan {
        layers: vec![layer("credits", LayerKind::Credits)],
        ..plan()
    };
    let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 100)], t0());
    assert!(decide(&plan, &s, TASK, 1, t0()).admitted());
    s.set_grant_features(1, FeatureSet::EMPTY.with(VIDEO));
    assert!(!decide(&plan, &s, TASK, 1, t0()).admitted());
    assert!(decide(&plan, &s, VIDEO, 1, t0()).admitted());
}

#[test]
fn a_replica_that_missed_announcements_catches_up_by_resync() {
    let plan = plan();
    let mut a = AccountState::new(&plan, vec![], t0());
    let mut b = a.clone();
    let d = admit(&plan, &mut a, TASK, 4, t0()); // 3 from the 5h window, 1 from the free tier
    a.settled(&d.draws);
    let used = |s: &AccountState| observable(&plan, s, t0()).0;
    assert_eq!(used(&b), vec![0, 0, 0], "B heard nothing");
    b.resync_usage(&plan, &d.draws, t0());
    assert_eq!(used(&b), used(&a));
    assert_eq!(used(&b), vec![3, 3, 1]);
    // A refund of the free-tier unit counts it out; one of another day changes nothing.
    let free: Vec<Draw> = d
        .draws
        .iter()
        .filter(|x| matches!(x.pool, Pool::FreeTier { .. }))
        .copied()
        .collect();
    let mut old = free.clone();
    if let Pool::FreeTier { period_start } = &mut old[0].pool {
        *period_start -= 24 * HOUR;
    }
    b.unobserve(&old[0]);
    assert_eq!(used(&b), vec![3, 3, 1]);
    b.unobserve(&free[0]);
    assert_eq!(used(&b), vec![3, 3, 0]);
}

#[test]
fn a_layer_used_up_says_when_it_has_room_again() {
    let plan = plan();
    let mut s = AccountState::new(&plan, vec![], t0());
    admit(&plan, &mut s, TASK, 1, t0());
    let later = t0() + 10 * MIN;
    // Two more fill the 5h window: the next unit is free when the first slides out.
    let d = admit(&plan, &mut s, TASK, 2, later);
    assert_eq!(d.layers[0].reset_at, Some(t0() + 300 * MIN));
    // The free tier: one of two left, then both used: free again at the day's end.
    let day_end = Period::Day.bounds(Tz::UTC, later).1;
    let d = admit(&plan, &mut s, TASK, 1, later);
    assert_eq!((d.layers[1].gave_units, d.layers[1].reset_at), (1, None));
    let d = decide(&plan, &s, TASK, 1, later);
    assert_eq!(d.layers[1].reset_at, Some(day_end));
    // A window with room left says nothing.
    let fresh = AccountState::new(&plan, vec![], t0());
    assert_eq!(
        decide(&plan, &fresh, TASK, 1, t0()).layers[0].reset_at,
        None
    );
}

#[test]
fn a_feature_set_holds_a_feature_named_twice() {
    let set = FeatureSet::EMPTY.with(TASK).with(TASK);
    assert!(set.contains(TASK));
    assert!(!set.contains(VIDEO));
    assert!(FeatureSet::EMPTY.with(VIDEO).with(TASK).contains(VIDEO));
}

#[test]
fn two_windows_each_with_its_reset_time() {
    let plan = plan();
    let mut s = AccountState::new(&plan, vec![], t0());
    admit(&plan, &mut s, TASK, 3, t0());
    // The 5h window is full; the free tier pays the next 2; then nothing can.
    let d = admit(&plan, &mut s, TASK, 2, t0() + MIN);
    assert_eq!(pools(&d), vec![(1, 2, 0)]);
    let d = decide(&plan, &s, TASK, 1, t0() + 2 * MIN);
    assert_eq!(
        d.denial,
        Some(Denial::UsageLimitReached {
            retry_at: t0() + 300 * MIN
        })
    );
    let status: Vec<(Units, Units, Millis)> = s
        .windows(&plan, 0, t0() + 2 * MIN)
        .map(|w| (w.used, w.remaining, w.reset_at))
        .collect();
    assert_eq!(
        status,
        vec![(3, 0, t0() + 300 * MIN), (3, 7, t0() + 7 * 24 * HOUR)]
    );
}

#[test]
fn a_rolling_window_frees_usage_at_exactly_its_minute() {
    let plan = Plan {
        layers: vec![layer(
            "limits",
            LayerKind::UsageLimit {
                windows: vec![window("5h", 300, 3)],
            },
        )],
        ..plan()
    };
    let mut s = AccountState::new(&plan, vec![], t0());
    admit(&plan, &mut s, TASK, 2, t0() + 30 * 1000); // minute 0
    admit(&plan, &mut s, TASK, 1, t0() + 10 * MIN); // minute 10
    let last_ms_before = t0() + 300 * MIN - 1;
    assert!(!decide(&plan, &s, TASK, 1, last_ms_before).admitted());
    assert_eq!(
        decide(&plan, &s, TASK, 1, last_ms_before).denial,
        Some(Denial::UsageLimitReached {
            retry_at: t0() + 300 * MIN
        })
    );
    // Minute 300: the two units of minute 0 slid out; minute 10's unit still counts.
    assert!(decide(&plan, &s, TASK, 2, t0() + 300 * MIN).admitted());
    assert!(!decide(&plan, &s, TASK, 3, t0() + 300 * MIN).admitted());
    assert!(decide(&plan, &s, TASK, 3, t0() + 310 * MIN).admitted());
}

#[test]
fn a_free_tier_resets_at_its_period_boundary() {
    for (period, end) in [
        (Period::Day, Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0)),
        (Period::Week, Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0)),
        (Period::Month, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)),
    ] {
        let end = end.single().expect("instant").timestamp_millis();
        let plan = Plan {
            layers: vec![layer(
                "free",
                LayerKind::FreeTier {
                    units: 4,
                    period,
                    zone: Tz::UTC,
                },
            )],
            ..plan()
        };
        let mut s = AccountState::new(&plan, vec![], t0());
        admit(&plan, &mut s, TASK, 4, t0());
        assert_eq!(period.bounds(Tz::UTC, t0()).1, end, "{period:?}");
        let d = decide(&plan, &s, TASK, 1, end - MIN);
        assert!(!d.admitted(), "{period:?}: the minute before the boundary");
        let d = admit(&plan, &mut s, TASK, 4, end);
        assert_eq!(pools(&d), vec![(0, 4, 0)], "{period:?}: the boundary");
    }
}

#[test]
fn grants_are_spent_by_priority_then_earliest_expiry_and_never_once_expired() {
    let plan = Plan {
        layers: vec![layer("credits", LayerKind::Credits)],
        ..plan()
    };
    let grants = vec![
        Grant {
            expires_at: NEVER,
            ..grant(1, GrantKind::Credits, 10)
        },
        Grant {
            expires_at: t0() + HOUR,
            ..grant(2, GrantKind::Credits, 10)
        },
        Grant {
            expires_at: t0() + 2 * HOUR,
            ..grant(3, GrantKind::Credits, 10)
        },
        Grant {
            priority: -1, // spent first, whatever its expiry
            expires_at: NEVER,
            ..grant(4, GrantKind::Credits, 5)
        },
    ];
    let mut s = AccountState::new(&plan, grants, t0());
    let d = admit(&plan, &mut s, TASK, 4, t0()); // 20 credits
    let by_grant: Vec<(Pool, Credits)> = d.draws.iter().map(|x| (x.pool, x.credits)).collect();
    assert_eq!(
        by_grant,
        vec![
            (Pool::Grant { grant_id: 4 }, 5),
            (Pool::Grant { grant_id: 2 }, 10),
            (Pool::Grant { grant_id: 3 }, 5),
        ]
    );
    // At its expiry grant 3 (5 left) is gone: 10 remain in grant 1.
    assert_eq!(s.spendable_credits(TASK, t0() + 2 * HOUR - 1), 15);
    assert_eq!(s.spendable_credits(TASK, t0() + 2 * HOUR), 10);
    let d = admit(&plan, &mut s, TASK, 2, t0() + 2 * HOUR);
    assert_eq!(d.draws[0].pool, Pool::Grant { grant_id: 1 });
    assert!(!decide(&plan, &s, TASK, 1, t0() + 2 * HOUR).admitted());
}

#[test]
fn a_promotion_limited_to_a_feature_pays_for_nothing_else() {
    let plan = Plan {
        layers: vec![layer("promotions", LayerKind::Promotions)],
        ..plan()
    };
    let promo = Grant {
        features: FeatureSet::EMPTY.with(VIDEO),
        ..grant(1, GrantKind::Promotion, 100)
    };
    let s = AccountState::new(&plan, vec![promo], t0());
    assert!(decide(&plan, &s, VIDEO, 5, t0()).admitted());
    assert_eq!(
        decide(&plan, &s, TASK, 1, t0()).denial,
        Some(Denial::InsufficientCredits {
            needed_credits: 5,
            available_credits: 0
        })
    );
}

#[test]
fn an_enterprise_pool_pays_then_postpaid_is_unlimited() {
    let pool = Plan {
        layers: vec![layer("contract", LayerKind::Enterprise { postpaid: false })],
        ..plan()
    };
    let mut s = AccountState::new(&pool, vec![grant(7, GrantKind::Enterprise, 12)], t0());
    let d = admit(&pool, &mut s, VIDEO, 6, t0());
    assert_eq!(d.credits(), 12);
    assert!(!decide(&pool, &s, VIDEO, 1, t0()).admitted());

    let postpaid = Plan {
        layers: vec![layer("contract", LayerKind::Enterprise { postpaid: true })],
        ..plan()
    };
    let s = AccountState::new(&postpaid, vec![], t0());
    let d = decide(&postpaid, &s, TASK, 1_000_000, t0());
    assert!(d.admitted());
    assert_eq!(d.draws[0].pool, Pool::Postpaid);
    assert_eq!(d.credits(), 5_000_000);
    assert_eq!(
        (d.layers[0].gave_units, d.layers[0].gave_credits),
        (1_000_000, 5_000_000),
        "the decision's record says what postpaid gave"
    );
}

#[test]
fn layers_after_the_request_is_covered_add_no_empty_draws() {
    let postpaid = Plan {
        layers: vec![
            layer("credits", LayerKind::Credits),
            layer("contract", LayerKind::Enterprise { postpaid: true }),
        ],
        ..plan()
    };
    let s = AccountState::new(&postpaid, vec![grant(1, GrantKind::Credits, 100)], t0());
    assert_eq!(pools(&decide(&postpaid, &s, TASK, 1, t0())), [(0, 1, 5)]);
    // A request of nothing (a stated cost of 0) draws from nobody, postpaid included.
    let d = decide(&postpaid, &s, TASK, 0, t0());
    assert!(d.admitted());
    assert_eq!(pools(&d), []);

    // A free feature: the window first, then a grant layer covers the rest at no charge.
    let free = Plan {
        layers: vec![
            layer(
                "limits",
                LayerKind::UsageLimit {
                    windows: vec![window("5h", 300, 3)],
                },
            ),
            layer("credits", LayerKind::Credits),
            layer("promotions", LayerKind::Promotions),
        ],
        prices: vec![PriceTable::flat("v1", vec![Some(0), Some(0)])],
        ..plan()
    };
    let s = AccountState::new(&free, vec![grant(1, GrantKind::Credits, 100)], t0());
    assert_eq!(pools(&decide(&free, &s, TASK, 1, t0())), [(0, 1, 0)]);
    let d = decide(&free, &s, TASK, 4, t0());
    assert_eq!(pools(&d), [(0, 3, 0), (1, 1, 0)]);
    assert_eq!(d.draws[1].pool, Pool::NoCharge);
    assert_eq!((d.layers[1].gave_units, d.layers[1].gave_credits), (1, 0));
    assert_eq!(
        d.layers.len(),
        2,
        "the walk stops at the layer that covered it"
    );
}

#[test]
fn an_exhausted_free_tier_adds_no_empty_draw() {
    let plan = plan();
    let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 100)], t0());
    admit(&plan, &mut s, TASK, 5, t0()); // 3 from the window, 2 from the free tier
    let d = admit(&plan, &mut s, TASK, 1, t0());
    assert_eq!(pools(&d), [(2, 1, 5)], "credits only");
}

#[test]
fn a_request_splits_across_layers_and_credit_units_do_not_count_against_windows() {
    let plan = plan();
    let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 100)], t0());
    let d = admit(&plan, &mut s, TASK, 8, t0());
    assert_eq!(pools(&d), vec![(0, 3, 0), (1, 2, 0), (2, 3, 15)]);
    assert_eq!(d.draws.iter().map(|x| x.units).sum::<Units>(), 8);
    let week: Vec<Units> = s.windows(&plan, 0, t0()).map(|w| w.used).collect();
    assert_eq!(week, vec![3, 3], "only the included units count");
    let report: Vec<(Units, Units)> = d
        .layers
        .iter()
        .map(|r| (r.available_units, r.gave_units))
        .collect();
    assert_eq!(report, vec![(3, 3), (2, 2), (20, 3)]);
}

#[test]
fn denials_say_why_and_change_nothing() {
    let plan = plan();
    let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 12)], t0());
    admit(&plan, &mut s, TASK, 5, t0()); // limits and free tier used up
    let (layers, grants) = (s.layers.clone(), s.grants.clone());
    // 3 units: 2 can be paid (10 of 12 credits), 1 cannot; the week window has room but the
    // 5h one frees only later, and then waiting helps.
    let d = decide(&plan, &s, TASK, 3, t0() + MIN);
    assert!(matches!(d.denial, Some(Denial::UsageLimitReached { .. })));
    assert!(d.draws.is_empty());
    // More than any window could ever hold: only credits could, and they are short.
    let d = decide(&plan, &s, TASK, 40, t0() + MIN);
    assert_eq!(
        d.denial,
        Some(Denial::InsufficientCredits {
            needed_credits: 190,
            available_credits: 12
        })
    );
    let not_entitled = decide(&plan, &s, FeatureId(2), 1, t0());
    assert_eq!(not_entitled.denial, Some(Denial::NotEntitled));
    assert_eq!((s.layers, s.grants), (layers, grants));
}

#[test]
fn release_after_reserve_restores_the_state() {
    let plan = plan();
    let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 100)], t0());
    let (layers, grants) = (s.layers.clone(), s.grants.clone());
    let d = admit(&plan, &mut s, TASK, 8, t0());
    assert_eq!(s.grants[0].balance, 85);
    assert_eq!(s.grants[0].unsettled, 15);
    release(&plan, &mut s, &d.draws, t0() + MIN);
    assert_eq!((s.layers, s.grants), (layers, grants));
}

#[test]
fn grants_short_of_a_whole_unit_give_back_the_part_and_the_next_layer_pays() {
    let plan = plan();
    let promo = Grant {
        priority: 0,
        ..grant(9, GrantKind::Promotion, 100)
    };
    let grants = vec![
        grant(1, GrantKind::Credits, 3),
        grant(2, GrantKind::Credits, 4),
        promo,
    ];
    let mut s = AccountState::new(&plan, grants, t0());
    let before = s.grants.clone();
    // 7 tasks: 3 from the window, 2 free; the credits hold 7 (one task at 5, and 2 over),
    // so they pay one task, grant 2 keeps the 2 over, and the promotion pays the last.
    let d = admit(&plan, &mut s, TASK, 7, t0());
    assert_eq!(
        pools(&d),
        vec![(0, 3, 0), (1, 2, 0), (2, 1, 3), (2, 0, 2), (3, 1, 5)]
    );
    let balances = |s: &AccountState| -> Vec<(i64, Credits, Credits)> {
        s.grants
            .iter()
            .map(|g| (g.id, g.balance, g.unsettled))
            .collect()
    };
    assert_eq!(balances(&s), vec![(1, 0, 3), (2, 2, 2), (9, 95, 5)]);

    // The draws as the store gives them back (no hint of where each grant was), after a grant
    // that sorts first was added: each still finds its own grant.
    let stored: Vec<Draw> =
        serde_json::from_str(&serde_json::to_string(&d.draws).expect("serialize"))
            .expect("deserialize");
    assert_eq!(stored.as_slice(), d.draws.as_slice());
    s.add_grant(Grant {
        priority: -1,
        ..grant(7, GrantKind::Credits, 50)
    });
    release(&plan, &mut s, &stored, t0() + MIN);
    let mut expected: Vec<(i64, Credits, Credits)> =
        before.iter().map(|g| (g.id, g.balance, 0)).collect();
    expected.insert(0, (7, 50, 0));
    assert_eq!(balances(&s), expected);
}

#[test]
fn trim_gives_back_the_last_pools_first_at_the_price() {
    let plan = plan();
    let mut s = AccountState::new(
        &plan,
        vec![
            grant(1, GrantKind::Credits, 7),
            grant(2, GrantKind::Credits, 100),
        ],
        t0(),
    );
    let mut d = admit(&plan, &mut s, TASK, 9, t0()); // 3 + 2 + 4 units (20 credits: 7 + 13)
    let released = trim(&mut d.draws, 3, 5);
    assert_eq!(released.iter().map(|x| x.credits).sum::<Credits>(), 15);
    assert_eq!(released.iter().map(|x| x.units).sum::<Units>(), 3);
    // Grant 2 (drawn last) gives back first: 13 → 0 taken back... then 2 from grant 1.
    assert_eq!(released[0].pool, Pool::Grant { grant_id: 2 });
    let credit_units: Units = d
        .draws
        .iter()
        .filter(|x| x.layer == 2)
        .map(|x| x.units)
        .sum();
    let credit_credits: Credits = d
        .draws
        .iter()
        .filter(|x| x.layer == 2)
        .map(|x| x.credits)
        .sum();
    assert_eq!((credit_units, credit_credits), (1, 5));
    release(&plan, &mut s, &released, t0());
    assert_eq!(s.spendable_credits(TASK, t0()), 107 - 5);
    // Trimming past the credits reaches the free tier, then the window.
    let released = trim(&mut d.draws, 3, 5);
    assert_eq!(
        pools(&released.into_iter().collect()),
        vec![(2, 1, 5), (1, 2, 0)]
    );
}

/// A [`Decision`] holding `draws`, for [`pools`].
impl From<SmallVec<[Draw; 4]>> for Decision {
    fn from(draws: SmallVec<[Draw; 4]>) -> Decision {
        Decision {
            feature: TASK,
            units: 0,
            credits_per_unit: 0,
            price_table: 0,
            denial: None,
            draws,
            layers: SmallVec::new(),
        }
    }
}

impl FromIterator<Draw> for Decision {
    fn from_iter<I: IntoIterator<Item = Draw>>(iter: I) -> Decision {
        Decision::from(iter.into_iter().collect::<SmallVec<[Draw; 4]>>())
    }
}

fn ongoing() -> Ongoing {
    Ongoing {
        feature: TASK,
        price_table: 0,
    }
}

/// More units for a running request: at the price version it was decided under (not the one
/// in force now), all or nothing, and not refused by the concurrency slot it holds itself.
#[test]
fn an_ongoing_request_extends_at_its_own_price_past_its_own_slot() {
    let mut plan = Plan {
        layers: vec![
            layer("gate", LayerKind::Concurrency { limit: 1 }),
            layer("credits", LayerKind::Credits),
        ],
        ..plan()
    };
    let mut later = PriceTable::flat("v2", vec![Some(7), Some(2)]);
    later.effective_from = t0() + HOUR;
    plan.prices.push(later);
    let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 40)], t0());
    let d = admit(&plan, &mut s, TASK, 2, t0());
    start_request(&plan, &mut s, TASK);
    assert!(
        !decide(&plan, &s, TASK, 1, t0()).admitted(),
        "the slot is taken"
    );
    let more = extend_in(&plan, &s, None, d.ongoing(), 3, t0() + 2 * HOUR);
    assert!(more.admitted(), "{:?}", more.denial);
    assert_eq!(
        (more.price_table, more.credits()),
        (0, 15),
        "priced at v1's 5"
    );
    reserve(&plan, &mut s, &more, t0() + 2 * HOUR);
    // 15 credits left: 4 more units cost 20, refused whole; cover_up_to gives the 3 it can.
    let refused = extend_in(&plan, &s, None, d.ongoing(), 4, t0() + 2 * HOUR);
    assert!(matches!(
        refused.denial,
        Some(Denial::InsufficientCredits { .. })
    ));
    let (part, uncovered) = cover_up_to(&plan, &s, d.ongoing(), 4, t0() + 2 * HOUR);
    assert_eq!((part.map(|p| p.units), uncovered), (Some(3), 1));
}

#[test]
fn cover_up_to_covers_what_it_can_and_reports_the_rest() {
    let plan = Plan {
        layers: vec![layer("credits", LayerKind::Credits)],
        ..plan()
    };
    let s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 23)], t0());
    let (d, uncovered) = cover_up_to(&plan, &s, ongoing(), 10, t0());
    assert_eq!(d.map(|d| d.credits()), Some(20));
    assert_eq!(uncovered, 6);
    let (d, uncovered) = cover_up_to(&plan, &s, ongoing(), 2, t0());
    assert_eq!((d.map(|d| d.units), uncovered), (Some(2), 0));
    let empty = AccountState::new(&plan, vec![], t0());
    assert_eq!(cover_up_to(&plan, &empty, ongoing(), 3, t0()).1, 3);
}

#[test]
fn sync_takes_the_committed_balance_minus_what_is_unsettled() {
    let plan = Plan {
        layers: vec![layer("credits", LayerKind::Credits)],
        ..plan()
    };
    let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 100)], t0());
    let d = admit(&plan, &mut s, TASK, 4, t0()); // 20 held
    // Another replica spent 50: the store says 50 left of what we have not debited yet.
    assert!(s.sync_grant(1, 50, Some(1)));
    assert_eq!(s.grants[0].balance, 30);
    // Our charge commits: 30 committed, nothing unsettled.
    s.settled(&d.draws);
    assert!(s.sync_grant(1, 30, Some(2)));
    assert_eq!((s.grants[0].balance, s.grants[0].unsettled), (30, 0));
    assert!(!s.sync_grant(9, 1, Some(1)), "an unknown grant is reported");
}

/// A replica's own commit is applied at once, another replica's notice when the listener gets
/// to it: a notice of an earlier commit can arrive after a newer balance. Its version is lower,
/// and it must not give back what was spent since.
#[test]
fn a_balance_heard_late_does_not_replace_a_newer_one() {
    let plan = Plan {
        layers: vec![layer("credits", LayerKind::Credits)],
        ..plan()
    };
    let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 100)], t0());
    // Our commit took the grant to version 4 and 10 credits (others spent the rest first).
    assert!(s.sync_grant(1, 10, Some(4)));
    // Another replica's commit of version 3 (balance 60 then) is heard only now.
    assert!(s.sync_grant(1, 60, Some(3)), "a known grant");
    assert_eq!(s.grants[0].balance, 10, "the older balance changes nothing");
    let d = decide(&plan, &s, TASK, 3, t0()); // 15 credits
    assert!(!d.admitted(), "10 credits cannot pay for 15");
    // A newer one applies; so does the same version again (the same committed balance, with
    // what is unsettled now), and one whose version is not known (an older replica's).
    assert!(s.sync_grant(1, 40, Some(5)));
    assert_eq!(s.grants[0].balance, 40);
    let held = admit(&plan, &mut s, TASK, 2, t0()); // 10 held
    assert_eq!(s.grants[0].balance, 30);
    assert!(s.sync_grant(1, 40, Some(5)));
    assert_eq!(s.grants[0].balance, 30);
    assert!(s.sync_grant(1, 25, None));
    assert_eq!((s.grants[0].balance, s.grants[0].version), (15, 5));
    release(&plan, &mut s, &held.draws, t0());
    assert_eq!(s.grants[0].balance, 25);
}

#[test]
fn usage_is_committed_or_unsettled_and_a_resync_keeps_what_is_held() {
    let plan = plan();
    let mut a = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 100)], t0());
    let mut b = a.clone();
    let held = admit(&plan, &mut a, TASK, 1, t0()); // in flight on A
    let done = admit(&plan, &mut a, TASK, 1, t0()); // committed by A
    a.settled(&done.draws);
    for d in &done.draws {
        b.observe(&plan, d, t0()); // announced to B
    }
    let used = |s: &AccountState| observable(&plan, s, t0()).0;
    assert_eq!(used(&a), vec![2, 2, 0]);
    assert_eq!(
        used(&b),
        vec![1, 1, 0],
        "B counts what A committed, not what A holds"
    );
    // A resync from the store (which has `done` only) keeps A's hold.
    let before = a.clone();
    a.resync_usage(&plan, &done.draws, t0());
    assert_eq!(a.layers, before.layers);
    // The hold is released: gone from A; a refund of `done` is gone from both.
    release(&plan, &mut a, &held.draws, t0());
    for d in &done.draws {
        a.unobserve(d);
        b.unobserve(d);
    }
    assert_eq!(used(&a), vec![0, 0, 0]);
    assert_eq!(used(&b), vec![0, 0, 0]);
}

#[test]
fn a_window_counted_past_its_limit_denies_and_reports_zero_left() {
    let plan = Plan {
        layers: plan().layers[..1].to_vec(),
        ..plan()
    };
    let mut s = AccountState::new(&plan, vec![], t0());
    // Two replicas each admitted 3 of the 5h window's 3 within each other's lag.
    let d = admit(&plan, &mut s, TASK, 3, t0());
    for draw in &d.draws {
        s.observe(&plan, draw, t0());
    }
    let w: Vec<_> = s.windows(&plan, 0, t0()).collect();
    assert_eq!((w[0].used, w[0].remaining), (6, 0));
    assert_eq!(w[0].reset_at, t0() + 300 * MIN);
    assert!(!decide(&plan, &s, TASK, 1, t0()).admitted());
}

#[test]
fn another_replica_can_start_the_next_free_tier_period() {
    let plan = Plan {
        layers: vec![layer(
            "free",
            LayerKind::FreeTier {
                units: 2,
                period: Period::Day,
                zone: Tz::UTC,
            },
        )],
        ..plan()
    };
    let mut a = AccountState::new(&plan, vec![], t0());
    let mut b = a.clone();
    let tomorrow = t0() + 24 * HOUR;
    let d = admit(&plan, &mut a, TASK, 2, tomorrow);
    for draw in &d.draws {
        b.observe(&plan, draw, tomorrow);
    }
    assert!(!decide(&plan, &b, TASK, 1, tomorrow).admitted());
}

// ---- properties ----

#[derive(Debug, Clone)]
struct Model {
    plan: Plan,
    grants: Vec<Grant>,
}

fn model() -> impl Strategy<Value = Model> {
    let windows = prop::collection::vec((1u32..600, 1u64..20), 0..3);
    let free = prop::option::of((1u64..10, prop_oneof![Just(Period::Day), Just(Period::Week)]));
    let grants = prop::collection::vec(
        (
            1u64..200,
            prop::option::of(1i64..2_000),
            -1i32..2,
            prop::bool::weighted(0.3),
            prop::bool::weighted(0.5),
        ),
        0..5,
    );
    (windows, free, grants, 0u64..7).prop_map(|(windows, free, grants, price)| {
        let mut layers = Vec::new();
        if !windows.is_empty() {
            layers.push(layer(
                "limits",
                LayerKind::UsageLimit {
                    windows: windows
                        .iter()
                        .enumerate()
                        .map(|(i, (m, l))| window(&format!("w{i}"), *m, *l))
                        .collect(),
                },
            ));
        }
        if let Some((units, period)) = free {
            layers.push(layer(
                "free",
                LayerKind::FreeTier {
                    units,
                    period,
                    zone: Tz::UTC,
                },
            ));
        }
        layers.push(layer("credits", LayerKind::Credits));
        layers.push(layer("promotions", LayerKind::Promotions));
        let grants = grants
            .into_iter()
            .enumerate()
            .map(
                |(i, (balance, expires, priority, video_only, promo))| Grant {
                    id: i as i64 + 1,
                    kind: if promo {
                        GrantKind::Promotion
                    } else {
                        GrantKind::Credits
                    },
                    balance,
                    unsettled: 0,
                    version: 0,
                    expires_at: expires.map_or(NEVER, |m| t0() + m * MIN),
                    priority,
                    features: if video_only {
                        FeatureSet::EMPTY.with(VIDEO)
                    } else {
                        FeatureSet::ALL
                    },
                },
            )
            .collect();
        Model {
            plan: Plan {
                name: "p".into(),
                layers,
                prices: vec![PriceTable::flat("v", vec![Some(price), Some(price + 1)])],
                strict: false,
            },
            grants,
        }
    })
}

/// What of a state can be seen at `now`: window usage, free-tier usage in the current period,
/// and the grants. (A free tier's bookkeeping may roll to a new period without changing that.)
fn observable(plan: &Plan, s: &AccountState, now: Millis) -> (Vec<Units>, Vec<Grant>) {
    let mut used = Vec::new();
    for (i, l) in plan.layers.iter().enumerate() {
        match &l.kind {
            LayerKind::UsageLimit { .. } => used.extend(s.windows(plan, i, now).map(|w| w.used)),
            LayerKind::FreeTier { period, zone, .. } => {
                used.push(s.free_tier_used(i, period.bounds(*zone, now).0))
            }
            _ => {}
        }
    }
    (used, s.grants.to_vec())
}

fn steps() -> impl Strategy<Value = Vec<(u64, bool, Units, bool)>> {
    // (minutes to wait, video?, units, release afterwards?)
    prop::collection::vec(
        (
            0u64..120,
            prop::bool::ANY,
            0u64..15,
            prop::bool::weighted(0.2),
        ),
        1..40,
    )
}

/// Checks one admitted decision against the state it was decided on.
fn check_admitted(plan: &Plan, before: &AccountState, d: &Decision, now: Millis) {
    let feature = d.feature;
    let price = plan.price(feature, now).unwrap_or(0);
    // Covered exactly.
    assert_eq!(d.draws.iter().map(|x| x.units).sum::<Units>(), d.units);
    // Each grant layer's draws cost their units at the price; windows and free tier are free.
    for (i, l) in plan.layers.iter().enumerate() {
        let run: Vec<&Draw> = d.draws.iter().filter(|x| x.layer as usize == i).collect();
        let units: Units = run.iter().map(|x| x.units).sum();
        let credits: Credits = run.iter().map(|x| x.credits).sum();
        match l.kind {
            LayerKind::UsageLimit { .. } | LayerKind::FreeTier { .. } => assert_eq!(credits, 0),
            _ => assert_eq!(credits, units * price, "layer {i}"),
        }
        // No grant gives more than it holds, and only grants usable now give.
        for x in &run {
            if let Pool::Grant { grant_id } = x.pool {
                let g = before
                    .grants
                    .iter()
                    .find(|g| g.id == grant_id)
                    .expect("grant");
                assert!(g.balance >= x.credits);
                assert!(now < g.expires_at, "expired grant drawn");
                assert!(g.features.contains(feature));
            }
        }
    }
    // Layers in order: a layer gives only if every earlier eligible one gave all it had.
    let mut short_before = false;
    for r in &d.layers {
        if r.gave_units > 0 {
            assert!(
                !short_before,
                "layer {} gave after an earlier one held back",
                r.layer
            );
        }
        if r.eligible && r.gave_units < r.available_units {
            short_before = true;
        }
    }
}

/// How many units of `feature` the plan's layers could cover at `now`, counted from the state
/// directly (not through `decide`): each usage-limit layer its tightest window's room, a free
/// tier what is left of its period, each grant layer its usable grants' credits at the price.
fn capacity(plan: &Plan, s: &AccountState, feature: FeatureId, now: Millis) -> Units {
    let price = plan.price(feature, now).unwrap_or(0);
    let mut room: Units = 0;
    for (i, l) in plan.layers.iter().enumerate() {
        if !l.features.contains(feature) {
            continue;
        }
        let units = match &l.kind {
            LayerKind::UsageLimit { .. } => s
                .windows(plan, i, now)
                .map(|w| w.window.limit.saturating_sub(w.used))
                .min()
                .unwrap_or(0),
            LayerKind::FreeTier {
                units,
                period,
                zone,
            } => units.saturating_sub(s.free_tier_used(i, period.bounds(*zone, now).0)),
            LayerKind::Credits | LayerKind::Promotions => {
                let kind = if matches!(l.kind, LayerKind::Credits) {
                    GrantKind::Credits
                } else {
                    GrantKind::Promotion
                };
                let usable = s.grants.iter().filter(|g| {
                    g.kind == kind
                        && g.features.contains(feature)
                        && now < g.expires_at
                        && g.balance > 0
                });
                let credits: Credits = usable.map(|g| g.balance).sum();
                // Free units (price 0) are unbounded while a usable grant exists.
                credits
                    .checked_div(price)
                    .unwrap_or(if credits > 0 { Units::MAX / 4 } else { 0 })
            }
            _ => 0,
        };
        room = room.saturating_add(units);
    }
    room
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_waterfall_never_gives_more_than_it_has(m in model(), steps in steps()) {
        let plan = &m.plan;
        let mut s = AccountState::new(plan, m.grants.clone(), t0());
        let mut now = t0();
        let mut held = Vec::new();
        for (wait, video, units, release_after) in steps {
            now += wait as Millis * MIN;
            let feature = if video { VIDEO } else { TASK };
            let before = observable(plan, &s, now);
            let d = decide(plan, &s, feature, units, now);
            if !d.admitted() {
                prop_assert!(d.draws.is_empty());
                prop_assert_eq!(observable(plan, &s, now), before);
                // A denial is justified: the layers together really could not cover it.
                let room = capacity(plan, &s, feature, now);
                prop_assert!(units > room, "denied {} units with room for {}: {:?}", units, room, d.denial);
                continue;
            }
            check_admitted(plan, &s, &d, now);
            reserve(plan, &mut s, &d, now);
            // Windows never hold more than their limit; free tier never more than its units.
            for (i, l) in plan.layers.iter().enumerate() {
                match &l.kind {
                    LayerKind::UsageLimit { .. } => {
                        for w in s.windows(plan, i, now) {
                            prop_assert!(w.used <= w.window.limit, "{} used {} of {}", w.window.name, w.used, w.window.limit);
                        }
                    }
                    LayerKind::FreeTier { units, period, zone } => {
                        prop_assert!(s.free_tier_used(i, period.bounds(*zone, now).0) <= *units);
                    }
                    _ => {}
                }
            }
            if release_after {
                release(plan, &mut s, &d.draws, now);
                prop_assert_eq!(observable(plan, &s, now), before);
            } else {
                held.push((now, d));
            }
        }
        // Every grant's balance plus what is held of it is what it started with.
        for g in &m.grants {
            let g_now = s.grants.iter().find(|x| x.id == g.id).expect("grant");
            prop_assert_eq!(g_now.balance + g_now.unsettled, g.balance);
        }
    }

    /// Two replicas: A decides, B hears A's commits. Whatever A holds, commits or releases,
    /// B counts exactly what A committed, and A rebuilt from the store's commits plus its own
    /// unsettled holds is A unchanged.
    #[test]
    fn a_replica_counts_what_another_committed(m in model(), steps in steps()) {
        let plan = &m.plan;
        let mut a = AccountState::new(plan, m.grants.clone(), t0());
        let mut b = a.clone();
        let mut now = t0();
        let mut committed: Vec<Draw> = Vec::new();
        let mut held: Vec<Decision> = Vec::new();
        for (i, (wait, video, units, release_after)) in steps.into_iter().enumerate() {
            now += wait as Millis * MIN;
            let feature = if video { VIDEO } else { TASK };
            let d = decide(plan, &a, feature, units, now);
            if !d.admitted() {
                continue;
            }
            reserve(plan, &mut a, &d, now);
            match (release_after, i % 3) {
                (true, _) => release(plan, &mut a, &d.draws, now),
                (false, 0) => held.push(d),
                (false, _) => {
                    a.settled(&d.draws);
                    for draw in &d.draws {
                        b.observe(plan, draw, now);
                    }
                    committed.extend(d.draws.iter().copied());
                }
            }
        }
        let mut rebuilt = a.clone();
        rebuilt.resync_usage(plan, &committed, now);
        prop_assert_eq!(observable(plan, &rebuilt, now).0, observable(plan, &a, now).0);
        for d in held {
            a.settled(&d.draws);
            for draw in &d.draws {
                b.observe(plan, draw, now);
            }
        }
        prop_assert_eq!(observable(plan, &b, now).0, observable(plan, &a, now).0);
    }

    #[test]
    fn usage_frees_up_exactly_one_window_later(minutes in 1u32..600, limit in 1u64..20, at in 0i64..1000) {
        let plan = Plan {
            layers: vec![layer("limits", LayerKind::UsageLimit { windows: vec![window("w", minutes, limit)] })],
            ..plan()
        };
        let mut s = AccountState::new(&plan, vec![], t0());
        let used_at = t0() + at * 1000;
        admit(&plan, &mut s, TASK, limit, used_at);
        let minute = used_at.div_euclid(MIN);
        let frees = (minute + i64::from(minutes)) * MIN;
        prop_assert!(!decide(&plan, &s, TASK, 1, frees - 1).admitted());
        prop_assert!(decide(&plan, &s, TASK, limit, frees).admitted());
    }

    #[test]
    fn trim_keeps_every_layer_at_its_price(m in model(), units in 1u64..30, excess in 0u64..30) {
        let plan = &m.plan;
        let mut s = AccountState::new(plan, m.grants.clone(), t0());
        let d = decide(plan, &s, TASK, units, t0());
        prop_assume!(d.admitted());
        reserve(plan, &mut s, &d, t0());
        let price = d.credits_per_unit;
        let mut kept = d.draws.clone();
        let released = trim(&mut kept, excess, price);
        let total = |x: &[Draw]| (x.iter().map(|d| d.units).sum::<Units>(), x.iter().map(|d| d.credits).sum::<Credits>());
        let take = excess.min(units);
        prop_assert_eq!(total(&released).0, take);
        prop_assert_eq!(total(&kept).0, units - take);
        prop_assert_eq!(total(&kept).1 + total(&released).1, d.credits());
        for i in 0..plan.layers.len() as u8 {
            for part in [&kept[..], &released[..]] {
                let run: Vec<&Draw> = part.iter().filter(|x| x.layer == i && x.credits > 0).collect();
                let (u, c) = (run.iter().map(|x| x.units).sum::<Units>(), run.iter().map(|x| x.credits).sum::<Credits>());
                prop_assert_eq!(c, u * price, "layer {}", i);
            }
        }
        release(plan, &mut s, &released, t0());
        release(plan, &mut s, &kept, t0());
        for g in &m.grants {
            let now_g = s.grants.iter().find(|x| x.id == g.id).expect("grant");
            prop_assert_eq!((now_g.balance, now_g.unsettled), (g.balance, 0));
        }
    }
}

#[test]
fn a_concurrency_layer_gates_its_features_until_a_request_finishes() {
    let mut plan = plan();
    let mut gate = layer("renders", LayerKind::Concurrency { limit: 2 });
    gate.features = FeatureSet::EMPTY.with(VIDEO);
    plan.layers.insert(0, gate);
    let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 1_000)], t0());
    for _ in 0..2 {
        let d = decide(&plan, &s, VIDEO, 1, t0());
        assert!(d.admitted());
        reserve(&plan, &mut s, &d, t0());
        start_request(&plan, &mut s, VIDEO);
    }
    let d = decide(&plan, &s, VIDEO, 1, t0());
    assert_eq!(
        d.denial,
        Some(Denial::ConcurrencyLimit {
            limit: 2,
            running: 2
        })
    );
    assert!(d.draws.is_empty());
    // Other features pass the gate.
    assert!(decide(&plan, &s, TASK, 1, t0()).admitted());
    finish_request(&plan, &mut s, VIDEO);
    assert!(decide(&plan, &s, VIDEO, 1, t0()).admitted());
    // Finishing more than started never underflows.
    for _ in 0..3 {
        finish_request(&plan, &mut s, VIDEO);
    }
    assert_eq!(s.in_flight(0), 0);
}

// === strict mode: leased slices ===

/// A strict plan: a day window of 10 tasks, then credits (a task costs 5).
fn strict_plan() -> Plan {
    Plan {
        name: "strict".into(),
        layers: vec![
            layer(
                "limits",
                LayerKind::UsageLimit {
                    windows: vec![window("day", 24 * 60, 10)],
                },
            ),
            layer("credits", LayerKind::Credits),
        ],
        prices: vec![PriceTable::flat("v1", vec![Some(5), Some(5)])],
        strict: true,
    }
}

fn lease(state: &mut AccountState, pool: LeasePool, amount: u64, drained: bool, now: Millis) {
    let leases = state.leases.as_mut().expect("a strict state has leases");
    leases.valid_until = now + HOUR;
    leases.granted(pool, amount, drained.then_some(now + MIN));
}

#[test]
fn a_strict_account_draws_nothing_it_has_not_leased_and_asks_for_the_window_first() {
    let plan = strict_plan();
    let mut s = AccountState::new(&plan, vec![grant(7, GrantKind::Credits, 100)], t0());
    let d = decide(&plan, &s, TASK, 3, t0());
    assert!(!d.admitted(), "no slice yet: {d:?}");
    // The window is asked for first, although the credits could pay: the waterfall's order.
    let wants = lease_wants(&plan, &s, TASK, 3, t0());
    assert_eq!(wants.as_slice(), &[(LeasePool::Layer(0), 3)]);
    lease(&mut s, LeasePool::Layer(0), 2, true, t0());
    // Two of the window leased and the store has no more: the third unit wants credits.
    let wants = lease_wants(&plan, &s, TASK, 3, t0());
    assert_eq!(wants.as_slice(), &[(LeasePool::Grant(7), 5)]);
    lease(&mut s, LeasePool::Grant(7), 5, false, t0());
    assert!(lease_wants(&plan, &s, TASK, 3, t0()).is_empty());
    let d = admit(&plan, &mut s, TASK, 3, t0());
    assert_eq!(pools(&d), vec![(0, 2, 0), (1, 1, 5)]);
    let slices = s.leases.as_ref().expect("leases").slices().to_vec();
    assert!(slices.iter().all(|x| x.remaining == 0), "{slices:?}");
    assert_eq!(
        slices.iter().map(|x| x.outstanding).collect::<Vec<_>>(),
        vec![2, 5]
    );
}

#[test]
fn a_slice_past_its_validity_draws_nothing_until_renewed() {
    let plan = strict_plan();
    let mut s = AccountState::new(&plan, Vec::new(), t0());
    lease(&mut s, LeasePool::Layer(0), 5, false, t0());
    assert!(decide(&plan, &s, TASK, 5, t0() + HOUR - 1).admitted());
    let late = t0() + HOUR;
    assert!(!decide(&plan, &s, TASK, 1, late).admitted());
    assert_eq!(
        lease_wants(&plan, &s, TASK, 1, late).as_slice(),
        &[(LeasePool::Layer(0), 1)]
    );
}

#[test]
fn a_plan_that_is_not_strict_never_wants_a_lease() {
    let p = plan();
    let s = AccountState::new(&p, vec![grant(1, GrantKind::Credits, 50)], t0());
    assert!(s.leases.is_none());
    assert!(lease_wants(&p, &s, TASK, 8, t0()).is_empty());
    assert!(decide(&p, &s, TASK, 8, t0()).admitted());
}

#[test]
fn released_and_committed_draws_keep_the_store_lease_equal_to_remaining_plus_outstanding() {
    let plan = strict_plan();
    let mut s = AccountState::new(&plan, vec![grant(7, GrantKind::Credits, 100)], t0());
    lease(&mut s, LeasePool::Layer(0), 4, false, t0());
    let a = admit(&plan, &mut s, TASK, 3, t0());
    let b = admit(&plan, &mut s, TASK, 1, t0());
    release(&plan, &mut s, &b.draws, t0());
    s.settled(&a.draws); // the store took 3 off the lease: it holds 1
    let slice = s.leases.as_ref().expect("leases").slices()[0];
    assert_eq!((slice.remaining, slice.outstanding), (1, 0));
    // Idle: everything not outstanding goes back.
    let kept = s.leases.as_mut().expect("leases").give_back_idle(t0() + 1);
    assert_eq!(kept.as_slice(), &[(LeasePool::Layer(0), 0)]);
    assert!(!decide(&plan, &s, TASK, 1, t0()).admitted());
}

/// A store of leases for one window and one grant, as `store::lease` keeps it.
#[derive(Debug, Default)]
struct LeaseStore {
    committed_units: Units,
    debited: Credits,
    /// Per replica: (window lease, grant lease).
    leases: [(u64, u64); 2],
}

impl LeaseStore {
    fn room(&self, pool: LeasePool, limit: Units, balance: Credits) -> u64 {
        let (held, cap, used) = match pool {
            LeasePool::Layer(_) => (
                self.leases.iter().map(|l| l.0).sum::<u64>(),
                limit,
                self.committed_units,
            ),
            LeasePool::Grant(_) => (
                self.leases.iter().map(|l| l.1).sum::<u64>(),
                balance,
                self.debited,
            ),
        };
        cap.saturating_sub(used).saturating_sub(held)
    }

    fn lease_mut(&mut self, r: usize, pool: LeasePool) -> &mut u64 {
        match pool {
            LeasePool::Layer(_) => &mut self.leases[r].0,
            LeasePool::Grant(_) => &mut self.leases[r].1,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Two replicas of a strict account lease from one store, decide, release and commit in
    /// any order: together they never draw more than the window's limit or the grant's
    /// balance, and each replica's slices always add up to the store's lease.
    #[test]
    fn strict_replicas_never_overspend(
        limit in 0u64..20,
        balance in 0u64..60,
        steps in prop::collection::vec((0usize..2, 0u8..4, 1u64..6), 1..80),
    ) {
        let mut plan = strict_plan();
        plan.layers[0].kind = LayerKind::UsageLimit { windows: vec![window("day", 24 * 60, limit)] };
        let plan = &plan;
        let now = t0();
        let g = grant(7, GrantKind::Credits, balance);
        let mut replicas = [AccountState::new(plan, vec![g.clone()], now), AccountState::new(plan, vec![g], now)];
        let mut held: [Vec<Decision>; 2] = [Vec::new(), Vec::new()];
        let mut store = LeaseStore::default();
        for (r, op, units) in steps {
            match op {
                // A request: lease what it wants (the store gives what is free, at least a
                // quarter of it), then decide within the slices.
                0 | 1 => {
                    for _round in 0..3 {
                        let wants = lease_wants(plan, &replicas[r], TASK, units, now);
                        if wants.is_empty() { break; }
                        for (pool, want) in wants {
                            let free = store.room(pool, limit, balance);
                            let give = free.min(want.max(free / 4));
                            *store.lease_mut(r, pool) += give;
                            lease(&mut replicas[r], pool, give, give < want, now);
                        }
                    }
                    let d = decide(plan, &replicas[r], TASK, units, now);
                    if d.admitted() {
                        reserve(plan, &mut replicas[r], &d, now);
                        held[r].push(d);
                    }
                }
                // The oldest hold commits: the store converts its lease into usage.
                2 => if !held[r].is_empty() {
                    let d = held[r].remove(0);
                    for draw in &d.draws {
                        if let Some(pool) = draw.lease_pool() {
                            let lease = store.lease_mut(r, pool);
                            prop_assert!(*lease >= draw.lease_amount(), "committed past the lease");
                            *lease -= draw.lease_amount();
                            match pool {
                                LeasePool::Layer(_) => store.committed_units += draw.units,
                                LeasePool::Grant(_) => store.debited += draw.credits,
                            }
                        }
                    }
                    replicas[r].settled(&d.draws);
                    for state in &mut replicas {
                        // Heard at once and in order: no version needed.
                        state.sync_grant(7, balance - store.debited, None);
                    }
                    for draw in d.draws.iter().filter(|x| matches!(x.pool, Pool::Window { .. })) {
                        replicas[1 - r].observe(plan, draw, now);
                    }
                },
                // The newest hold is released.
                _ => if let Some(d) = held[r].pop() {
                    release(plan, &mut replicas[r], &d.draws, now);
                },
            }
            prop_assert!(store.committed_units + store.leases.iter().map(|l| l.0).sum::<u64>() <= limit);
            prop_assert!(store.debited + store.leases.iter().map(|l| l.1).sum::<u64>() <= balance);
            for (i, state) in replicas.iter().enumerate() {
                for s in state.leases.as_ref().expect("leases").slices() {
                    let stored = match s.pool {
                        LeasePool::Layer(_) => store.leases[i].0,
                        LeasePool::Grant(_) => store.leases[i].1,
                    };
                    prop_assert_eq!(s.remaining + s.outstanding, stored, "replica {} {:?}", i, s.pool);
                }
            }
        }
        // Everything held commits: still within the limit and the balance.
        let drawn_units: Units = held.iter().flatten().flat_map(|d| &d.draws).filter(|x| matches!(x.pool, Pool::Window { .. })).map(|x| x.units).sum();
        let drawn_credits: Credits = held.iter().flatten().map(|d| d.credits()).sum();
        prop_assert!(store.committed_units + drawn_units <= limit);
        prop_assert!(store.debited + drawn_credits <= balance);
    }
}

// Calendar-aligned windows and free tiers in a time zone.

use chrono_tz::{America, Europe, Pacific};

/// The instant of a UTC wall-clock time.
fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> Millis {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
        .single()
        .map(|t| t.timestamp_millis())
        .expect("valid instant")
}

/// A plan of one usage-limit layer with `windows` and nothing after it.
fn limits_only(windows: Vec<Window>) -> Plan {
    Plan {
        layers: vec![layer("limits", LayerKind::UsageLimit { windows })],
        ..plan()
    }
}

fn retry_at(d: &Decision) -> Option<Millis> {
    match d.denial {
        Some(Denial::UsageLimitReached { retry_at }) => Some(retry_at),
        _ => None,
    }
}

#[test]
fn a_day_runs_from_local_midnight_to_local_midnight_and_lasts_23_or_25_hours_when_clocks_change() {
    let ny = America::New_York;
    // An ordinary November day: EST, UTC−5.
    assert_eq!(
        Period::Day.bounds(ny, utc(2026, 11, 23, 10, 0)),
        (utc(2026, 11, 23, 5, 0), utc(2026, 11, 24, 5, 0))
    );
    // 2026-03-08: the clocks go from 02:00 EST to 03:00 EDT; the day lasts 23 hours.
    let spring = Period::Day.bounds(ny, utc(2026, 3, 8, 12, 0));
    assert_eq!(spring, (utc(2026, 3, 8, 5, 0), utc(2026, 3, 9, 4, 0)));
    // 2026-11-01: from 02:00 EDT back to 01:00 EST; 25 hours, the repeated hour included.
    let autumn = (utc(2026, 11, 1, 4, 0), utc(2026, 11, 2, 5, 0));
    for at in [
        utc(2026, 11, 1, 4, 0),
        utc(2026, 11, 1, 5, 30), // 01:30 EDT
        utc(2026, 11, 1, 6, 30), // 01:30 EST, the second time
        utc(2026, 11, 2, 5, 0) - 1,
    ] {
        assert_eq!(Period::Day.bounds(ny, at), autumn);
    }
    // The instant before a day starts belongs to the previous one.
    assert_eq!(
        Period::Day.bounds(ny, utc(2026, 11, 1, 4, 0) - 1).1,
        autumn.0
    );
}

#[test]
fn a_midnight_the_clocks_skip_or_repeat_still_starts_exactly_one_day() {
    // Santiago, 2026-09-06: at 04:00 UTC the clocks jump from 24:00 (−04) to 01:00 (−03),
    // so Sunday starts at the jump and lasts 23 hours.
    let cl = America::Santiago;
    assert_eq!(
        Period::Day.bounds(cl, utc(2026, 9, 6, 12, 0)),
        (utc(2026, 9, 6, 4, 0), utc(2026, 9, 7, 3, 0))
    );
    assert_eq!(
        Period::Day.bounds(cl, utc(2026, 9, 6, 4, 0) - 1).1,
        utc(2026, 9, 6, 4, 0)
    );
    // 2026-04-05: at 03:00 UTC from 24:00 (−03) back to 23:00 (−04): Saturday lasts 25
    // hours, its last one twice.
    let saturday = (utc(2026, 4, 4, 3, 0), utc(2026, 4, 5, 4, 0));
    assert_eq!(Period::Day.bounds(cl, utc(2026, 4, 5, 2, 30)), saturday);
    assert_eq!(Period::Day.bounds(cl, utc(2026, 4, 5, 3, 30)), saturday);
    assert_eq!(Period::Day.bounds(cl, utc(2026, 4, 5, 4, 0)).0, saturday.1);
    // Samoa skipped 2011-12-30 altogether: the 29th ends when the 31st begins.
    let ws = Pacific::Apia;
    let end_of_29th = Period::Day.bounds(ws, utc(2011, 12, 30, 0, 0)).1;
    assert_eq!(end_of_29th, utc(2011, 12, 30, 10, 0));
    assert_eq!(Period::Day.bounds(ws, end_of_29th).0, end_of_29th);
    assert_eq!(
        Period::Day.bounds(ws, end_of_29th).1,
        utc(2011, 12, 31, 10, 0)
    );
}

#[test]
fn weeks_start_on_monday_and_months_on_the_first_at_local_midnight() {
    let paris = Europe::Paris;
    // t0 is Monday 2026-11-23 11:00 in Paris (CET, UTC+1).
    assert_eq!(
        Period::Week.bounds(paris, t0()),
        (utc(2026, 11, 22, 23, 0), utc(2026, 11, 29, 23, 0))
    );
    // Sunday 23:59 in Paris is still last week.
    assert_eq!(
        Period::Week.bounds(paris, utc(2026, 11, 22, 22, 59)).1,
        utc(2026, 11, 22, 23, 0)
    );
    // The week of 2026-10-25 (back from CEST to CET) lasts 7 days and an hour.
    assert_eq!(
        Period::Week.bounds(paris, utc(2026, 10, 21, 12, 0)),
        (utc(2026, 10, 18, 22, 0), utc(2026, 10, 25, 23, 0))
    );
    // New York's March 2026 starts in EST and ends in EDT; December ends the year.
    let ny = America::New_York;
    assert_eq!(
        Period::Month.bounds(ny, utc(2026, 3, 15, 12, 0)),
        (utc(2026, 3, 1, 5, 0), utc(2026, 4, 1, 4, 0))
    );
    assert_eq!(
        Period::Month.bounds(ny, utc(2027, 1, 1, 4, 59)),
        (utc(2026, 12, 1, 5, 0), utc(2027, 1, 1, 5, 0))
    );
    // 04:00 UTC on 1 March is still February in New York, March in UTC.
    assert_eq!(
        Period::Month.bounds(ny, utc(2026, 3, 1, 4, 0)).1,
        utc(2026, 3, 1, 5, 0)
    );
    assert_eq!(
        Period::Month.bounds(Tz::UTC, utc(2026, 3, 1, 4, 0)).0,
        utc(2026, 3, 1, 0, 0)
    );
    // No period lasts longer than the history a window keeps for it.
    for (period, at) in [
        (Period::Day, utc(2026, 11, 1, 12, 0)),
        (Period::Week, utc(2026, 10, 21, 12, 0)),
        (Period::Month, utc(2026, 10, 21, 12, 0)),
    ] {
        let (start, end) = period.bounds(paris, at);
        assert!(end - start <= i64::from(period.longest_minutes()) * MIN);
    }
}

#[test]
fn a_daily_window_in_new_york_resets_at_local_midnight_on_a_dst_day() {
    let plan = limits_only(vec![Window::calendar(
        "day",
        Period::Day,
        America::New_York,
        3,
    )]);
    let mut s = AccountState::new(&plan, vec![], utc(2026, 3, 7, 12, 0));
    // 23:59 EST on the 7th: yesterday, in New York.
    admit(&plan, &mut s, TASK, 3, utc(2026, 3, 8, 4, 59));
    // 00:00 EST on the 8th: a new day, the whole limit again.
    let midnight = utc(2026, 3, 8, 5, 0);
    admit(&plan, &mut s, TASK, 2, midnight);
    admit(&plan, &mut s, TASK, 1, utc(2026, 3, 8, 12, 0));
    // Used up until the next local midnight, 23 hours after this one (00:00 EDT).
    let next = utc(2026, 3, 9, 4, 0);
    assert_eq!(next - midnight, 23 * HOUR);
    let d = decide(&plan, &s, TASK, 1, next - 1);
    assert_eq!(retry_at(&d), Some(next));
    assert_eq!(d.layers[0].reset_at, Some(next));
    let status: Vec<(Units, Units, Millis)> = s
        .windows(&plan, 0, utc(2026, 3, 8, 12, 0))
        .map(|w| (w.used, w.remaining, w.reset_at))
        .collect();
    assert_eq!(status, vec![(3, 0, next)]);
    let log = s.usage_log(0).expect("a usage log");
    let w = &plan_windows(&plan)[0];
    assert_eq!(log.free_at(w, 1, next - MIN), Some(next));
    assert_eq!(log.free_at(w, 3, next - MIN), Some(next));
    assert_eq!(log.free_at(w, 4, next - MIN), None);
    assert_eq!(log.free_at(w, 1, next), Some(next));
    // At local midnight: everything is free again, and the window resets at the next one.
    assert!(decide(&plan, &s, TASK, 3, next).admitted());
    assert!(!decide(&plan, &s, TASK, 4, next).admitted());
    let status: Vec<(Units, Units, Millis)> = s
        .windows(&plan, 0, next)
        .map(|w| (w.used, w.remaining, w.reset_at))
        .collect();
    assert_eq!(status, vec![(0, 3, utc(2026, 3, 10, 4, 0))]);
}

fn plan_windows(plan: &Plan) -> &[Window] {
    match &plan.layers[0].kind {
        LayerKind::UsageLimit { windows } => windows,
        _ => &[],
    }
}

#[test]
fn a_calendar_window_with_a_rolling_one_waits_for_whichever_frees_later() {
    // 5 per rolling hour and 6 per New York day: the day is used up at 23:30, so waiting
    // helps at local midnight, not when the hour has slid past.
    let plan = limits_only(vec![
        window("1h", 60, 5),
        Window::calendar("day", Period::Day, America::New_York, 6),
    ]);
    let mut s = AccountState::new(&plan, vec![], t0());
    let evening = utc(2026, 11, 24, 3, 0); // 22:00 EST on the 23rd
    admit(&plan, &mut s, TASK, 5, evening);
    admit(&plan, &mut s, TASK, 1, evening + 90 * MIN);
    let d = decide(&plan, &s, TASK, 1, evening + 90 * MIN);
    assert_eq!(retry_at(&d), Some(utc(2026, 11, 24, 5, 0)));
    // Just after midnight the day has room, but the rolling hour still counts the 23:30 unit.
    let after = utc(2026, 11, 24, 5, 0);
    assert!(decide(&plan, &s, TASK, 4, after).admitted());
    assert!(!decide(&plan, &s, TASK, 5, after).admitted());
}

#[test]
fn weekly_and_monthly_windows_reset_at_their_local_boundaries() {
    let paris = Europe::Paris;
    let plan = limits_only(vec![
        Window::calendar("week", Period::Week, paris, 2),
        Window::calendar("month", Period::Month, paris, 3),
    ]);
    let mut s = AccountState::new(&plan, vec![], t0());
    // Sunday 2026-11-22 23:59 in Paris: last week, but this month.
    admit(&plan, &mut s, TASK, 1, utc(2026, 11, 22, 22, 59));
    admit(&plan, &mut s, TASK, 2, t0());
    let monday = utc(2026, 11, 29, 23, 0); // 2026-11-30 00:00 CET
    let first = utc(2026, 11, 30, 23, 0); // 2026-12-01 00:00 CET
    let status: Vec<(Units, Millis)> = s
        .windows(&plan, 0, t0())
        .map(|w| (w.used, w.reset_at))
        .collect();
    assert_eq!(status, vec![(2, monday), (3, first)]);
    // Both full: the week frees first, but the month decides.
    assert_eq!(retry_at(&decide(&plan, &s, TASK, 1, t0())), Some(first));
    // The new week alone is not enough; the new month is.
    assert!(!decide(&plan, &s, TASK, 1, monday).admitted());
    assert!(decide(&plan, &s, TASK, 2, first).admitted());
    assert!(!decide(&plan, &s, TASK, 3, first).admitted());
    assert!(!decide(&plan, &s, TASK, 1, first - 1).admitted());
}

#[test]
fn a_monthly_free_tier_in_a_zone_resets_at_its_local_first() {
    let paris = Europe::Paris;
    let plan = Plan {
        layers: vec![layer(
            "free",
            LayerKind::FreeTier {
                units: 2,
                period: Period::Month,
                zone: paris,
            },
        )],
        ..plan()
    };
    let late = utc(2026, 11, 30, 22, 30); // 23:30 in Paris on the 30th
    let mut s = AccountState::new(&plan, vec![], late);
    let d = admit(&plan, &mut s, TASK, 2, late);
    let first = utc(2026, 11, 30, 23, 0); // 2026-12-01 00:00 CET
    assert_eq!(
        d.draws[0].pool,
        Pool::FreeTier {
            period_start: utc(2026, 10, 31, 23, 0)
        }
    );
    let d = decide(&plan, &s, TASK, 1, first - MIN);
    assert!(!d.admitted());
    assert_eq!(d.layers[0].reset_at, Some(first));
    // In Paris December has begun; in UTC it is still November.
    let d = admit(&plan, &mut s, TASK, 2, first);
    assert_eq!(
        d.draws[0].pool,
        Pool::FreeTier {
            period_start: first
        }
    );
    assert_eq!(
        Period::Month.bounds(Tz::UTC, first).1,
        utc(2026, 12, 1, 0, 0)
    );
}

#[test]
fn a_calendar_window_keeps_the_history_of_its_longest_period() {
    let plan = limits_only(vec![Window::calendar(
        "month",
        Period::Month,
        America::New_York,
        100,
    )]);
    assert_eq!(plan.longest_window_minutes(), 32 * 24 * 60);
    let mut s = AccountState::new(&plan, vec![], utc(2026, 3, 1, 5, 0));
    // The first minute of March in New York is still counted on the 31st at 23:59, after a
    // later draw pruned the log.
    admit(&plan, &mut s, TASK, 7, utc(2026, 3, 1, 5, 0));
    admit(&plan, &mut s, TASK, 1, utc(2026, 4, 1, 3, 59));
    let used: Vec<Units> = s
        .windows(&plan, 0, utc(2026, 4, 1, 3, 59))
        .map(|w| w.used)
        .collect();
    assert_eq!(used, vec![8]);
    let used: Vec<Units> = s
        .windows(&plan, 0, utc(2026, 4, 1, 4, 0))
        .map(|w| w.used)
        .collect();
    assert_eq!(used, vec![0]);
}

#[test]
fn a_window_changing_kind_or_zone_keeps_its_log_but_a_free_tier_in_another_zone_does_not() {
    let rolling_week = limits_only(vec![window("week", 7 * 24 * 60, 10)]);
    let daily_ny = limits_only(vec![Window::calendar(
        "day",
        Period::Day,
        America::New_York,
        10,
    )]);
    let daily_paris = limits_only(vec![Window::calendar(
        "day",
        Period::Day,
        Europe::Paris,
        10,
    )]);
    // A day's history is within the week's, and the same in any zone; not the other way round.
    assert!(rolling_week.same_state_layout(&daily_ny));
    assert!(daily_ny.same_state_layout(&daily_paris));
    assert!(!daily_ny.same_state_layout(&rolling_week));
    // The kept log counts right under the new kind: usage at 23:30 in Paris (17:30 in New York).
    let mut s = AccountState::new(&rolling_week, vec![], t0());
    admit(&rolling_week, &mut s, TASK, 4, utc(2026, 11, 23, 22, 30));
    let at = utc(2026, 11, 23, 23, 30);
    let used = |plan: &Plan| s.windows(plan, 0, at).map(|w| w.used).next();
    assert_eq!(used(&daily_ny), Some(4));
    assert_eq!(used(&daily_paris), Some(0));
    // A free tier counts one period of one zone: another zone is another layout.
    let free = |zone| Plan {
        layers: vec![layer(
            "free",
            LayerKind::FreeTier {
                units: 2,
                period: Period::Month,
                zone,
            },
        )],
        ..plan()
    };
    assert!(free(Tz::UTC).same_state_layout(&free(Tz::UTC)));
    assert!(!free(Tz::UTC).same_state_layout(&free(Europe::Paris)));
}

#[test]
fn a_span_counts_the_minutes_that_start_within_it() {
    // A calendar span that does not start on a minute (only zones' old local mean times do)
    // counts the minutes that start at or after it.
    let mut log = UsageLog::default();
    log.add(9, 1, 0);
    log.add(10, 2, 0);
    assert_eq!(log.used_since(10 * MIN), 2);
    assert_eq!(log.used_since(9 * MIN + 1), 2);
    assert_eq!(log.used_since(9 * MIN), 3);
    assert_eq!(log.used_since(-MIN + 1), 3);
}

proptest! {
    /// Skipping the expired grants at the head of the spend order skips none a decision could
    /// draw, whatever the priorities and expiries.
    #[test]
    fn unexpired_skips_only_expired_grants(
        grants in prop::collection::vec((-2i32..3, prop::option::of(-5i64..5)), 0..30),
        now in -6i64..6,
    ) {
        let mut state = AccountState::new(&plan(), Vec::new(), t0());
        for (i, (priority, expires)) in grants.into_iter().enumerate() {
            state.add_grant(Grant {
                priority,
                expires_at: expires.map_or(NEVER, |m| t0() + m * MIN),
                ..grant(i as i64 + 1, GrantKind::Credits, 1)
            });
        }
        let now = t0() + now * MIN;
        let live = |gs: &[Grant]| -> Vec<i64> {
            gs.iter()
                .filter(|g| g.usable(GrantKind::Credits, FeatureId(0), now))
                .map(|g| g.id)
                .collect()
        };
        prop_assert_eq!(live(unexpired(state.grants(), now).1), live(state.grants()));
    }

    /// A log of both counts behaves as the two logs it replaced: what counts per minute, and
    /// what is unsettled per minute, each changed only by its own operations.
    #[test]
    fn one_log_keeps_used_and_unsettled_apart(
        ops in prop::collection::vec((0u8..5, 0i64..30, 0u64..6, 0u64..6), 0..120),
    ) {
        use std::collections::BTreeMap;
        let mut log = UsageLog::default();
        let (mut used, mut unsettled) = (BTreeMap::<i64, u64>::new(), BTreeMap::<i64, u64>::new());
        let take = |map: &mut BTreeMap<i64, u64>, m: i64, u: u64| {
            if let Some(v) = map.get_mut(&m) {
                *v = v.saturating_sub(u);
                if *v == 0 {
                    map.remove(&m);
                }
            }
        };
        for (op, m, u, v) in ops {
            match op {
                0 => {
                    log.add(m, u, v.min(u));
                    *used.entry(m).or_default() += u;
                    *unsettled.entry(m).or_default() += v.min(u);
                }
                1 => {
                    log.remove(m, u, v);
                    take(&mut used, m, u);
                    take(&mut unsettled, m, v);
                }
                2 => {
                    log.keep_unsettled();
                    used = unsettled.clone();
                }
                3 => {
                    log.prune(10, m * MIN);
                    let first = m - 10 + 1;
                    used.retain(|&k, _| k >= first);
                    unsettled.retain(|&k, _| k >= first);
                }
                _ => {
                    log.add(m, u, 0);
                    *used.entry(m).or_default() += u;
                }
            }
            used.retain(|_, v| *v > 0);
            unsettled.retain(|_, v| *v > 0);
            prop_assert!(log.sums_hold());
            for from in [0, 5, 12, 29] {
                let expected: u64 = used.range(from..).map(|(_, v)| v).sum();
                prop_assert_eq!(log.used_since(from * MIN), expected);
            }
            // When a rolling window frees room, as a minute-by-minute walk of the model finds.
            for (minutes, limit, needed, now) in [(10, 6, 1, 20), (30, 12, 5, 29), (7, 3, 3, 31), (30, 20, 14, 29)] {
                let w = window("w", minutes, limit);
                let first = now - i64::from(minutes) + 1;
                let mut counted: u64 = used.range(first..).map(|(_, v)| v).sum();
                let expected = if needed > limit {
                    None
                } else if limit.saturating_sub(counted) >= needed {
                    Some(now * MIN)
                } else {
                    let mut at = now * MIN;
                    for (m, v) in used.range(first..) {
                        counted = counted.saturating_sub(*v);
                        if limit.saturating_sub(counted) >= needed {
                            at = (m + i64::from(minutes)) * MIN;
                            break;
                        }
                    }
                    Some(at)
                };
                prop_assert_eq!(log.free_at(&w, needed, now * MIN), expected);
            }
            let log_unsettled: BTreeMap<i64, u64> = log
                .buckets
                .iter()
                .filter(|b| b.unsettled > 0)
                .map(|b| (b.minute, b.unsettled))
                .collect();
            prop_assert_eq!(&log_unsettled, &unsettled);
            prop_assert!(log.buckets.iter().all(|b| b.used > 0 || b.unsettled > 0));
            prop_assert!(log.buckets.iter().zip(log.buckets.iter().skip(1)).all(|(a, b)| a.minute < b.minute));
        }
    }
}

/// Zones with an hour of DST either way, half- and quarter-hour offsets, a half-hour DST
/// (Lord Howe) and midnight transitions (Santiago).
fn zone() -> impl Strategy<Value = Tz> {
    prop::sample::select(vec![
        Tz::UTC,
        America::New_York,
        America::Santiago,
        Europe::Paris,
        chrono_tz::Asia::Kolkata,
        chrono_tz::Asia::Kathmandu,
        chrono_tz::Australia::Lord_Howe,
        Pacific::Apia,
    ])
}

fn period() -> impl Strategy<Value = Period> {
    prop_oneof![Just(Period::Day), Just(Period::Week), Just(Period::Month)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Periods tile time: each holds its instant, starts where the previous one ended, and is
    /// no longer than the history kept for it.
    #[test]
    fn calendar_periods_tile_time(zone in zone(), period in period(), at in utc(2009, 1, 1, 0, 0)..utc(2036, 1, 1, 0, 0)) {
        let (start, end) = period.bounds(zone, at);
        prop_assert!(start <= at && at < end, "{start} <= {at} < {end}");
        prop_assert_eq!(period.bounds(zone, start), (start, end));
        prop_assert_eq!(period.bounds(zone, end).0, end);
        prop_assert_eq!(period.bounds(zone, start - 1).1, start);
        prop_assert!(end - start <= i64::from(period.longest_minutes()) * MIN);
        prop_assert!(end - start >= 23 * HOUR);
    }

    /// For random usage, a calendar window admits exactly what fits in the period it is in,
    /// never more than its limit per period, and everything is free again at the period start.
    #[test]
    fn a_calendar_window_never_admits_more_than_its_limit_in_a_period(
        zone in zone(),
        period in period(),
        limit in 1u64..20,
        start in utc(2026, 1, 1, 0, 0)..utc(2027, 1, 1, 0, 0),
        steps in prop::collection::vec((0i64..6 * 60 * 60_000, 1u64..6), 1..60),
    ) {
        let plan = limits_only(vec![Window::calendar("cal", period, zone, limit)]);
        let mut s = AccountState::new(&plan, vec![], start);
        let mut now = start;
        let mut current = period.bounds(zone, now);
        let mut admitted_in_period: Units = 0;
        // A month's steps are stretched so that they cross boundaries too.
        let stretch = match period { Period::Day => 1, Period::Week => 7, Period::Month => 30 };
        for (advance, units) in steps {
            now += advance * stretch;
            let bounds = period.bounds(zone, now);
            if bounds != current {
                // The period start: nothing counts, the whole limit is free.
                let fresh = bounds.0;
                let w = s.windows(&plan, 0, fresh).next().expect("one window");
                prop_assert_eq!((w.used, w.remaining, w.reset_at), (0, limit, bounds.1));
                prop_assert!(decide(&plan, &s, TASK, limit, fresh).admitted());
                current = bounds;
                admitted_in_period = 0;
            }
            let d = decide(&plan, &s, TASK, units, now);
            prop_assert_eq!(d.admitted(), admitted_in_period + units <= limit);
            if d.admitted() {
                reserve(&plan, &mut s, &d, now);
                admitted_in_period += units;
            } else {
                prop_assert_eq!(retry_at(&d), (units <= limit).then_some(current.1));
            }
            prop_assert!(admitted_in_period <= limit);
            let w = s.windows(&plan, 0, now).next().expect("one window");
            prop_assert_eq!((w.used, w.reset_at), (admitted_in_period, current.1));
        }
    }
}

// ---- Workspace pools -------------------------------------------------------------------------

/// A member's plan: own credits first, then the workspace's pool (at most `cap` credits per
/// member per day, when given); a task costs 5 credits.
fn member_plan(cap: Option<Credits>) -> Plan {
    Plan {
        name: "member".into(),
        layers: vec![
            layer("credits", LayerKind::Credits),
            layer(
                "team",
                LayerKind::Workspace {
                    member_cap: cap.map(|credits| MemberCap {
                        credits,
                        period: Period::Day,
                        zone: Tz::UTC,
                    }),
                },
            ),
        ],
        prices: vec![PriceTable::flat("v1", vec![Some(5), Some(2)])],
        strict: false,
    }
}

/// The workspace account's own plan: its grants are the pool.
fn pool_state(balances: &[Credits]) -> AccountState {
    let grants = balances
        .iter()
        .enumerate()
        .map(|(i, b)| grant(100 + i as i64, GrantKind::Credits, *b))
        .collect();
    AccountState::new(&plan(), grants, t0())
}

fn pool_left(pool: &AccountState) -> Credits {
    pool.grants().iter().map(|g| g.balance).sum()
}

#[test]
fn a_member_draws_the_workspace_pool_after_its_own_credits() {
    let plan = member_plan(None);
    let mut member = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, 10)], t0());
    let mut pool = pool_state(&[12, 100]);
    let d = decide_in(&plan, &member, Some(&pool), TASK, 4, t0());
    assert!(d.admitted(), "{:?}", d.denial);
    // 2 tasks from own credits (10), 2 from the pool: 12 from the first grant... in spend order.
    assert_eq!(
        d.draws.as_slice(),
        [
            Draw::new(0, Pool::Grant { grant_id: 1 }, 2, 10),
            Draw::new(
                1,
                Pool::Workspace {
                    grant_id: 100,
                    period_start: 0
                },
                2,
                10
            ),
        ]
    );
    let report = d.layers[1];
    assert_eq!(
        (
            report.pool_credits,
            report.cap_left,
            report.available_credits
        ),
        (Some(112), None, Some(112))
    );
    reserve_in(&plan, &mut member, Some(&mut pool), &d, t0());
    assert_eq!(pool_left(&pool), 102);
    assert_eq!(pool.grants()[0].unsettled, 10);
    assert_eq!(member.workspace_used(1, 0), 10);
    release_in(&plan, &mut member, Some(&mut pool), &d.draws, t0());
    assert_eq!(pool_left(&pool), 112);
    assert_eq!(pool.grants()[0].unsettled, 0);
    assert_eq!(member.workspace_used(1, 0), 0);
    assert_eq!(member.grants()[0].balance, 10);
}

#[test]
fn a_member_cap_stops_one_member_and_resets_next_period() {
    let plan = member_plan(Some(12));
    let now = t0();
    let mut alice = AccountState::new(&plan, vec![], now);
    let mut bob = AccountState::new(&plan, vec![], now);
    let mut pool = pool_state(&[100]);
    let d = decide_in(&plan, &alice, Some(&pool), TASK, 2, now);
    assert!(d.admitted());
    reserve_in(&plan, &mut alice, Some(&mut pool), &d, now);
    // 10 of 12 used: a third task (5) does not fit the cap, whatever the pool holds.
    let denied = decide_in(&plan, &alice, Some(&pool), TASK, 1, now);
    assert_eq!(
        denied.denial,
        Some(Denial::InsufficientCredits {
            needed_credits: 5,
            available_credits: 2
        })
    );
    let report = denied.layers[1];
    assert_eq!(report.pool_credits, Some(90));
    assert_eq!(report.cap_left, Some(2));
    assert_eq!(report.reset_at, Some(Period::Day.bounds(Tz::UTC, now).1));
    // Bob has his own cap.
    let b = decide_in(&plan, &bob, Some(&pool), TASK, 2, now);
    assert!(b.admitted());
    reserve_in(&plan, &mut bob, Some(&mut pool), &b, now);
    assert_eq!(pool_left(&pool), 80);
    // The next day Alice's cap is whole again.
    let tomorrow = now + 24 * HOUR;
    assert!(decide_in(&plan, &alice, Some(&pool), TASK, 2, tomorrow).admitted());
}

#[test]
fn without_its_pool_a_workspace_layer_gives_nothing() {
    let plan = member_plan(Some(50));
    let member = AccountState::new(&plan, vec![], t0());
    let d = decide(&plan, &member, TASK, 1, t0());
    assert!(!d.admitted());
    assert_eq!(d.layers[1].pool_credits, Some(0));
}

#[test]
fn settling_a_workspace_draw_settles_the_pool_and_the_cap() {
    let plan = member_plan(Some(50));
    let now = t0();
    let mut member = AccountState::new(&plan, vec![], now);
    let mut pool = pool_state(&[100]);
    let d = decide_in(&plan, &member, Some(&pool), TASK, 3, now);
    reserve_in(&plan, &mut member, Some(&mut pool), &d, now);
    member.settled_in(Some(&mut pool), &d.draws, |_| None);
    assert_eq!(pool.grants()[0].unsettled, 0);
    assert!(pool.sync_grant(100, 85, Some(1)));
    assert_eq!(pool_left(&pool), 85);
    // Still counted against the cap after the commit, and after a rebuild from the ledger.
    let start = Period::Day.bounds(Tz::UTC, now).0;
    assert_eq!(member.workspace_used(1, start), 15);
    let mut rebuilt = AccountState::new(&plan, vec![], now);
    for draw in &d.draws {
        rebuilt.observe(&plan, draw, now);
    }
    assert_eq!(rebuilt.workspace_used(1, start), 15);
    member.resync_usage(&plan, &d.draws, now);
    assert_eq!(member.workspace_used(1, start), 15);
}

#[test]
fn settling_above_the_estimate_covers_from_the_pool_within_the_cap() {
    let plan = member_plan(Some(20));
    let now = t0();
    let mut member = AccountState::new(&plan, vec![], now);
    let mut pool = pool_state(&[100]);
    let d = decide_in(&plan, &member, Some(&pool), TASK, 2, now);
    reserve_in(&plan, &mut member, Some(&mut pool), &d, now);
    let (extra, forgiven) = cover_up_to_in(&plan, &member, Some(&pool), d.ongoing(), 5, now);
    assert_eq!(forgiven, 3, "the cap leaves 10 credits: 2 more tasks");
    let extra = extra.expect("two tasks covered");
    assert_eq!(extra.credits(), 10);
    reserve_in(&plan, &mut member, Some(&mut pool), &extra, now);
    assert_eq!(pool_left(&pool), 80);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Two members of one workspace request and release in any order: the pool never gives
    /// more than its balance, a member never more than its cap in a period, and releasing
    /// everything restores every number exactly.
    #[test]
    fn members_never_overdraw_the_pool_or_their_caps(
        cap in 0u64..60,
        balances in prop::collection::vec(0u64..40, 0..4),
        steps in prop::collection::vec((0usize..2, 0u8..3, 0u64..6, 0u32..600), 1..80),
    ) {
        let plan = member_plan(Some(cap));
        let mut now = t0();
        let start_total: Credits = balances.iter().sum();
        let mut pool = pool_state(&balances);
        let mut members = [AccountState::new(&plan, vec![], now), AccountState::new(&plan, vec![], now)];
        let mut held: [Vec<(Decision, Millis)>; 2] = [Vec::new(), Vec::new()];
        for (m, op, units, wait) in steps {
            now += Millis::from(wait) * MIN;
            match op {
                0 | 1 => {
                    let d = decide_in(&plan, &members[m], Some(&pool), TASK, units, now);
                    if !d.admitted() {
                        // Justified: neither the pool nor the cap left room.
                        let start = Period::Day.bounds(Tz::UTC, now).0;
                        let room = cap.saturating_sub(members[m].workspace_used(1, start)).min(pool_left(&pool));
                        prop_assert!(units * 5 > room);
                        continue;
                    }
                    reserve_in(&plan, &mut members[m], Some(&mut pool), &d, now);
                    held[m].push((d, now));
                }
                _ => {
                    if let Some((d, _)) = held[m].pop() {
                        release_in(&plan, &mut members[m], Some(&mut pool), &d.draws, now);
                    }
                }
            }
            // The pool gives what it has and no more; every credit is accounted for.
            let out: Credits = held.iter().flatten().map(|(d, _)| d.credits()).sum();
            prop_assert_eq!(pool_left(&pool) + out, start_total);
            // Per member and period, what is held never exceeds the cap.
            for h in &held {
                let mut by_period: Vec<(Millis, Credits)> = Vec::new();
                for (d, at) in h {
                    let p = Period::Day.bounds(Tz::UTC, *at).0;
                    match by_period.iter_mut().find(|(q, _)| *q == p) {
                        Some((_, c)) => *c += d.credits(),
                        None => by_period.push((p, d.credits())),
                    }
                }
                for (_, c) in by_period {
                    prop_assert!(c <= cap, "{} credits drawn against a cap of {}", c, cap);
                }
            }
        }
        for m in 0..2 {
            while let Some((d, _)) = held[m].pop() {
                release_in(&plan, &mut members[m], Some(&mut pool), &d.draws, now);
            }
            let start = Period::Day.bounds(Tz::UTC, now).0;
            prop_assert_eq!(members[m].workspace_used(1, start), 0);
        }
        prop_assert_eq!(pool_left(&pool), start_total);
        prop_assert!(pool.grants().iter().all(|g| g.unsettled == 0));
    }
}

/// What a replica hears of one grant after a run of commits, in [`settles_and_notices_in_any_order_end_at_the_newest_balance`].
#[derive(Debug, Clone, Copy)]
enum Heard {
    /// Another replica's commit of this version, announced.
    Notice(u64),
    /// Our draw number `.1`, debited by our commit of version `.0`, settled by our writer.
    Settle(u64, usize),
    /// Our writer's sync of its commit of this version, after the batch's settles.
    Synced(u64),
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The ledger writer settles its batches while the replica follower applies other
    /// replicas' notices, in any interleaving (they share `Accounts::apply_lock`). Whatever the
    /// order, the view never counts more credits left than the newest commit it has heard
    /// leaves beyond what it still holds, and once everything is heard it has exactly that.
    #[test]
    fn settles_and_notices_in_any_order_end_at_the_newest_balance(
        units in prop::collection::vec(1u64..10, 1..8),
        // The commits in store order: another replica's spend, or our next `n` draws.
        commits in prop::collection::vec(prop_oneof![
            (0u64..200).prop_map(|x| (false, x)),
            (1u64..4).prop_map(|n| (true, n)),
        ], 1..10),
        order in prop::collection::vec(any::<u32>(), 64),
    ) {
        let plan = Plan { layers: vec![layer("credits", LayerKind::Credits)], ..plan() };
        let start = 100_000;
        let mut s = AccountState::new(&plan, vec![grant(1, GrantKind::Credits, start)], t0());
        let draws: Vec<Decision> = units.iter().map(|&u| admit(&plan, &mut s, TASK, u, t0())).collect();
        let credits = |i: usize| draws[i].draws[0].credits;

        // The store's side: each commit's version (1, 2, …) and the balance it left, and which
        // of our draws each debited (`debited_in[i]`: the version, if any).
        let mut balance_at = vec![start];
        let mut debited_in: Vec<Option<u64>> = vec![None; draws.len()];
        let (mut ours, mut theirs, mut next) = (Vec::new(), Vec::new(), 0);
        for &(mine, n) in &commits {
            let v = balance_at.len() as u64;
            let mut left = *balance_at.last().unwrap();
            if mine {
                let mut batch = Vec::new();
                while batch.len() < n as usize && next < draws.len() {
                    left -= credits(next);
                    debited_in[next] = Some(v);
                    batch.push(Heard::Settle(v, next));
                    next += 1;
                }
                batch.push(Heard::Synced(v));
                ours.extend(batch);
            } else {
                left = left.saturating_sub(n);
                theirs.push(Heard::Notice(v));
            }
            balance_at.push(left);
        }
        let committed = |v: u64| (balance_at[v as usize], v);

        // The view's side: our writer's steps in order, the notices anywhere among them (and
        // in any order among themselves: each is the listener's, heard late or early).
        let mut heard: Vec<(u32, Heard)> = theirs.iter().enumerate().map(|(i, &h)| (order[i % 64], h)).collect();
        let mut keys: Vec<u32> = (0..ours.len()).map(|i| order[(i + 31) % 64]).collect();
        keys.sort_unstable();
        heard.extend(keys.into_iter().zip(ours.iter().copied()));
        heard.sort_by_key(|&(k, _)| k);

        // What is left beyond our holds, as the newest commit the view has heard says.
        let exact = |s: &AccountState| {
            let newest = s.grants()[0].version;
            let held: Credits = (0..draws.len())
                .filter(|&i| debited_in[i].is_none_or(|v| v > newest))
                .map(credits)
                .sum();
            balance_at[newest as usize] - held
        };
        for (_, h) in heard {
            match h {
                Heard::Notice(v) => { s.sync_grant(1, balance_at[v as usize], Some(v)); }
                Heard::Settle(v, i) => s.settled_in(None, &draws[i].draws, |_| Some(committed(v))),
                Heard::Synced(v) => { s.sync_grant(1, balance_at[v as usize], Some(v)); }
            }
            prop_assert!(s.grants()[0].balance <= exact(&s), "{:?}: {} > {}", h, s.grants()[0].balance, exact(&s));
        }
        let newest = balance_at.len() as u64 - 1;
        prop_assert_eq!(s.grants()[0].version, newest);
        prop_assert_eq!(s.grants()[0].balance, exact(&s));
    }
}
