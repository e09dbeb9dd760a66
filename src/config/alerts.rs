//! `[alerts]`: threshold alerts sent to a webhook (see `crate::alerts`).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::export::TokenSource;
use super::{ConfigError, Ctx, valid_name};
use crate::waterfall::{LayerKind, Period, Plan};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlerts {
    webhook: Spanned<String>,
    /// The environment variable holding the signing secret.
    secret_env: Option<String>,
    /// A file holding the signing secret.
    secret_file: Option<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    rules: Vec<RawRule>,
}

fn default_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    /// `window_percent` or `balance_below`.
    kind: Spanned<String>,
    /// window_percent: the usage-limit layer and its window.
    layer: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
    /// window_percent: fires when used ≥ this % of the limit.
    percent: Option<Spanned<u64>>,
    /// balance_below: fires when the credits left (credit and promotion grants) < this.
    credits: Option<Spanned<u64>>,
    /// balance_below: once per "daily", "weekly" or "monthly" (UTC) period.
    period: Option<Spanned<String>>,
}

/// What a rule watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertCondition {
    /// A window's usage reached `percent` % of its limit. Fires once per window period: a
    /// calendar window's period, or for a rolling window consecutive spans of its length from
    /// the Unix epoch.
    WindowPercent {
        /// The usage-limit layer's name.
        layer: Arc<str>,
        /// The window's name.
        window: Arc<str>,
        /// The threshold, 1..=100.
        percent: u64,
    },
    /// The credits left in credit and promotion grants fell below `credits`; once per
    /// `period` (UTC).
    BalanceBelow {
        /// The threshold.
        credits: u64,
        /// The period.
        period: Period,
    },
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRule {
    /// Its name (the alert's dedupe key has it).
    pub name: String,
    /// What it watches.
    pub condition: AlertCondition,
}

/// `[alerts]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    /// Where alerts are POSTed.
    pub webhook: http::Uri,
    /// The signing secret's source (read when the gateway starts, never logged).
    pub secret: TokenSource,
    /// The longest one delivery may take.
    pub timeout_ms: u64,
    /// The rules.
    pub rules: Vec<AlertRule>,
}

pub(super) fn compile(
    raw: Option<&RawAlerts>,
    plans: &HashMap<String, Arc<Plan>>,
    cx: &Ctx<'_>,
) -> Result<Option<AlertSettings>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let webhook = match raw.webhook.get_ref().parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => u,
        _ => {
            return cx.err(
                "alerts.webhook",
                Some(raw.webhook.span()),
                "must be an absolute http:// URL (this build has no TLS client: send through an \
                 egress proxy that adds TLS)",
            );
        }
    };
    let secret = match (&raw.secret_env, &raw.secret_file) {
        (Some(v), None) => TokenSource::Env(v.clone()),
        (None, Some(p)) => TokenSource::File(p.clone()),
        _ => {
            return cx.err(
                "alerts.secret_env",
                None,
                "set exactly one of secret_env or secret_file: alerts are always signed",
            );
        }
    };
    if !(1..=600_000).contains(&raw.timeout_ms) {
        return cx.err("alerts.timeout_ms", None, "must be between 1 and 600000");
    }
    let mut rules: Vec<AlertRule> = Vec::with_capacity(raw.rules.len());
    for (i, r) in raw.rules.iter().enumerate() {
        let key = |f: &str| format!("alerts.rules[{i}].{f}");
        if !valid_name(r.name.get_ref()) {
            return cx.err(
                key("name"),
                Some(r.name.span()),
                "must be 1 to 64 letters, digits, '_' or '-'",
            );
        }
        if rules.iter().any(|x| x.name == *r.name.get_ref()) {
            return cx.err(
                key("name"),
                Some(r.name.span()),
                "another rule has this name",
            );
        }
        let condition = match r.kind.get_ref().as_str() {
            "window_percent" => {
                let (Some(layer), Some(window), Some(percent)) = (&r.layer, &r.window, &r.percent)
                else {
                    return cx.err(
                        key("kind"),
                        Some(r.kind.span()),
                        "a window_percent rule needs layer, window and percent",
                    );
                };
                if !(1..=100).contains(percent.get_ref()) {
                    return cx.err(
                        key("percent"),
                        Some(percent.span()),
                        "must be between 1 and 100",
                    );
                }
                let exists = plans.values().any(|p| {
                    p.layers.iter().any(|l| {
                        &*l.name == layer.get_ref()
                            && matches!(&l.kind, LayerKind::UsageLimit { windows }
                                if windows.iter().any(|w| &*w.name == window.get_ref()))
                    })
                });
                if !exists {
                    return cx.err(
                        key("window"),
                        Some(window.span()),
                        format!(
                            "no plan has a usage_limit layer {:?} with a window {:?}",
                            layer.get_ref(),
                            window.get_ref()
                        ),
                    );
                }
                AlertCondition::WindowPercent {
                    layer: layer.get_ref().as_str().into(),
                    window: window.get_ref().as_str().into(),
                    percent: *percent.get_ref(),
                }
            }
            "balance_below" => {
                let Some(credits) = &r.credits else {
                    return cx.err(
                        key("credits"),
                        Some(r.kind.span()),
                        "a balance_below rule needs credits",
                    );
                };
                let period = match r.period.as_ref().map(|p| p.get_ref().as_str()) {
                    Some("daily") => Period::Day,
                    Some("weekly") => Period::Week,
                    Some("monthly") | None => Period::Month,
                    Some(_) => {
                        return cx.err(
                            key("period"),
                            r.period.as_ref().map(Spanned::span),
                            "must be \"daily\", \"weekly\" or \"monthly\"",
                        );
                    }
                };
                AlertCondition::BalanceBelow {
                    credits: *credits.get_ref(),
                    period,
                }
            }
            _ => {
                return cx.err(
                    key("kind"),
                    Some(r.kind.span()),
                    "must be \"window_percent\" or \"balance_below\"",
                );
            }
        };
        rules.push(AlertRule {
            name: r.name.get_ref().clone(),
            condition,
        });
    }
    Ok(Some(AlertSettings {
        webhook,
        secret,
        timeout_ms: raw.timeout_ms,
        rules,
    }))
}
