//! Prometheus metrics, served at `/metrics`.
//!
//! One [`Metrics`] per gateway, registered in its own registry (tests run several gateways in
//! one process). Names follow Prometheus conventions: `flowgate_` prefix, base units in the
//! name (`_seconds`, `_credits`), `_total` on counters.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric flowgate exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Decisions by feature and outcome (`admitted` or the denial code).
    pub decisions: IntCounterVec,
    /// Units given by each layer to admitted decisions, by feature and layer.
    pub layer_units: IntCounterVec,
    /// Shadow-mode decisions (not counted in `decisions`), by feature, outcome (`would_admit`,
    /// `would_deny`) and reason (`admitted` or the would-be denial's code).
    pub shadow_decisions: IntCounterVec,
    /// Time to decide and hold, under the account's lock.
    pub decision_seconds: Histogram,
    /// Time from forwarding to the upstream's response headers, by upstream.
    pub upstream_seconds: HistogramVec,
    /// Requests by how they ended (as recorded in the ledger).
    pub requests: IntCounterVec,
    /// Attempts per upstream address, by result (`answered`, `refused`, `failed`, `timeout`).
    pub upstream_attempts: IntCounterVec,
    /// Units charged (committed), by feature and pool kind.
    pub units_consumed: IntCounterVec,
    /// Credits charged (committed), by pool kind (`credits`, `promotion`, `enterprise`, `postpaid`).
    pub credits_consumed: IntCounterVec,
    /// Credits a debit could not take and that were forgiven.
    pub overdraft_forgiven: IntCounter,
    /// Entries queued for the ledger, not yet committed.
    pub ledger_queue_depth: IntGauge,
    /// Entries per committed batch.
    pub ledger_batch_size: Histogram,
    /// Time to commit one batch.
    pub ledger_commit_seconds: Histogram,
    /// Time from a request's end to its ledger commit.
    pub ledger_lag_seconds: Histogram,
    /// Account lookups in the cached view, by result (`hit`, `miss`).
    pub cache_lookups: IntCounterVec,
    /// Failed store operations (each failed commit attempt counts).
    pub store_errors: IntCounter,
    /// Strict mode's lease rounds, by result (`granted`, `drained`: less than asked, `failed`).
    pub lease_rounds: IntCounterVec,
    /// Time of one lease round (a request of a strict account waits for it).
    pub lease_round_seconds: Histogram,
    /// Watched streams by how they ended (`paid`, `forgiven`: ran past what the account could
    /// pay, `stopped`: ended by the gateway).
    pub watched_streams: IntCounterVec,
    /// From another replica's ledger commit to this replica applying it (clocks of two
    /// machines: as good as their synchronisation).
    pub replica_lag_seconds: Histogram,
    /// Billing export: age of the oldest unsent outbox row, by sink (0: none).
    pub export_lag_seconds: GaugeVec,
    /// Billing export: unsent outbox rows, by sink.
    pub export_backlog: IntGaugeVec,
    /// Client connections open, by serving thread (`0`, `1`, …).
    pub connections_open: IntGaugeVec,
    /// Billing export: events the receiver accepted, by sink.
    pub export_sent: IntCounterVec,
    /// Billing export: failed sends, by sink and reason (`status`, `connect`, `rejected`,
    /// `store`).
    pub export_failed: IntCounterVec,
    /// Threshold alerts recorded (fired), by rule.
    pub alerts_fired: IntCounterVec,
    /// Alert deliveries the webhook accepted.
    pub alerts_sent: IntCounter,
    /// Alert deliveries that failed (each is retried).
    pub alerts_failed: IntCounter,
}

