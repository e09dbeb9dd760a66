//! Config parsing and validation: every error names its key and line.

use super::*;

const EXAMPLE: &str = include_str!("../../config/flowgate.toml");

#[test]
fn example_config_is_valid() {
    let s = Settings::parse(EXAMPLE).expect("example config parses");
    assert!(!s.routes.is_empty());
    assert!(!s.plans.is_empty());
}

fn error_of(text: &str) -> ConfigError {
    Settings::parse(text).expect_err("config should be rejected")
}

#[test]
fn unknown_upstream_names_key_and_line() {
    let bad = EXAMPLE.replacen("upstream = \"codex\"", "upstream = \"nope\"", 1);
    let line = bad.lines().position(|l| l.contains("\"nope\"")).unwrap() + 1;
    let e = error_of(&bad);
    assert!(e.key.ends_with(".upstream"), "{e}");
    assert_eq!(e.line, Some(line), "{e}");
    assert!(e.message.contains("nope"), "{e}");
}

#[test]
fn type_errors_carry_the_line() {
    let bad = EXAMPLE.replacen(
        "upstream_timeout_ms = 30000",
        "upstream_timeout_ms = \"soon\"",
        1,
    );
    let line = bad.lines().position(|l| l.contains("\"soon\"")).unwrap() + 1;
    let e = error_of(&bad);
    assert_eq!(e.line, Some(line), "{e}");
}

#[test]
fn unknown_keys_are_rejected() {
    let e = error_of(&EXAMPLE.replacen("[server]", "[server]\nlisten_adress = 1", 1));
    assert!(e.message.contains("listen_adress"), "{e}");
}

#[test]
fn routes_on_the_gateways_own_paths_are_config_errors() {
    for path in [
        "/admin/v1/accounts",
        "/v1/me/usage",
        "/v1/decisions/{id}",
        "/metrics",
        "/admin",
    ] {
        let bad = EXAMPLE.replacen("path = \"/v1/tasks\"", &format!("path = \"{path}\""), 1);
        let written = format!("path = \"{path}\"");
        let line = bad.lines().position(|l| l.contains(&written)).unwrap() + 1;
        let e = error_of(&bad);
        assert!(e.key.ends_with(".path"), "{e}");
        assert_eq!(e.line, Some(line), "{e}");
    }
    // Near misses are fine.
    let ok = EXAMPLE.replacen("path = \"/v1/tasks\"", "path = \"/v1/meetings\"", 1);
    Settings::parse(&ok).expect("/v1/meetings is not reserved");
}

#[test]
fn admin_tokens_are_hashes_and_env_tokens_are_hashed() {
    let digest = hex::encode(sha256("s3cret"));
    let s = Settings::parse(&format!(
        "{EXAMPLE}\n[admin]\ntoken_hashes = [\"{digest}\"]\n"
    ))
    .unwrap();
    assert_eq!(s.admin.token_hashes, vec![sha256("s3cret")]);
    let e = error_of(&format!(
        "{EXAMPLE}\n[admin]\ntoken_hashes = [\"s3cret\"]\n"
    ));
    assert_eq!(e.key, "admin.token_hashes[0]", "{e}");
    assert!(!e.to_string().contains("s3cret"), "{e}");
    let mut admin = AdminSettings::default();
    assert!(!admin.enabled());
    admin.add_tokens(" one, ,two ");
    assert_eq!(admin.token_hashes, vec![sha256("one"), sha256("two")]);
    assert!(!format!("{admin:?}").contains(&hex::encode(sha256("one"))));
}

#[test]
fn zero_grant_and_bad_duration_are_rejected() {
    let e = error_of(&EXAMPLE.replacen("amount = 100", "amount = 0", 1));
    assert!(e.key.ends_with("amount"), "{e}");
    let e = error_of(&EXAMPLE.replacen("duration = \"5h\"", "duration = \"90s\"", 1));
    assert!(e.key.ends_with("duration"), "{e}");
}

#[test]
fn section_checks_name_their_keys() {
    let text = EXAMPLE.replace("ledger_queue_max = 10000", "ledger_queue_max = 0");
    assert_eq!(error_of(&text).key, "store.ledger_batch_size_max");
    let text = EXAMPLE.replace("connections_max = 10000", "connections_max = 0");
    assert_eq!(error_of(&text).key, "server.connections_max");
}

