//! An upstream with several addresses: requests take turns across them; an address that refuses
//! connections is left out (and the request goes to the next, which it never reached); a request
//! that may have reached an address is never sent to another.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Harness, StoreKind};
use flowgate::demo::backend::MockBackend;

/// Starts the harness with the backend upstream's address replaced by `urls`.
async fn start(urls: Vec<String>) -> Harness {
    Harness::start_with(StoreKind::Sqlite, move |c| {
        let at = c
            .find("[upstreams.backend]\nurl = ")
            .expect("the backend upstream");
        let end = at + c[at..].find("\"\n").expect("its url line") + 2;
        let list: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
        format!(
            "{}[upstreams.backend]\nurls = [{}]\n{}",
            &c[..at],
            list.join(", "),
            &c[end..]
        )
    })
    .await
}

fn calls(b: &MockBackend) -> u64 {
    b.counters().requests.load(Ordering::Relaxed)
}

/// A port nothing listens on.
async fn closed_port() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// An address that accepts a connection, reads the request, and hangs up without answering.
async fn hang_up() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    format!("http://{addr}")
}

async fn ok(h: &Harness) -> u16 {
    let r = h.task("sk-alice", 1).await;
    let status = r.status().as_u16();
    r.bytes().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_take_turns_across_the_addresses() {
    let (a, b) = (
        MockBackend::start().await.unwrap(),
        MockBackend::start().await.unwrap(),
    );
    let h = start(vec![a.url(), b.url()]).await;
    for _ in 0..3 {
        assert_eq!(ok(&h).await, 200);
    }
    // Tasks past the window and the credits are denied before forwarding; three are enough.
    assert!(
        calls(&a) >= 1 && calls(&b) >= 1,
        "a {} b {}",
        calls(&a),
        calls(&b)
    );
    assert_eq!(calls(&a) + calls(&b), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_address_is_left_out_and_its_requests_go_to_the_next() {
    let live = MockBackend::start().await.unwrap();
    let h = start(vec![closed_port().await, live.url()]).await;
    for _ in 0..6 {
        assert_eq!(h.task("sk-dave", 0).await.status(), 200);
    }
    assert_eq!(
        calls(&live),
        6,
        "every request answered by the live address"
    );
    let metrics = h
        .http
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("flowgate_upstream_attempts_total") && l.contains("result=\"refused\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("refusals are counted per address");
    assert_eq!(refused, 1.0, "left out after its first refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_may_have_arrived_is_never_sent_again() {
    let live = MockBackend::start().await.unwrap();
    let h = start(vec![hang_up().await, live.url()]).await;
    // The first request goes to the first address, which read it and hung up: 502, and the
    // live address never saw it.
    let first = h.task("sk-alice", 1).await;
    assert_eq!(first.status(), 502);
    first.bytes().await.unwrap();
    assert_eq!(
        calls(&live),
        0,
        "a request that may have arrived was sent again"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The next in turn is the live address.
    assert_eq!(ok(&h).await, 200);
    assert_eq!(calls(&live), 1);
}
