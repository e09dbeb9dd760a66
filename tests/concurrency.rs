//! A plan's concurrency layer: at most N requests of a feature in flight per account, refused
//! like the other limits (429 naming the limit, how many run, `retry-after`), and counted right
//! when a stream ends, a client leaves or the upstream fails.

mod common;

use std::time::Duration;

use common::{Harness, StoreKind, header};
use serde_json::Value;

store_tests!(at_most_two_renders_run_at_once_and_every_ending_frees_a_slot);

async fn start(store: StoreKind) -> Harness {
    Harness::start_with(store, |c| {
        c.replacen(
            "[[plans.pro.layers]]\nkind = \"usage_limit\"",
            "[[plans.pro.layers]]\nkind = \"concurrency\"\nname = \"renders\"\nlimit = 2\nfeatures = [\"video_second\"]\n\n[[plans.pro.layers]]\nkind = \"usage_limit\"",
            1,
        )
    })
    .await
}

/// A render of `seconds`, one event every `interval_ms`.
fn render(h: &Harness, seconds: u64, interval_ms: u64) -> reqwest::RequestBuilder {
    h.post("/v1/videos", "sk-alice")
        .header("x-mock-interval-ms", interval_ms)
        .json(&serde_json::json!({ "seconds": seconds }))
}

async fn at_most_two_renders_run_at_once_and_every_ending_frees_a_slot(store: StoreKind) {
    let h = start(store).await;
    // Two long renders hold both slots while their streams flow.
    let first = render(&h, 1, 2_000).send().await.unwrap();
    let second = render(&h, 1, 2_000).send().await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );

    let third = render(&h, 1, 10).send().await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(header(&third, "retry-after"), "1");
    assert!(
        !third.headers().contains_key("x-should-retry"),
        "waiting helps: no x-should-retry: false"
    );
    let e: Value = third.json().await.unwrap();
    assert_eq!(e["error"]["code"], "concurrency_limit_reached");
    assert_eq!(
        (e["error"]["limit"].clone(), e["error"]["running"].clone()),
        (2.into(), 2.into())
    );
    // Tasks are not gated by the renders' limit.
    let task = h.task("sk-alice", 1).await;
    assert_eq!(task.status(), 200);
    task.bytes().await.unwrap();

    // A client that leaves mid-stream frees its slot.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = render(&h, 1, 10).send().await.unwrap();
    assert_eq!(r.status(), 200, "a slot freed by the client leaving");
    r.bytes().await.unwrap(); // a stream that ends frees its slot too

    // An upstream failure frees its slot at once.
    let failed = render(&h, 1, 10)
        .header("x-mock-status", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    failed.bytes().await.unwrap();

    // One slot is still held by `second`; the other is free, and only one.
    let a = render(&h, 1, 2_000).send().await.unwrap();
    assert_eq!(a.status(), 200);
    let b = render(&h, 1, 10).send().await.unwrap();
    assert_eq!(b.status(), 429);
    drop((a, second));
}
