//! The numbers an account sees on every response: OpenAI-style `x-ratelimit-*` headers per
//! usage-limit window, and the credits left.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

use crate::waterfall::{AccountState, FeatureId, LayerKind, Millis, Plan};

/// The credits an account can still spend on the feature, after this request's hold.
pub const CREDITS_REMAINING: HeaderName = HeaderName::from_static("x-credits-remaining");

/// A snapshot of the windows and credits that apply to one feature, taken under the account's
/// lock right after the decision, so the numbers include this request's own hold.
#[derive(Debug, Default)]
pub struct Quota {
    windows: SmallVec<[WindowQuota; 4]>,
    /// Credits (purchased and promotional) usable for the feature.
    pub credits: u64,
}

#[derive(Debug)]
struct WindowQuota {
    name: Arc<str>,
    limit: u64,
    remaining: u64,
    reset_in_s: u64,
}

impl Quota {
    /// Reads the quota of `feature` from `state` at `now`.
    pub fn snapshot(plan: &Plan, state: &AccountState, feature: FeatureId, now: Millis) -> Quota {
        let mut windows = SmallVec::new();
        for (i, layer) in plan.layers.iter().enumerate() {
            if !layer.features.contains(feature)
                || !matches!(layer.kind, LayerKind::UsageLimit { .. })
            {
                continue;
            }
            for w in state.windows(plan, i, now) {
                windows.push(WindowQuota {
                    name: w.window.name.clone(),
                    limit: w.window.limit,
                    remaining: w.remaining,
                    reset_in_s: ((w.reset_at - now).max(0) as u64).div_ceil(1000),
                });
            }
        }
        Quota {
            windows,
            credits: state.spendable_credits(feature, now),
        }
    }

    /// Writes the headers.
    pub fn apply(&self, headers: &mut HeaderMap, names: &HeaderNames) {
        for w in &self.windows {
            let Some([limit, remaining, reset]) = names.of(&w.name) else {
                continue;
            };
            headers.insert(limit, HeaderValue::from(w.limit));
            headers.insert(remaining, HeaderValue::from(w.remaining));
            headers.insert(
                reset,
                HeaderValue::try_from(crate::clock::format_duration(w.reset_in_s))
                    .unwrap_or(HeaderValue::from_static("0s")),
            );
        }
        headers.insert(CREDITS_REMAINING, HeaderValue::from(self.credits));
    }
}

/// The `x-ratelimit-{limit,remaining,reset}-<window>` names of every window of every plan, made
/// once at start-up: a response then copies them (a reference count each) instead of
/// formatting and lower-casing three names per window per request.
#[derive(Debug, Default)]
pub struct HeaderNames {
    by_window: HashMap<Arc<str>, [HeaderName; 3]>,
}

impl HeaderNames {
    /// The names of the windows of `plans`.
    pub fn new<'a>(plans: impl IntoIterator<Item = &'a Plan>) -> HeaderNames {
        let mut by_window = HashMap::new();
        for plan in plans {
            for layer in &plan.layers {
                if let LayerKind::UsageLimit { windows } = &layer.kind {
                    for w in windows {
                        if let Some(names) = Self::make(&w.name) {
                            by_window.insert(w.name.clone(), names);
                        }
                    }
                }
            }
        }
        HeaderNames { by_window }
    }

    /// The three names for `window` (`None` if its name cannot be part of a header name).
    fn of(&self, window: &str) -> Option<[HeaderName; 3]> {
        match self.by_window.get(window) {
            Some(names) => Some(names.clone()),
            None => Self::make(window),
        }
    }

    fn make(window: &str) -> Option<[HeaderName; 3]> {
        let name = |prefix: &str| {
            HeaderName::try_from(format!(
                "x-ratelimit-{prefix}-{}",
                window.to_ascii_lowercase()
            ))
            .ok()
        };
        Some([name("limit")?, name("remaining")?, name("reset")?])
    }
}
