//! flowgate: a real-time access and credit gateway.
pub mod accounts;
pub mod clock;
pub mod config;
pub mod ledger;
pub mod store;
pub mod waterfall;
