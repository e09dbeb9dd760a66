//! `flowgate backup` copies a SQLite ledger while the gateway serves under load; `flowgate
//! restore` puts the copy in place as a new ledger, which reconciles clean and holds at least
//! what was committed before the backup began. Neither ever overwrites by accident, and a
//! damaged copy is refused.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Harness, StoreKind};
use flowgate::store::Store;

/// Runs the `flowgate` binary with `args`.
fn flowgate(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(args)
        .env_remove("FLOWGATE_STORE_URL")
        .output()
        .expect("flowgate runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A config file like the harness's, with its ledger at `ledger`.
fn config_for(h: &Harness, dir: &Path, name: &str, ledger: &Path) -> String {
    let path = dir.join(name);
    let text = h
        .config
        .replace(&h.store_url, &format!("sqlite://{}", ledger.display()));
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_and_reconciles_clean() {
    let h = Arc::new(Harness::start(StoreKind::Sqlite).await);
    let dir = tempfile::tempdir().unwrap();
    let live = h
        .store_url
        .strip_prefix("sqlite://")
        .expect("a SQLite harness")
        .to_owned();
    let live_config = config_for(&h, dir.path(), "live.toml", Path::new(&live));

    // Load: keyed requests, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (h, stop) = (h.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let r = h
                    .post("/v1/tasks", "sk-dave")
                    .header("x-units", 1)
                    .header("idempotency-key", format!("b-{n}"))
                    .send()
                    .await
                    .expect("answer");
                r.bytes().await.expect("body");
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What is committed when the backup begins (the load goes on).
    let before = h.store().await.counts().await.unwrap().usage_events;
    assert!(before > 10, "the load ran: {before}");

    let copy = dir.path().join("backup.db");
    let out = flowgate(&[
        "backup",
        "--config",
        &live_config,
        "--to",
        copy.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();

    // A backup never overwrites.
    let again = flowgate(&[
        "backup",
        "--config",
        &live_config,
        "--to",
        copy.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(text(&again).contains("exists already"), "{}", text(&again));

    // Restore into a new ledger, and reconcile it.
    let restored = dir.path().join("restored.db");
    let restored_config = config_for(&h, dir.path(), "restored.toml", &restored);
    let out = flowgate(&[
        "restore",
        "--config",
        &restored_config,
        "--from",
        copy.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = flowgate(&["reconcile", "--config", &restored_config]);
    assert!(
        out.status.success(),
        "the restored ledger reconciles: {}",
        text(&out)
    );
    let store = Store::open(&format!("sqlite://{}", restored.display()))
        .await
        .unwrap();
    let counts = store.counts().await.unwrap();
    assert!(
        counts.usage_events >= before,
        "the copy holds what was committed before it began: {} < {before}",
        counts.usage_events
    );
    assert!(
        counts.usage_events <= sent as u64 + 10,
        "and nothing invented"
    );
    drop(store);

    // An existing ledger is replaced only with --force; a damaged copy never.
    let out = flowgate(&[
        "restore",
        "--config",
        &restored_config,
        "--from",
        copy.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--force"), "{}", text(&out));
    let damaged = dir.path().join("damaged.db");
    std::fs::write(&damaged, b"SQLite format 3\0 but not really a database").unwrap();
    let out = flowgate(&[
        "restore",
        "--config",
        &restored_config,
        "--from",
        damaged.to_str().unwrap(),
        "--force",
    ]);
    assert!(!out.status.success(), "a damaged copy was restored");
    let out = flowgate(&["reconcile", "--config", &restored_config]);
    assert!(
        out.status.success(),
        "the ledger is untouched: {}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_ledger_is_sent_to_its_own_tools() {
    let h = Harness::start(StoreKind::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pg.toml");
    std::fs::write(&config, &h.config).unwrap();
    let copy = dir.path().join("pg-backup.db");
    let out = flowgate(&[
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--to",
        copy.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("pg_dump"), "{}", text(&out));
    assert!(!copy.exists());
}
