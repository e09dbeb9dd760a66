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
