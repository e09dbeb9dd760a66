//! flowgate: a real-time access and credit gateway.
//!
//! For every request it answers, synchronously and in memory, *how much of this request is
//! allowed, and from which pool?*, forwards it, and afterwards records exactly once what was
//! used, what was charged and how each balance changed.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, validated into [`config::Settings`] (errors name key and line).
//! - [`waterfall`]: the pure engine. Plans, layers, account state, [`waterfall::decide`],
//!   [`waterfall::reserve`], [`waterfall::release`]. No I/O, no clock.
//! - [`accounts`]: the cached view of accounts the hot path decides against (moka + one
//!   mutex per account), rebuilt from the store on start-up.
//! - [`cost`]: a request's cost in units (fixed, a header, a JSON field).
//! - [`idempotency`]: one request per `Idempotency-Key` at a time, one charge per key.
//! - [`hold`]: an admitted request's reservation, which always ends (settled or released).
//! - [`gateway`]: the axum router, the proxy phases, denial answers, start-up and shutdown.
//! - [`api`]: the admin API, the user API and their OpenAPI document (`/openapi.json`).
//! - [`ledger`]: the queue of finished requests and the writer that commits them in batches.
//! - [`store`]: the ledger's SQL, one module per dialect, behind one interface.
//! - [`clock`]: "now", read in one place.
//! - [`metrics`]: Prometheus metrics.
//! - [`demo`]: `flowgate demo` and the mock backend the tests also use.
//!
//! A request flows one way: gateway (identify, cost) → waterfall (decide) → hold → forward →
//! settle → ledger → store. See `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod accounts;
pub mod api;
pub mod app;
pub mod clock;
pub mod config;
pub mod cost;
pub mod demo;
pub mod gateway;
pub mod hold;
pub mod idempotency;
pub mod identity;
pub mod ids;
pub mod ledger;
pub mod metrics;
pub mod quota;
pub mod reconcile;
pub mod rescue;
pub mod settle;
pub mod store;
pub mod usage;
pub mod waterfall;
