//! The numbers an account sees on every response: per usage-limit window, OpenAI-style
//! `x-ratelimit-*` headers and the IETF `RateLimit-Policy` and `RateLimit` fields
//! (draft-ietf-httpapi-ratelimit-headers-11); and the credits left.
//!
//! For a plan whose `tasks` layer has a `5h` window of 3 and a `week` window of 10, with one
//! unit used at the start of the current minute and 100 credits:
//!
//! ```text
//! x-ratelimit-limit-5h: 3
//! x-ratelimit-remaining-5h: 2
//! x-ratelimit-reset-5h: 5h0m0s
//! x-ratelimit-limit-week: 10
//! x-ratelimit-remaining-week: 9
//! x-ratelimit-reset-week: 168h0m0s
//! x-credits-remaining: 100
//! ratelimit-policy: "5h";q=3;w=18000, "week";q=10;w=604800
//! ratelimit: "5h";r=2;t=18000;flowgate-credits=100, "week";r=9;t=604800;flowgate-credits=100
//! ```
//!
//! The IETF fields are Lists of Items (RFC 9651); each Item is the window's name as a String.
//! - `RateLimit-Policy` (draft §3): `q`, the window's limit; `w`, its length in seconds. No `qu`:
//!   §3.1.2 allows only the units of the IANA "RateLimit Quota Units" registry (requests,
//!   content-bytes, concurrent-requests), and a window counts its features' units (a task, a
//!   second of video), which is none of them; a vendor value there is an unregistered value a
//!   client may reject as malformed (§7: malformed fields MUST be ignored), so the unit is
//!   left to the draft's default and the route's documentation.
//! - `RateLimit` (draft §4): `r`, the units left; `t`, the effective window — the seconds
//!   within which no more than `r` can be used (§4.1.2). A rolling window gives units back as
//!   old minutes slide out, so `t` is the time until that next happens (the window's length if
//!   nothing is counted), not `x-ratelimit-reset`'s time until *all* usage has slid out: a
//!   client pacing itself by `t` would otherwise wait hours for room that comes back in
//!   minutes, and a denial's `Retry-After` (when the request's units fit) could fall before
//!   the end of the effective window, which §6 says it SHOULD NOT. With all usage in one minute
//!   the two are the same; with none, `t` is the window's length and the reset `0s`.
//! - `flowgate-credits` on every `RateLimit` item: the credits that continue the request once
//!   the window is used up (`x-credits-remaining`). §4.1 allows other parameters ("regarded as
//!   comments") and asks that service-specific ones carry a vendor prefix; a parameter, not an
//!   Item of its own, because an Item names a quota policy that clients would throttle on, and
//!   credits have neither a quota nor a window. On every item, so each one stands alone when a
//!   list is split over field lines or trimmed to the closest limit (draft B.1.2).
//!
//! Integers beyond RFC 9651's fifteen digits are written as the largest sf-integer. Both
//! fields are appended, never inserted: an upstream's own `RateLimit` fields pass through
//! beside the gateway's (a List may span field lines, and §7.2 says an intermediary SHOULD NOT
//! remove them).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

use crate::waterfall::{AccountState, FeatureId, LayerKind, MINUTE_MS, Millis, Plan, Window};

/// The credits an account can still spend on the feature, after this request's hold.
pub const CREDITS_REMAINING: HeaderName = HeaderName::from_static("x-credits-remaining");

/// The IETF quota policies: one per window (draft-ietf-httpapi-ratelimit-headers-11 §3).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The IETF service limits: what is left of each policy (draft-ietf-httpapi-ratelimit-headers-11
/// §4).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The vendor parameter of a `RateLimit` item that carries `x-credits-remaining`.
pub const CREDITS_PARAM: &str = "flowgate-credits";

/// The largest Integer a structured field may carry (RFC 9651 §3.3.1: at most 15 digits).
pub const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

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
    /// Seconds until all counted usage has slid out (`x-ratelimit-reset`).
    reset_in_s: u64,
    /// Seconds until the window next gives units back (`RateLimit`'s `t`).
    grows_in_s: u64,
    /// The window's length in seconds (`RateLimit-Policy`'s `w`).
    length_s: u64,
}

/// A window's length in seconds at `now`: a rolling window's minutes, or the length of the
/// calendar period `now` is in (a day can last 23 or 25 hours).
fn length_s(window: &Window, now: Millis) -> u64 {
    match window.span(now) {
        (start, Some(end)) => ((end - start).max(0) as u64) / 1000,
        (_, None) => u64::from(window.history_minutes()) * (MINUTE_MS as u64 / 1000),
    }
}

/// When an unused window next gives units back: a rolling one a whole length from now, a
/// calendar one at its period's end.
fn fresh_in_s(window: &Window, now: Millis) -> u64 {
    match window.span(now) {
        (_, Some(end)) => seconds_until(end, now),
        (_, None) => length_s(window, now),
    }
}

