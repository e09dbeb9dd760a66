//! flowgate: a real-time access and credit gateway.
pub mod waterfall;