/// Seconds, from a microsecond (a decision) to half a minute (a slow upstream). 20 ms is the
/// ledger's commit-lag objective at 10 000 events/s (docs/BENCHMARKS.md), so it is a bound.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_001, 0.000_002, 0.000_005, 0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_25, 0.000_5,
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Registration fails only for duplicate names, which these constants cannot have.
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            let _ = r.register(Box::new(c.clone()));
            c
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels)
                    .unwrap_or_else(|_| unreachable!()),
            )
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable!()),
            )
        };
        let int_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable!()),
            )
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            reg(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .unwrap_or_else(|_| unreachable!()),
            )
        };
        Metrics {
            decisions: counter_vec(
                "flowgate_decisions_total",
                "Waterfall decisions by feature and outcome.",
                &["feature", "outcome"],
            ),
            shadow_decisions: counter_vec(
                "flowgate_shadow_decisions_total",
                "Shadow-mode decisions (forwarded, never charged) by feature, what enforcing would have done, and why.",
                &["feature", "outcome", "reason"],
            ),
            layer_units: counter_vec(
                "flowgate_decision_layer_units_total",
                "Units given by each layer to admitted decisions.",
                &["feature", "layer"],
            ),
            decision_seconds: histogram(
                "flowgate_decision_duration_seconds",
                "Time to decide and hold a request.",
                LATENCY_BUCKETS.to_vec(),
            ),
            upstream_seconds: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "flowgate_upstream_duration_seconds",
                        "Time from forwarding to the upstream's response headers.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["upstream"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            upstream_attempts: counter_vec(
                "flowgate_upstream_attempts_total",
                "Attempts per upstream address, by result.",
                &["upstream", "address", "result"],
            ),
            requests: counter_vec(
                "flowgate_requests_total",
                "Requests by how they ended.",
                &["outcome"],
            ),
            units_consumed: counter_vec(
                "flowgate_units_consumed_total",
                "Units charged, by feature and pool kind.",
                &["feature", "pool"],
            ),
            credits_consumed: counter_vec(
                "flowgate_credits_consumed_total",
                "Credits charged, by pool kind.",
                &["pool"],
            ),
            overdraft_forgiven: reg(
                &registry,
                IntCounter::new(
                    "flowgate_overdraft_forgiven_credits_total",
                    "Credits a debit could not take, forgiven.",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            ledger_queue_depth: reg(
                &registry,
                IntGauge::new(
                    "flowgate_ledger_queue_depth",
                    "Entries queued for the ledger, not yet committed.",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            ledger_batch_size: histogram(
                "flowgate_ledger_batch_size",
                "Entries per committed ledger batch.",
                vec![
                    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 512.0, 1024.0, 4096.0,
                ],
            ),
            ledger_commit_seconds: histogram(
                "flowgate_ledger_commit_duration_seconds",
                "Time to commit one ledger batch.",
                LATENCY_BUCKETS.to_vec(),
            ),
            ledger_lag_seconds: histogram(
                "flowgate_ledger_lag_seconds",
                "Time from a request's end to its ledger commit.",
                LATENCY_BUCKETS.to_vec(),
            ),
            cache_lookups: counter_vec(
                "flowgate_account_cache_lookups_total",
                "Account lookups in the cached view.",
                &["result"],
            ),
            store_errors: reg(
                &registry,
                IntCounter::new("flowgate_store_errors_total", "Failed store operations.")
                    .unwrap_or_else(|_| unreachable!()),
            ),
            lease_rounds: counter_vec(
                "flowgate_lease_rounds_total",
                "Strict mode's lease rounds, by result.",
                &["result"],
            ),
            lease_round_seconds: histogram(
                "flowgate_lease_round_duration_seconds",
                "Time of one strict-mode lease round.",
                LATENCY_BUCKETS.to_vec(),
            ),
            watched_streams: counter_vec(
                "flowgate_watched_streams_total",
                "Watched streams by how they ended.",
                &["ending"],
            ),
            replica_lag_seconds: histogram(
                "flowgate_replica_notification_lag_seconds",
                "From another replica's ledger commit to this replica applying it.",
                LATENCY_BUCKETS.to_vec(),
            ),
            export_lag_seconds: gauge_vec(
                "flowgate_export_lag_seconds",
                "Age of the oldest unsent billing-export event.",
                &["sink"],
            ),
            connections_open: int_gauge_vec(
                "flowgate_connections_open",
                "Client connections open, by serving thread.",
                &["thread"],
            ),
            export_backlog: int_gauge_vec(
                "flowgate_export_backlog",
                "Unsent billing-export events.",
                &["sink"],
            ),
            export_sent: counter_vec(
                "flowgate_export_sent_total",
                "Billing-export events the receiver accepted.",
                &["sink"],
            ),
            export_failed: counter_vec(
                "flowgate_export_failed_total",
                "Failed billing-export sends, by reason.",
                &["sink", "reason"],
            ),
            alerts_fired: counter_vec(
                "flowgate_alerts_fired_total",
                "Threshold alerts recorded, by rule.",
                &["rule"],
            ),
            alerts_sent: reg(
                &registry,
                IntCounter::new(
                    "flowgate_alerts_sent_total",
                    "Alert deliveries the webhook accepted.",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            alerts_failed: reg(
                &registry,
                IntCounter::new(
                    "flowgate_alerts_failed_total",
                    "Alert deliveries that failed (retried).",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            registry,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