/// Milliseconds from `now` to `at`, in whole seconds rounded up (0 if `at` has passed).
fn seconds_until(at: Millis, now: Millis) -> u64 {
    ((at - now).max(0) as u64).div_ceil(1000)
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
            let log = state.usage_log(i);
            for w in state.windows(plan, i, now) {
                let length_s = length_s(w.window, now);
                // When one unit more than is left is free. Nothing counted: nothing to give
                // back, the whole limit until the window next starts afresh.
                let fresh_s = fresh_in_s(w.window, now);
                let grows_in_s = match log {
                    Some(log) if w.used > 0 => log
                        .free_at(w.window, w.remaining + 1, now)
                        .map_or(fresh_s, |at| seconds_until(at, now)),
                    _ => fresh_s,
                };
                windows.push(WindowQuota {
                    name: w.window.name.clone(),
                    limit: w.window.limit,
                    remaining: w.remaining,
                    reset_in_s: seconds_until(w.reset_at, now),
                    grows_in_s,
                    length_s,
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
        let mut policy = SfList::default();
        let mut limits = SfList::default();
        for w in &self.windows {
            let Some(n) = names.of(&w.name) else {
                continue;
            };
            headers.insert(n.limit.clone(), HeaderValue::from(w.limit));
            headers.insert(n.remaining.clone(), HeaderValue::from(w.remaining));
            headers.insert(
                n.reset.clone(),
                HeaderValue::try_from(crate::clock::format_duration(w.reset_in_s))
                    .unwrap_or(HeaderValue::from_static("0s")),
            );
            let Some(policy_name) = &n.policy else {
                continue;
            };
            policy.item(policy_name);
            policy.integer("q", w.limit);
            if w.length_s > 0 {
                policy.integer("w", w.length_s);
            }
            limits.item(policy_name);
            limits.integer("r", w.remaining);
            limits.integer("t", w.grows_in_s);
            limits.integer(CREDITS_PARAM, self.credits);
        }
        if let Some(v) = policy.finish() {
            headers.append(RATELIMIT_POLICY, v);
        }
        if let Some(v) = limits.finish() {
            headers.append(RATELIMIT, v);
        }
        headers.insert(CREDITS_REMAINING, HeaderValue::from(self.credits));
    }
}

/// A structured-field List being written (RFC 9651 §4.1.1): Items whose bare item is already
/// serialized, with Integer parameters. Written on the stack; the header value is the one
/// allocation.
#[derive(Default)]
struct SfList {
    buf: SmallVec<[u8; 256]>,
}

impl SfList {
    /// Starts an Item whose bare item is `serialized` (e.g. `"5h"`, quotes included).
    fn item(&mut self, serialized: &str) {
        if !self.buf.is_empty() {
            self.buf.extend_from_slice(b", ");
        }
        self.buf.extend_from_slice(serialized.as_bytes());
    }

    /// Adds the parameter `key` (an sf-key: a constant of this module) with an Integer value,
    /// saturated at [`SF_INTEGER_MAX`].
    fn integer(&mut self, key: &str, value: u64) {
        self.buf.push(b';');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.push(b'=');
        let mut digits = itoa::Buffer::new();
        self.buf
            .extend_from_slice(digits.format(value.min(SF_INTEGER_MAX)).as_bytes());
    }

    /// The field value; `None` for an empty List (a List field with no members is omitted).
    fn finish(self) -> Option<HeaderValue> {
        if self.buf.is_empty() {
            return None;
        }
        HeaderValue::from_bytes(&self.buf).ok()
    }
}

/// `s` as an sf-string (RFC 9651 §4.1.6): quoted, `"` and `\` escaped; `None` if it has a
/// character outside printable ASCII.
fn sf_string(s: &str) -> Option<Box<str>> {
    if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return None;
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Some(out.into_boxed_str())
}

/// What a window's headers need that does not change per request.
#[derive(Debug, Clone)]
struct WindowNames {
    limit: HeaderName,
    remaining: HeaderName,
    reset: HeaderName,
    /// The window's name as an sf-string, naming its policy in both IETF fields (`None`:
    /// not printable ASCII, so the window is left out of them).
    policy: Option<Box<str>>,
}

/// The `x-ratelimit-{limit,remaining,reset}-<window>` names of every window of every plan, and
/// each window's policy name for `RateLimit-Policy` and `RateLimit`, made once at start-up: a
/// response then copies them (a reference count each) instead of formatting and lower-casing
/// three names and quoting a fourth per window per request.
#[derive(Debug, Default)]
pub struct HeaderNames {
    by_window: HashMap<Arc<str>, WindowNames>,
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

    /// The names for `window` (`None` if its name cannot be part of a header name).
    fn of(&self, window: &str) -> Option<Cow<'_, WindowNames>> {
        match self.by_window.get(window) {
            Some(names) => Some(Cow::Borrowed(names)),
            None => Self::make(window).map(Cow::Owned),
        }
    }

    fn make(window: &str) -> Option<WindowNames> {
        let name = |prefix: &str| {
            HeaderName::try_from(format!(
                "x-ratelimit-{prefix}-{}",
                window.to_ascii_lowercase()
            ))
            .ok()
        };
        Some(WindowNames {
            limit: name("limit")?,
            remaining: name("remaining")?,
            reset: name("reset")?,
            policy: sf_string(window),
        })
    }
}

#[cfg(test)]
mod tests;
