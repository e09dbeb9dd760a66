//! `flowgate replay` on a ledger made by a real gateway run (a real upstream on loopback,
//! requests through the gateway), on both stores: a candidate with a stricter window and a new
//! price gives the denials and credits computed by hand below; the identical config reproduces
//! the ledger's charges exactly; nothing is written; bad arguments get a clear error.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Harness, StoreKind};
use serde_json::{Value, json};

store_tests!(
    replay_of_a_real_ledger_under_a_candidate,
    replay_under_the_same_config_reproduces_the_ledger,
    replay_refuses_bad_arguments_and_writes_nothing
);

/// Runs `flowgate replay` with `args`; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("replay")
        .args(args)
        .env_remove("FLOWGATE_STORE_URL")
        .output()
        .expect("flowgate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `flowgate replay --json` of the harness's ledger under `candidate` (config text).
fn replay_json(h: &Harness, dir: &Path, candidate: &str, extra: &[&str]) -> Value {
    let current = dir.join("current.toml");
    let cand = dir.join("candidate.toml");
    std::fs::write(&current, &h.config).unwrap();
    std::fs::write(&cand, candidate).unwrap();
    let mut args = vec![
        "--json",
        "--config",
        current.to_str().unwrap(),
        "--candidate",
        cand.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "replay failed: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
}

/// The test config with a video route that settles from the response's last SSE event.
async fn start(store: StoreKind) -> Harness {
    Harness::start_with(store, |c| {
        c.replace(
            "cost = { json = \"/seconds\" }",
            "cost = { json = \"/seconds\" }\nsettle = { sse = \"/usage/seconds\" }",
        )
    })
    .await
}

/// Traffic through the gateway; what the ledger then says (by hand, from the test config:
/// pro = window 5h:3 / week:10 for tasks, then credits, 5 credits a task, 2 a video second;
/// lite = window 5h:2):
///
/// - alice (100 credits): tasks of 2 (window), 2 (1 window + 1 credit unit), 1, 3 (credits):
///   5 + 5 + 15 = 25 credits; a task the upstream fails (500: held, released, not charged);
///   a video estimated at 2 s that settles at 9 s: 18 credits. 43 credits in all.
/// - carol (lite, no credits): three tasks of 1: the third is denied (usage_limit_reached).
/// - dave (12 credits): a task of 3 (window), then one of 3 denied: the window is used up and
///   12 credits pay 2 units — waiting for the window would help (usage_limit_reached).
async fn traffic(h: &Harness) {
    for units in [2, 2, 1, 3] {
        let r = h.task("sk-alice", units).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    let r = h
        .post("/v1/tasks", "sk-alice")
        .header("x-units", 1)
        .header("x-mock-status", 500)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    r.text().await.unwrap();
    let r = h
        .post("/v1/videos", "sk-alice")
        .header("x-mock-usage", 9)
        .json(&json!({"seconds": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    for expected in [200, 200, 429] {
        let r = h.task("sk-carol", 1).await;
        assert_eq!(r.status(), expected);
        r.text().await.unwrap();
    }
    for expected in [200, 429] {
        let r = h.task("sk-dave", 3).await;
        assert_eq!(r.status(), expected);
        r.text().await.unwrap();
    }
    h.settle_ledger().await;
}

fn account<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["account"] == id)
        .unwrap_or_else(|| panic!("no {id} in {report:#}"))
}

async fn replay_of_a_real_ledger_under_a_candidate(store: StoreKind) {
    let h = start(store).await;
    traffic(&h).await;
    let dir = tempfile::tempdir().unwrap();
    // The candidate: 5-hour windows of 1 (pro) and 1 (lite), and a task costs 7.
    let candidate = h
        .config
        .replace(
            "{ name = \"5h\", duration = \"5h\", limit = 3 }",
            "{ name = \"5h\", duration = \"5h\", limit = 1 }",
        )
        .replace(
            "windows = [{ name = \"5h\", duration = \"5h\", limit = 2 }]",
            "windows = [{ name = \"5h\", duration = \"5h\", limit = 1 }]",
        )
        .replace(
            "price_version = \"test-1\"\nprices = { task = 5, video_second = 2 }",
            "price_version = \"test-2\"\nprices = { task = 7, video_second = 2 }",
        );
    assert_ne!(candidate, h.config);
    let report = replay_json(&h, dir.path(), &candidate, &[]);

    // alice, by hand under the candidate: 2 → 1 window + 1 credit unit (7), 2 → 14, 1 → 7,
    // 3 → 21: 49; the failed task holds 7 and gives them back; the video is 18 as before. 67.
    let alice = account(&report, "alice");
    assert_eq!(alice["requests"], 6, "{alice:#}");
    assert_eq!(alice["before"]["credits"], 43, "{alice:#}");
    assert_eq!(alice["after"]["credits"], 67, "{alice:#}");
    assert_eq!(alice["credits_delta"], 24);
    assert_eq!(alice["before"]["denied"], 0);
    assert_eq!(alice["after"]["denied"], 0);
    assert_eq!(alice["before"]["admitted"], 6);
    assert_eq!(alice["before"]["charges"], 5);
    assert_eq!(alice["after"]["charges"], 5);
    assert_eq!(
        alice["before"]["pools"],
        json!({"usage_limit": {"units": 3, "credits": 0}, "credits": {"units": 14, "credits": 43}})
    );
    assert_eq!(
        alice["after"]["pools"],
        json!({"usage_limit": {"units": 1, "credits": 0}, "credits": {"units": 16, "credits": 67}})
    );

    // carol: a window of 1 denies her second and third tasks.
    let carol = account(&report, "carol");
    assert_eq!(
        carol["before"]["denials"],
        json!({"usage_limit_reached": 1})
    );
    assert_eq!(carol["after"]["denials"], json!({"usage_limit_reached": 2}));
    assert_eq!(carol["newly_denied"], 1);
    assert_eq!(carol["after"]["pools"]["usage_limit"]["units"], 1);

    // dave: window 1 + 12 credits pay 1 + 1 units of 3, and no window of 1 can ever hold the
    // other 2: both tasks are denied for credits now.
    let dave = account(&report, "dave");
    assert_eq!(dave["before"]["denials"], json!({"usage_limit_reached": 1}));
    assert_eq!(dave["after"]["denials"], json!({"insufficient_credits": 2}));
    assert_eq!(dave["newly_denied"], 1);
    assert_eq!(dave["after"]["admitted"], 0);

    let totals = &report["totals"];
    assert_eq!(totals["requests"], 11);
    assert_eq!(totals["before"]["credits"], 43);
    assert_eq!(totals["after"]["credits"], 67);
    assert_eq!(totals["newly_denied"], 2);
    assert_eq!(totals["after"]["denied"], 4);
    assert_eq!(report["events"]["read"], 11);
    assert_eq!(report["events"]["skipped"], 0);
    // Most affected: alice's credits, then the new denials by account id.
    let top: Vec<&str> = report["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["account"].as_str().unwrap())
        .collect();
    assert_eq!(top, ["alice", "carol", "dave"]);

    // One account counted; the others are still replayed (and `--top` bounds the list).
    let only = replay_json(
        &h,
        dir.path(),
        &candidate,
        &["--account", "carol", "--top", "0"],
    );
    assert_eq!(only["accounts"].as_array().unwrap().len(), 1);
    assert_eq!(
        only["totals"],
        account(&report, "carol").clone().tap_remove()
    );
    assert_eq!(only["top"], json!([]));
    assert_eq!(only["events"]["counted"], 3);

    // The human table names every account and the total.
    let (code, out, err) = run(&[
        "--config",
        dir.path().join("current.toml").to_str().unwrap(),
        "--candidate",
        dir.path().join("candidate.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    for word in [
        "alice",
        "carol",
        "dave",
        "TOTAL",
        "insufficient_credits=2",
        "+24",
    ] {
        assert!(out.contains(word), "{word} not in\n{out}");
    }
    assert!(err.contains("events/s"), "{err}");
}

/// Removes an account report's own fields, leaving its summary (to compare with totals).
trait TapRemove {
    fn tap_remove(self) -> Value;
}
impl TapRemove for Value {
    fn tap_remove(mut self) -> Value {
        let o = self.as_object_mut().unwrap();
        o.remove("account");
        o.remove("plan");
        self
    }
}

async fn replay_under_the_same_config_reproduces_the_ledger(store: StoreKind) {
    let h = start(store).await;
    traffic(&h).await;
    let dir = tempfile::tempdir().unwrap();
    let report = replay_json(&h, dir.path(), &h.config.clone(), &[]);
    for a in report["accounts"].as_array().unwrap() {
        assert_eq!(a["before"], a["after"], "{a:#}");
        assert_eq!(a["credits_delta"], 0);
        assert_eq!(a["newly_denied"], 0);
        assert_eq!(a["newly_admitted"], 0);
    }
    assert_eq!(report["totals"]["before"]["credits"], 43);
    assert_eq!(report["totals"]["before"], report["totals"]["after"]);
    assert_eq!(report["top"], json!([]));

    // A window counted from the ledger's start: counting from after carol's first task leaves
    // it out of the report but not out of her window (her third task is still denied).
    let carol = h.store().await.usage_events("carol", 10).await.unwrap();
    let denied = carol
        .iter()
        .find(|e| e.outcome == "denied")
        .expect("carol's denial");
    let from = chrono::DateTime::from_timestamp_millis(denied.decided_at)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let later = replay_json(&h, dir.path(), &h.config.clone(), &["--from", &from]);
    let c = account(&later, "carol");
    let since = carol
        .iter()
        .filter(|e| e.decided_at >= denied.decided_at)
        .count();
    assert!(since < 3, "carol's tasks were decided in one millisecond");
    assert_eq!(c["requests"], since, "{later:#}");
    assert_eq!(c["before"], c["after"]);
    assert_eq!(c["after"]["denials"], json!({"usage_limit_reached": 1}));
}

async fn replay_refuses_bad_arguments_and_writes_nothing(store: StoreKind) {
    let h = start(store).await;
    traffic(&h).await;
    let dir = tempfile::tempdir().unwrap();
    let before = h.store().await.counts().await.unwrap();
    let report = replay_json(&h, dir.path(), &h.config.clone(), &[]);
    assert_eq!(report["events"]["read"], 11);
    let current = dir.path().join("current.toml");
    let current = current.to_str().unwrap();

    // A candidate that does not load: named, with its key and line.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, h.config.replace("limit = 3 }", "limit = -3 }")).unwrap();
    let (code, out, err) = run(&["--config", current, "--candidate", bad.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("--candidate") && err.contains("line"), "{err}");

    let good = dir.path().join("candidate.toml");
    let good = good.to_str().unwrap();
    // A time that is not RFC 3339.
    let (code, _, err) = run(&[
        "--config",
        current,
        "--candidate",
        good,
        "--from",
        "yesterday",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--from"), "{err}");
    // An empty range.
    let (code, _, err) = run(&[
        "--config",
        current,
        "--candidate",
        good,
        "--from",
        "2030-01-02T00:00:00Z",
        "--to",
        "2030-01-01T00:00:00Z",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--from must be before --to"), "{err}");
    // A plan or an account that does not exist.
    let (code, _, err) = run(&["--config", current, "--candidate", good, "--plan", "gold"]);
    assert_ne!(code, 0);
    assert!(err.contains("--plan \"gold\""), "{err}");
    let (code, _, err) = run(&["--config", current, "--candidate", good, "--account", "zed"]);
    assert_ne!(code, 0);
    assert!(err.contains("--account \"zed\""), "{err}");
    // An account whose plan the candidate lacks.
    let no_lite = dir.path().join("no-lite.toml");
    std::fs::write(
        &no_lite,
        h.config
            .replace("[plans.lite]", "[plans.lite2]")
            .replace("[[plans.lite.layers]]", "[[plans.lite2.layers]]")
            .replace("plan = \"lite\"", "plan = \"lite2\""),
    )
    .unwrap();
    let (code, _, err) = run(&[
        "--config",
        current,
        "--candidate",
        no_lite.to_str().unwrap(),
    ]);
    assert_eq!(
        code, 0,
        "the candidate's [[accounts]] moves carol to lite2: {err}"
    );
    std::fs::write(
        &no_lite,
        h.config
            .replace("[plans.lite]", "[plans.lite2]")
            .replace("[[plans.lite.layers]]", "[[plans.lite2.layers]]")
            .replace(
                "id = \"carol\"\nplan = \"lite\"",
                "id = \"carol\"\nplan = \"pro\"",
            ),
    )
    .unwrap();
    let (code, _, err) = run(&[
        "--config",
        current,
        "--candidate",
        no_lite.to_str().unwrap(),
        "--plan",
        "lite2",
    ]);
    assert_eq!(code, 0, "--plan replays everyone under lite2: {err}");

    // Nothing was written by any of it.
    assert_eq!(h.store().await.counts().await.unwrap(), before);

    // A SQLite ledger that does not exist is an error, and is not created.
    if store == StoreKind::Sqlite {
        let missing = dir.path().join("missing.db");
        let cfg = dir.path().join("missing.toml");
        std::fs::write(
            &cfg,
            h.config
                .replace(&h.store_url, &format!("sqlite://{}", missing.display())),
        )
        .unwrap();
        let (code, _, err) = run(&["--config", cfg.to_str().unwrap(), "--candidate", good]);
        assert_ne!(code, 0);
        assert!(
            err.contains("no ledger at") && err.contains("missing.db"),
            "{err}"
        );
        assert!(!missing.exists());
    }
}
