//! What watching a stream costs per event, beside what reading its settle value already costs:
//! the same 64-event stream (events of ~200 bytes, each reporting usage so far) read by a
//! route that only settles (`settle = { sse = … }`), and by one that also watches it (SSE
//! field, bytes), with the hold's growth (`waterfall::extend_in` + `reserve`, under a mutex as
//! in the gateway) on every event.
//!
//!     cargo bench --bench watch

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowgate::config::{OnExhausted, Progress, SettleRule, WatchRule};
use flowgate::settle::SettleReader;
use flowgate::watch::{Cover, Watcher};
use flowgate::waterfall::{
    AccountState, FeatureId, FeatureSet, Grant, GrantKind, Layer, LayerKind, Plan, PriceTable,
    decide, extend_in, reserve,
};
use http::HeaderMap;

const EVENTS: u64 = 64;
const TASK: FeatureId = FeatureId(0);
const NOW: i64 = 1_795_428_000_000;

fn stream() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=EVENTS {
        out.extend_from_slice(
            format!(
                "data: {{\"id\":\"render-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"frame {i} of the render, some text\"}}}}],\"usage\":{{\"seconds\":{i}}}}}\n\n"
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

fn plan() -> Plan {
    Plan {
        name: "pro".into(),
        layers: vec![Layer {
            name: "credits".into(),
            features: FeatureSet::ALL,
            kind: LayerKind::Credits,
        }],
        prices: vec![PriceTable::flat("v1", vec![Some(1)])],
        strict: false,
    }
}

fn sse_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("text/event-stream"),
    );
    h
}

fn bench(c: &mut Criterion) {
    let body = stream();
    // Upstream frames as they arrive: one event each.
    let frames: Vec<&[u8]> = body
        .split_inclusive(|b| *b == b'\n')
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|pair| {
            let start = pair[0].as_ptr() as usize - body.as_ptr() as usize;
            let len: usize = pair.iter().map(|p| p.len()).sum();
            &body[start..start + len]
        })
        .collect();
    let headers = sse_headers();
    let rule = SettleRule::Sse("/usage/seconds".into());
    let mut group = c.benchmark_group("stream_of_64_events");
    group.throughput(Throughput::Elements(EVENTS));

    group.bench_function("settle_only", |b| {
        b.iter(|| {
            let mut reader = SettleReader::new(&rule, &headers);
            for f in &frames {
                reader.observe(black_box(f));
            }
            black_box(reader.finish_units())
        })
    });

    let plan = plan();
    for (name, progress) in [
        (
            "settle_and_watch_sse",
            Progress::Sse("/usage/seconds".into()),
        ),
        ("settle_and_watch_bytes", Progress::Bytes(200)),
    ] {
        let watch = WatchRule {
            progress,
            on_exhausted: OnExhausted::Stop,
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let grant = Grant {
                    id: 1,
                    kind: GrantKind::Credits,
                    balance: 1_000_000,
                    unsettled: 0,
                    version: 0,
                    expires_at: flowgate::waterfall::NEVER,
                    priority: 0,
                    features: FeatureSet::ALL,
                };
                let state = parking_lot::Mutex::new(AccountState::new(&plan, vec![grant], NOW));
                let first = decide(&plan, &state.lock(), TASK, 1, NOW);
                reserve(&plan, &mut state.lock(), &first, NOW);
                let mut held = 1;
                let mut reader = SettleReader::new(&rule, &headers);
                let mut watcher = Watcher::new(&watch, NOW);
                for f in &frames {
                    let step = watcher.feed(black_box(f), NOW, |total| {
                        let mut s = state.lock();
                        let more = extend_in(&plan, &s, None, first.ongoing(), total - held, NOW);
                        reserve(&plan, &mut s, &more, NOW);
                        held = total;
                        Cover::Covered
                    });
                    if let flowgate::watch::Step::Pass(bytes) = step {
                        reader.observe(&bytes);
                    }
                }
                black_box((reader.finish_units(), held))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
