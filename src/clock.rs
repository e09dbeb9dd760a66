//! Time, read in one place so that tests can control it.
//!
//! The waterfall engine never reads a clock; the gateway, the ledger writer and the APIs read
//! their [`Clock`] (the system's, or a manual one in tests) and pass the instant down.
//! `clippy.toml` forbids every other way of reading the time; [`Stopwatch`] measures
//! durations for metrics, which no decision depends on.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::waterfall::Millis;

/// The gateway's source of "now".
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system's wall clock.
    #[default]
    System,
    /// A clock that only moves when told to (tests).
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A manual clock starting at `start`.
    pub fn manual(start: Millis) -> Clock {
        Clock::Manual(Arc::new(AtomicI64::new(start)))
    }

    /// Now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> Millis {
        match self {
            Clock::System => now_ms(),
            Clock::Manual(t) => t.load(Ordering::Relaxed),
        }
    }

    /// Moves a manual clock forward (no effect on the system clock).
    pub fn advance_ms(&self, by: Millis) {
        if let Clock::Manual(t) = self {
            t.fetch_add(by, Ordering::Relaxed);
        }
    }
}

/// The system's wall clock, in milliseconds since the Unix epoch (for [`Clock::System`], the
/// CLI and tests; a component that can be given a [`Clock`] uses that instead).
#[allow(clippy::disallowed_methods)] // the one place the wall clock is read
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// Elapsed time for metrics and logs (monotonic; never part of a decision).
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(std::time::Instant);

impl Stopwatch {
    /// Starts measuring.
    #[allow(clippy::disallowed_methods)] // the one place the monotonic clock is read
    pub fn start() -> Stopwatch {
        Stopwatch(std::time::Instant::now())
    }

    /// Time since the start.
    pub fn elapsed(&self) -> std::time::Duration {
        self.0.elapsed()
    }

    /// Seconds since the start, as Prometheus histograms take them.
    pub fn seconds(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// Formats an instant as RFC 3339 (UTC, seconds).
pub fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Formats seconds the way OpenAI's `x-ratelimit-reset-*` headers do: `1h2m3s`, `6m0s`, `42s`.
pub fn format_duration(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::format_duration;

    #[test]
    fn durations_read_like_openai() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(42), "42s");
        assert_eq!(format_duration(360), "6m0s");
        assert_eq!(format_duration(3723), "1h2m3s");
    }
}
