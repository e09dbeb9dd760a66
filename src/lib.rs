//! flowgate: a real-time access and credit gateway.
pub mod accounts;
pub mod clock;
pub mod config;
pub mod cost;
pub mod demo;
pub mod gateway;
pub mod hold;
pub mod idempotency;
pub mod ledger;
pub mod store;
pub mod waterfall;
