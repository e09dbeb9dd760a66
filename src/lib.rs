//! flowgate: a real-time access and credit gateway.
//!
//! For every request it answers, synchronously and in memory, *how much of this request is
//! allowed, and from which pool?*, forwards it, and afterwards records exactly once what was
//! used, what was charged and how each balance changed.
//!
//! # Layout
//!
//! Lowest first: each module imports only modules above it in this list's order of need
//! (`tests/layering.rs` fails on any import circle).
//!
//! - [`waterfall`]: the pure engine. Plans, layers, account state, [`waterfall::decide`],
//!   [`waterfall::reserve`], [`waterfall::release`]. No I/O, no clock.
//! - [`clock`]: "now" ([`clock::Clock`], injected everywhere; `clippy.toml` forbids other reads).
//! - [`ids`]: [`ids::AccountId`] and [`ids::IdempotencyKey`], parsed at the boundary.
//! - [`config`]: the TOML file, validated into [`config::Settings`] (errors name key and line).
//! - [`cost`]: a request's cost in units (fixed, a header, a JSON field).
//! - [`settle`]: the true cost read from the response as it streams.
//! - [`watch`]: a watched stream's progress, event by event, and what may pass.
//! - [`usage`]: [`usage::LedgerEntry`], what one request did; made by the gateway, committed by
//!   the store.
//! - [`store`]: the ledger's SQL, one module per dialect, behind one interface.
//! - [`accounts`]: the cached view the hot path decides against (a sharded map + one mutex per
//!   account), rebuilt from the store on start-up.
//! - [`idempotency`]: one request per `Idempotency-Key` at a time, one charge per key, repeats
//!   answered from the kept response.
//! - [`metrics`]: Prometheus metrics.
//! - [`strict`]: strict mode's lease rounds, renewals and returns (replicas that never
//!   overspend).
//! - [`ledger`]: the queue of finished requests and the writer that commits them in batches.
//! - [`logs`]: log lines gathered in memory and written to stderr in large writes.
//! - [`hold`]: an admitted request's reservation, which always ends (settled or released).
//! - [`quota`]: the `x-ratelimit-*` numbers of a response.
//! - [`rescue`]: every failure turned into an HTTP answer, in one place.
//! - [`app`]: the state handlers share; [`identity`]: who a request acts for.
//! - [`reconcile`]: re-derives charges and balances from the ledger.
//! - [`replay`]: what-if replay of the ledger's history under a candidate config (pure).
//! - [`api`]: the admin API, the user API and their OpenAPI document (`/openapi.json`).
//! - [`gateway`]: the tower layers of the request path, the router, start-up and shutdown.
//! - [`export`]: the billing export's senders (the store's outbox → OpenMeter's CloudEvents
//!   ingest or Stripe's meter events).
//! - [`alerts`]: threshold alerts (window %, low balance), recorded once per period in the
//!   store and sent to a signed webhook.
//! - [`demo`]: `flowgate demo` and the mock backend the tests also use.
//!
//! A request flows one way: gateway layers (access log → identify → meter: cost, claim,
//! decide and hold) → forward → settle → ledger → store. See `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod accounts;
pub mod alerts;
pub mod api;
pub mod app;
pub mod clock;
pub mod config;
pub mod cost;
pub mod demo;
pub mod export;
pub mod gateway;
pub mod hold;
pub mod idempotency;
pub mod identity;
pub mod ids;
pub mod ledger;
pub mod logs;
pub mod metrics;
pub mod quota;
pub mod reconcile;
pub mod replay;
pub mod rescue;
pub mod settle;
pub mod store;
pub mod strict;
pub mod usage;
pub mod watch;
pub mod waterfall;
