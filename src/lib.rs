//! flowgate: a real-time access and credit gateway.
pub mod config;
pub mod waterfall;
