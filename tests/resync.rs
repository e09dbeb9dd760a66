//! A replica's view re-read while other replicas commit, on a real PostgreSQL database: a
//! commit the re-read already includes, heard afterwards from the listener, is not counted a
//! second time. (The listener hears every commit from the moment it listens, and a re-read made
//! after that includes some of them: before `store::ReadMark`, a replica starting next to a
//! busy one could count their usage twice and deny a window's last units, or move them to
//! credits.)

mod common;

use std::time::Duration;

use common::{Harness, StoreKind};
use flowgate::accounts::Accounts;
use flowgate::config::Settings;
use flowgate::store::{Change, Store};
use std::sync::Arc;

/// alice's `limits` layer (5h: 3, week: 10) as the view counts it.
fn alice_used(accounts: &Accounts) -> u64 {
    accounts
        .get("alice")
        .expect("alice in the view")
        .with_state(|_, s| s.usage_log(0).expect("a usage-limit layer").used_since(0))
}

async fn next_ledger_change(changes: &mut tokio::sync::mpsc::Receiver<Change>) -> Change {
    loop {
        let change = tokio::time::timeout(Duration::from_secs(10), changes.recv())
            .await
            .expect("a notification within 10 s")
            .expect("the listener runs");
        if matches!(change, Change::Ledger(_)) {
            return change;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_heard_after_a_re_read_that_included_it_counts_once() {
    let h = Harness::start(StoreKind::Postgres).await;
    let settings = Arc::new(Settings::parse(&h.config).expect("config"));
    // Another replica's view and listener on the same database.
    let store = Store::open(&h.store_url).await.expect("store opens");
    let now = h.clock.now_ms();
    let accounts = Accounts::load(&store, &settings, now).await.expect("load");
    let mut changes = store.watch().expect("PostgreSQL announces commits");
    assert_eq!(
        changes.recv().await,
        Some(Change::Resync),
        "a new listener first says to re-read"
    );
    assert_eq!(alice_used(&accounts), 0);

    // The first gateway charges 2 units of alice's window; its commit is announced.
    let r = h.task("sk-alice", 2).await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    h.settle_ledger().await;
    let heard = next_ledger_change(&mut changes).await;

    // The re-read includes that commit; the notice, applied after it, must not add to it.
    accounts.resync(&store, now).await.expect("resync");
    assert_eq!(alice_used(&accounts), 2, "the re-read counts the commit");
    let Change::Ledger(change) = heard else {
        unreachable!()
    };
    assert_ne!(change.xid, 0, "a notice names its transaction");
    {
        let _sync = accounts.apply_lock().await;
        accounts.apply(&change, now);
    }
    assert_eq!(alice_used(&accounts), 2, "counted once, not twice");

    // A commit after the re-read is counted when heard.
    let r = h.task("sk-alice", 1).await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    h.settle_ledger().await;
    let Change::Ledger(change) = next_ledger_change(&mut changes).await else {
        unreachable!()
    };
    {
        let _sync = accounts.apply_lock().await;
        accounts.apply(&change, now);
    }
    assert_eq!(alice_used(&accounts), 3, "a later commit counts");
}

/// A mark includes exactly the transactions that had ended when its snapshot was taken.
#[test]
fn read_marks_include_exactly_the_commits_a_snapshot_saw() {
    use flowgate::store::ReadMark;
    let mark = ReadMark::parse("100:105:101,103").expect("a snapshot");
    assert!(mark.includes(99), "ended before the snapshot");
    assert!(
        mark.includes(102) && mark.includes(104),
        "ended between xmin and xmax"
    );
    assert!(
        !mark.includes(101) && !mark.includes(103),
        "running at the snapshot"
    );
    assert!(!mark.includes(105) && !mark.includes(900), "began after it");
    assert!(
        !mark.includes(0),
        "an unknown transaction is never included"
    );
    assert_eq!(ReadMark::parse("7:7:"), ReadMark::parse("7:7:"));
    assert!(ReadMark::parse("7:7:").expect("no running").includes(6));
    for bad in ["", "1", "1:2", "2:1:", "a:b:", "1:5:x"] {
        assert_eq!(ReadMark::parse(bad), None, "{bad:?}");
    }
}
