//! The numbers an account sees on every response: OpenAI-style `x-ratelimit-*` headers per
//! usage-limit window, and the credits left.

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
    pub fn apply(&self, headers: &mut HeaderMap) {
        for w in &self.windows {
            for (prefix, value) in [
                ("x-ratelimit-limit-", HeaderValue::from(w.limit)),
                ("x-ratelimit-remaining-", HeaderValue::from(w.remaining)),
                (
                    "x-ratelimit-reset-",
                    HeaderValue::try_from(super::error::format_duration(w.reset_in_s))
                        .unwrap_or(HeaderValue::from_static("0s")),
                ),
            ] {
                if let Ok(name) =
                    HeaderName::try_from(format!("{prefix}{}", w.name.to_ascii_lowercase()))
                {
                    headers.insert(name, value);
                }
            }
        }
        headers.insert(CREDITS_REMAINING, HeaderValue::from(self.credits));
    }
}