#[test]
fn a_cost_default_needs_a_stated_cost_and_stays_in_range() {
    let fixed = EXAMPLE.replacen(
        "cost = { fixed = 1 }",
        "cost = { fixed = 1 }\ncost_default = 2",
        1,
    );
    let e = error_of(&fixed);
    assert_eq!(e.key, "routes[0].cost_default");
    assert!(e.line.is_some());
    let huge = EXAMPLE.replacen(
        "cost = { json = \"/seconds\" }",
        "cost = { json = \"/seconds\" }\ncost_default = 1000000001",
        1,
    );
    assert!(error_of(&huge).key.ends_with(".cost_default"));
    let fine = EXAMPLE.replacen(
        "cost = { json = \"/seconds\" }",
        "cost = { json = \"/seconds\" }\ncost_default = 8",
        1,
    );
    let settings = Settings::parse(&fine).expect("valid");
    assert!(settings.routes.iter().any(|r| r.cost_default == Some(8)));
}

#[test]
fn a_watch_measures_progress_exactly_one_way_and_errors_name_its_key() {
    let settings = Settings::parse(EXAMPLE).expect("valid");
    let video = settings
        .routes
        .iter()
        .find(|r| r.path == "/v1/videos")
        .expect("the video route");
    assert_eq!(
        video.watch,
        Some(WatchRule {
            progress: Progress::Sse("/rendered_seconds".into()),
            on_exhausted: OnExhausted::Stop,
        })
    );
    let example = r#"watch = { sse = "/rendered_seconds", on_exhausted = "stop" }"#;
    for (bad, says) in [
        ("watch = { bytes_per_unit = 0 }", "at least 1"),
        (r#"watch = { sse = "rendered" }"#, "JSON pointer"),
        (
            r#"watch = { sse = "/a", bytes_per_unit = 3 }"#,
            "exactly one",
        ),
        ("watch = {}", "exactly one"),
        (r#"watch = { time_per_unit = "soon" }"#, "duration"),
    ] {
        let text = EXAMPLE.replacen(example, bad, 1);
        let e = error_of(&text);
        assert!(e.key.ends_with("].watch"), "{bad}: {e}");
        assert_eq!(e.line, Some(line_of(&text, bad)), "{bad}: {e}");
        assert!(e.message.contains(says), "{bad}: {e}");
    }
    let e = error_of(&EXAMPLE.replacen(example, r#"watch = { sse = "/a", on = "stop" }"#, 1));
    assert!(e.message.contains("unknown field"), "{e}");
    let timed = EXAMPLE.replacen(example, r#"watch = { time_per_unit = "500ms" }"#, 1);
    let settings = Settings::parse(&timed).expect("valid");
    assert!(settings.routes.iter().any(|r| r.watch
        == Some(WatchRule {
            progress: Progress::Time(500),
            on_exhausted: OnExhausted::Finish,
        })));
}

const OPENAI: &str = include_str!("../../config/examples/openai.toml");

#[test]
fn the_openai_example_prices_chat_per_model_and_dimension_with_a_price_change() {
    let s = Settings::parse(OPENAI).expect("the OpenAI example parses");
    let chat = s.feature_id("chat").expect("chat");
    let dev = &s.plans["developer"];
    assert_eq!(dev.prices.len(), 2);
    let (first, later) = (&dev.prices[0], &dev.prices[1]);
    assert_eq!(&*first.version, "2026-12-openai-1");
    assert_eq!(
        first.price(chat),
        Some(1),
        "a rated feature costs a credit per unit"
    );
    let rates = first.rates(chat).expect("chat is rated");
    // 1000 fresh input, 200 cached, 100 output tokens of gpt-4o: 2500 + 250 + 1000 credits.
    let q = [
        ("input_tokens", 1000),
        ("cached_input_tokens", 200),
        ("output_tokens", 100),
    ];
    assert_eq!(rates.units(Some("gpt-4o"), q), Some(3750));
    assert_eq!(
        rates.units(Some("o9-unknown"), q),
        None,
        "no row for any model"
    );
    // From February on, the second version: cheaper gpt-4o.
    assert_eq!(&*later.version, "2027-02-openai-2");
    let feb = parse_instant("2027-02-01T00:00:00Z").expect("instant");
    assert_eq!(dev.prices_at(feb - 1).0, 0);
    assert_eq!(dev.prices_at(feb).0, 1);
    let later_rates = later.rates(chat).expect("rated");
    assert_eq!(later_rates.units(Some("gpt-4o"), q), Some(3000));
    // The embedding price carries over to the new version unchanged.
    let emb = s.feature_id("embedding").expect("embedding");
    assert_eq!(later.rates(emb), first.rates(emb));
    // An enterprise plan extends the developer plan with its own chat rates for any model.
    let acme = &s.plans["acme"];
    assert_eq!(acme.layers.len(), dev.layers.len());
    assert_eq!(
        acme.prices[0]
            .rates(chat)
            .expect("rated")
            .units(Some("anything"), q),
        Some(1000 + 100 + 400)
    );
    assert_eq!(acme.prices[0].rates(emb), first.rates(emb));
    let route = s
        .routes
        .iter()
        .find(|r| r.path == "/v1/chat/completions")
        .expect("route");
    assert_eq!(route.model.as_deref(), Some("/model"));
    assert_eq!(route.cost_dimension.as_deref(), Some("output_tokens"));
}

#[test]
fn dimension_prices_are_checked_against_what_the_routes_measure() {
    // A flat price for a feature whose routes measure dimensions.
    let start = OPENAI
        .find("[plans.developer.prices.chat]")
        .expect("the chat rates");
    let end = start
        + OPENAI[start..]
            .find("[plans.developer.prices.embedding]")
            .expect("next");
    let flat = format!(
        "{}[plans.developer.prices]\nchat = 5\n{}",
        &OPENAI[..start],
        &OPENAI[end..]
    );
    let e = error_of(&flat);
    assert!(e.key.ends_with("developer.prices.chat"), "{e}");
    assert!(e.message.contains("measure dimensions"), "{e}");
    // A rate for a dimension no route measures.
    let e = error_of(&OPENAI.replacen(
        "\"gpt-4o\" = { input_tokens = 2500000,",
        "\"gpt-4o\" = { reasoning_tokens = 1, input_tokens = 2500000,",
        1,
    ));
    assert!(e.key.ends_with("models.gpt-4o.reasoning_tokens"), "{e}");
    assert!(e.message.contains("input_tokens"), "{e}");
    // A cost dimension the route does not settle.
    let e = error_of(&OPENAI.replacen(
        "cost_dimension = \"output_tokens\"",
        "cost_dimension = \"images\"",
        1,
    ));
    assert!(e.key.ends_with("cost_dimension"), "{e}");
    // Price changes in time order, with a readable instant.
    let e = error_of(&OPENAI.replacen("2027-02-01T00:00:00Z", "February", 1));
    assert!(e.key.ends_with("effective_from"), "{e}");
    assert!(e.line.is_some(), "{e}");
    // extends names a plan that exists.
    let e = error_of(&OPENAI.replacen("extends = \"developer\"", "extends = \"nope\"", 1));
    assert!(e.key.ends_with("acme.extends"), "{e}");
}

/// The line of the first occurrence of `needle` in `text`, outside comments.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| !l.trim_start().starts_with('#') && l.contains(needle))
        .expect("needle")
        + 1
}

const ROLLING_5H: &str = "{ name = \"5h\", duration = \"5h\", limit = 50 }";

#[test]
fn a_calendar_window_and_a_zoned_free_tier_are_compiled() {
    use crate::waterfall::{LayerKind, Period, Tz, WindowKind};
    let text = EXAMPLE
        .replacen(
            ROLLING_5H,
            "{ name = \"day\", reset = \"daily\", limit = 100, time_zone = \"America/New_York\" }",
            1,
        )
        .replacen(
            "{ name = \"week\", duration = \"7days\", limit = 500 }",
            "{ name = \"week\", reset = \"weekly\", limit = 500 }",
            1,
        )
        .replacen(
            "period = \"month\"",
            "period = \"month\"\ntime_zone = \"Europe/Paris\"",
            1,
        );
    let s = Settings::parse(&text).expect("valid");
    let pro = &s.plans["pro"];
    let windows = pro
        .layers
        .iter()
        .find_map(|l| match &l.kind {
            LayerKind::UsageLimit { windows } if l.name.as_ref() == "tasks" => Some(windows),
            _ => None,
        })
        .expect("the tasks layer");
    assert_eq!(
        windows[0].kind,
        WindowKind::Calendar {
            period: Period::Day,
            zone: chrono_tz::America::New_York
        }
    );
    // No zone: UTC.
    assert_eq!(
        windows[1].kind,
        WindowKind::Calendar {
            period: Period::Week,
            zone: Tz::UTC
        }
    );
    assert!(pro.layers.iter().any(|l| matches!(
        l.kind,
        LayerKind::FreeTier {
            period: Period::Month,
            zone: chrono_tz::Europe::Paris,
            ..
        }
    )));
    // The example's rolling windows and UTC free tier as they were.
    let s = Settings::parse(EXAMPLE).expect("valid");
    assert!(
        s.plans["pro"]
            .layers
            .iter()
            .any(|l| matches!(l.kind, LayerKind::FreeTier { zone: Tz::UTC, .. }))
    );
}

#[test]
fn a_window_is_rolling_or_calendar_never_both_nor_neither() {
    let both = EXAMPLE.replacen(
        ROLLING_5H,
        "{ name = \"5h\", duration = \"5h\", reset = \"daily\", limit = 50 }",
        1,
    );
    let e = error_of(&both);
    assert_eq!(e.key, "plans.pro.layers[1].windows[0].reset", "{e}");
    assert_eq!(e.line, Some(line_of(&both, "reset = \"daily\"")), "{e}");
    let neither = EXAMPLE.replacen(ROLLING_5H, "{ name = \"5h\", limit = 50 }", 1);
    let e = error_of(&neither);
    assert_eq!(e.key, "plans.pro.layers[1].windows[0].duration", "{e}");
    assert_eq!(
        e.line,
        Some(line_of(&neither, "name = \"5h\", limit")),
        "{e}"
    );
    assert!(e.message.contains("reset"), "{e}");
    let hourly = EXAMPLE.replacen(
        ROLLING_5H,
        "{ name = \"5h\", reset = \"hourly\", limit = 50 }",
        1,
    );
    let e = error_of(&hourly);
    assert_eq!(e.key, "plans.pro.layers[1].windows[0].reset", "{e}");
    assert_eq!(e.line, Some(line_of(&hourly, "\"hourly\"")), "{e}");
    assert!(e.message.contains("daily"), "{e}");
}

#[test]
fn a_bad_time_zone_names_its_key_and_line() {
    let window = EXAMPLE.replacen(
        ROLLING_5H,
        "{ name = \"day\", reset = \"daily\", limit = 50, time_zone = \"America/Nowhere\" }",
        1,
    );
    let e = error_of(&window);
    assert_eq!(e.key, "plans.pro.layers[1].windows[0].time_zone", "{e}");
    assert_eq!(e.line, Some(line_of(&window, "America/Nowhere")), "{e}");
    assert!(e.message.contains("America/Nowhere"), "{e}");
    let free = EXAMPLE.replacen(
        "period = \"month\"",
        "period = \"month\"\ntime_zone = \"CET+1\"",
        1,
    );
    let e = error_of(&free);
    assert_eq!(e.key, "plans.pro.layers[3].time_zone", "{e}");
    assert_eq!(e.line, Some(line_of(&free, "CET+1")), "{e}");
    // IANA names are case-sensitive.
    let lower = EXAMPLE.replacen(
        "period = \"month\"",
        "period = \"month\"\ntime_zone = \"europe/paris\"",
        1,
    );
    assert_eq!(error_of(&lower).key, "plans.pro.layers[3].time_zone");
}

#[test]
fn a_time_zone_where_none_applies_is_an_error() {
    let rolling = EXAMPLE.replacen(
        ROLLING_5H,
        "{ name = \"5h\", duration = \"5h\", limit = 50, time_zone = \"Europe/Paris\" }",
        1,
    );
    let e = error_of(&rolling);
    assert_eq!(e.key, "plans.pro.layers[1].windows[0].time_zone", "{e}");
    assert_eq!(e.line, Some(line_of(&rolling, "Europe/Paris")), "{e}");
    let credits = EXAMPLE.replacen(
        "kind = \"credits\"\n",
        "kind = \"credits\"\ntime_zone = \"Europe/Paris\"\n",
        1,
    );
    let e = error_of(&credits);
    assert!(e.key.ends_with("].time_zone"), "{e}");
    assert_eq!(e.line, Some(line_of(&credits, "Europe/Paris")), "{e}");
}

#[test]
fn a_strict_plan_may_have_a_calendar_month_but_no_longer_rolling_window() {
    let strict = EXAMPLE.replacen("strict = false", "strict = true", 1);
    let monthly = strict.replacen(
        ROLLING_5H,
        "{ name = \"month\", reset = \"monthly\", limit = 50 }",
        1,
    );
    Settings::parse(&monthly).expect("a calendar month fits the counters kept");
    let long = strict.replacen(
        ROLLING_5H,
        "{ name = \"5h\", duration = \"32days\", limit = 50 }",
        1,
    );
    assert_eq!(error_of(&long).key, "plans.pro.strict");
}

#[test]
fn a_workspace_layer_and_members_are_compiled() {
    let s = Settings::parse(EXAMPLE).expect("example config parses");
    let team = &s.plans["team"];
    let crate::waterfall::LayerKind::Workspace {
        member_cap: Some(cap),
    } = &team.layers[1].kind
    else {
        panic!("{:?}", team.layers[1].kind);
    };
    assert_eq!(
        (cap.credits, cap.period),
        (500, crate::waterfall::Period::Month)
    );
    let ana = s
        .accounts
        .iter()
        .find(|a| a.id == "initech-ana")
        .expect("member");
    assert_eq!(ana.workspace.as_deref(), Some("initech"));
}

#[test]
fn a_workspace_must_be_another_account_without_a_workspace() {
    for (workspace, message) in [
        ("nobody", "unknown account"),
        ("initech-ana", "cannot be a workspace"),
    ] {
        let bad = EXAMPLE.replacen(
            "workspace = \"initech\"",
            &format!("workspace = \"{workspace}\""),
            1,
        );
        let e = error_of(&bad);
        assert!(e.key.ends_with(".workspace"), "{e}");
        assert_eq!(
            e.line,
            Some(line_of(&bad, &format!("workspace = \"{workspace}\""))),
            "{e}"
        );
        assert!(e.message.contains(message), "{e}");
    }
    // A member of a member: the workspace has a workspace of its own.
    let bad = EXAMPLE.replacen(
        "id = \"initech\"\nplan = \"pro\"",
        "id = \"initech\"\nplan = \"pro\"\nworkspace = \"acme-dev\"",
        1,
    );
    let e = error_of(&bad);
    assert!(e.message.contains("cannot be a workspace"), "{e}");
}

#[test]
fn a_strict_plan_cannot_draw_a_workspace_pool_and_caps_are_checked() {
    let bad = EXAMPLE.replacen("[plans.team]\n", "[plans.team]\nstrict = true\n", 1);
    let e = error_of(&bad);
    assert_eq!(e.key, "plans.team.strict", "{e}");
    assert!(
        e.message
            .contains("strict plans cannot draw a workspace pool yet"),
        "{e}"
    );
    let bad = EXAMPLE.replacen("member_cap = 500", "member_cap = 0", 1);
    let e = error_of(&bad);
    assert!(e.key.ends_with(".member_cap"), "{e}");
    assert_eq!(e.line, Some(line_of(&bad, "member_cap = 0")), "{e}");
}

#[test]
fn shadow_mode_is_set_on_plans_routes_and_accounts() {
    let plain = Settings::parse(EXAMPLE).unwrap();
    assert!(plain.shadow_plans.is_empty());
    assert!(plain.routes.iter().all(|r| !r.shadow));
    assert!(plain.accounts.iter().all(|a| !a.shadow));
    let shadowed = EXAMPLE
        .replacen("shadow = false", "shadow = true", 1)
        .replacen("[[routes]]", "[[routes]]\nshadow = true", 1)
        .replacen("[[accounts]]", "[[accounts]]\nshadow = true", 1);
    let s = Settings::parse(&shadowed).unwrap();
    assert_eq!(s.shadow_plans, HashSet::from(["pro".to_owned()]));
    assert!(s.routes[0].shadow && s.routes.iter().skip(1).all(|r| !r.shadow));
    assert!(s.accounts[0].shadow);
    let bad = EXAMPLE.replacen("[[routes]]", "[[routes]]\nshadow = \"yes\"", 1);
    let line = bad.lines().position(|l| l.contains("\"yes\"")).unwrap() + 1;
    let e = error_of(&bad);
    assert_eq!(e.line, Some(line), "{e}");
    assert!(
        e.message.contains("bool") || e.message.contains("boolean"),
        "{e}"
    );
}
