//! `[[export]]`: the billing systems charges and refunds are exported to (see `crate::export`).

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx, valid_name};

/// Most events per request a sink may ask for (OpenMeter takes batches; Stripe's v1 API takes
/// one event per request, so a Stripe sink sends its batch one by one).
pub const EXPORT_BATCH_MAX: u32 = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExport {
    name: Spanned<String>,
    kind: Spanned<String>,
    url: Spanned<String>,
    /// The environment variable holding the bearer token (never in the file itself).
    token_env: Option<String>,
    /// A file holding the bearer token (a mounted secret).
    token_file: Option<String>,
    #[serde(default = "default_batch_size")]
    batch_size: Spanned<u32>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: Spanned<u64>,
    /// CloudEvents `source`.
    #[serde(default = "default_source")]
    source: String,
    /// Stripe: the meter's `event_name`; `{feature}` is replaced by the feature.
    event_name: Option<Spanned<String>>,
    /// Stripe: the customer id of an account; `{account}` is replaced by the account id.
    #[serde(default = "default_customer")]
    customer: Spanned<String>,
    /// Stripe: customer ids of particular accounts (they win over `customer`).
    #[serde(default)]
    customers: BTreeMap<String, String>,
    /// Stripe: what `payload[value]` carries: `credits` (default) or `units`.
    #[serde(default = "default_value")]
    value: Spanned<String>,
}

fn default_batch_size() -> Spanned<u32> {
    Spanned::new(0..0, 100)
}
fn default_timeout_ms() -> Spanned<u64> {
    Spanned::new(0..0, 10_000)
}
fn default_source() -> String {
    "flowgate".into()
}
fn default_customer() -> Spanned<String> {
    Spanned::new(0..0, "{account}".into())
}
fn default_value() -> Spanned<String> {
    Spanned::new(0..0, "credits".into())
}

/// Where a sink's token comes from; read when the sender starts, never logged.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// No token: the receiver takes unauthenticated requests.
    None,
    /// This environment variable.
    Env(String),
    /// This file (trailing whitespace trimmed).
    File(String),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::None => f.write_str("None"),
            TokenSource::Env(v) => write!(f, "Env({v})"),
            TokenSource::File(p) => write!(f, "File({p})"),
        }
    }
}

/// The wire format of a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportFormat {
    /// CloudEvents 1.0, structured, `application/cloudevents-batch+json` (OpenMeter's
    /// `POST /api/v1/events`). `url` is the ingest endpoint itself.
    CloudEvents {
        /// The events' `source`.
        source: String,
    },
    /// Stripe's billing meter events (`POST {url}/v1/billing/meter_events`, form-encoded) and
    /// refunds as meter event adjustments that cancel them. `url` is the API's base.
    Stripe {
        /// `event_name`, with `{feature}` replaced.
        event_name: String,
        /// The customer id, with `{account}` replaced.
        customer: String,
        /// Customer ids of particular accounts.
        customers: BTreeMap<String, String>,
        /// Whether `payload[value]` is the units (else the credits).
        value_units: bool,
    },
}

/// One `[[export]]` sink, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSink {
    /// Its name (the outbox keeps rows per sink name).
    pub name: String,
    /// `cloudevents` or `stripe`.
    pub kind: &'static str,
    /// Where to send.
    pub url: http::Uri,
    /// The bearer token's source.
    pub token: TokenSource,
    /// Most events read (and, for CloudEvents, sent) at once.
    pub batch_size: u32,
    /// The longest a request may take.
    pub timeout_ms: u64,
    /// The wire format.
    pub format: ExportFormat,
}

pub(super) fn compile(raw: &[RawExport], cx: &Ctx<'_>) -> Result<Vec<ExportSink>, ConfigError> {
    let mut sinks: Vec<ExportSink> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let key = |field: &str| format!("export[{i}].{field}");
        if !valid_name(r.name.get_ref()) {
            return cx.err(
                key("name"),
                Some(r.name.span()),
                "must be 1 to 64 letters, digits, '_' or '-'",
            );
        }
        if sinks.iter().any(|s| s.name == *r.name.get_ref()) {
            return cx.err(
                key("name"),
                Some(r.name.span()),
                "another sink has this name",
            );
        }
        let url: http::Uri = match r.url.get_ref().parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => u,
            Ok(u) if u.scheme_str() == Some("https") => {
                return cx.err(
                    key("url"),
                    Some(r.url.span()),
                    "https is not supported: this build has no TLS client; send through an \
                     egress proxy that adds TLS (e.g. a sidecar) at an http:// address",
                );
            }
            _ => {
                return cx.err(
                    key("url"),
                    Some(r.url.span()),
                    "must be an absolute http:// URL",
                );
            }
        };
        let token = match (&r.token_env, &r.token_file) {
            (Some(_), Some(_)) => {
                return cx.err(
                    key("token_env"),
                    None,
                    "set token_env or token_file, not both",
                );
            }
            (Some(v), None) => TokenSource::Env(v.clone()),
            (None, Some(p)) => TokenSource::File(p.clone()),
            (None, None) => TokenSource::None,
        };
        let batch_size = *r.batch_size.get_ref();
        if !(1..=EXPORT_BATCH_MAX).contains(&batch_size) {
            return cx.err(
                key("batch_size"),
                Some(r.batch_size.span()),
                format!("must be between 1 and {EXPORT_BATCH_MAX}"),
            );
        }
        let timeout_ms = *r.timeout_ms.get_ref();
        if !(1..=600_000).contains(&timeout_ms) {
            return cx.err(
                key("timeout_ms"),
                Some(r.timeout_ms.span()),
                "must be between 1 and 600000 (10 min)",
            );
        }
        let (kind, format) = match r.kind.get_ref().as_str() {
            "cloudevents" => (
                "cloudevents",
                ExportFormat::CloudEvents {
                    source: r.source.clone(),
                },
            ),
            "stripe" => {
                let Some(event_name) = &r.event_name else {
                    return cx.err(
                        key("event_name"),
                        Some(r.kind.span()),
                        "a stripe sink needs the meter's event_name",
                    );
                };
                let value_units = match r.value.get_ref().as_str() {
                    "credits" => false,
                    "units" => true,
                    _ => {
                        return cx.err(
                            key("value"),
                            Some(r.value.span()),
                            "must be \"credits\" or \"units\"",
                        );
                    }
                };
                (
                    "stripe",
                    ExportFormat::Stripe {
                        event_name: event_name.get_ref().clone(),
                        customer: r.customer.get_ref().clone(),
                        customers: r.customers.clone(),
                        value_units,
                    },
                )
            }
            _ => {
                return cx.err(
                    key("kind"),
                    Some(r.kind.span()),
                    "must be \"cloudevents\" or \"stripe\"",
                );
            }
        };
        sinks.push(ExportSink {
            name: r.name.get_ref().clone(),
            kind,
            url,
            token,
            batch_size,
            timeout_ms,
            format,
        });
    }
    Ok(sinks)
}
