//! A request's cost in units, read by the route's [`CostRule`].

use http::HeaderMap;

use crate::config::CostRule;
use crate::waterfall::Units;

pub use crate::waterfall::UNITS_MAX;

/// Why a request's cost could not be read; answered 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostError {
    /// The header the route reads is absent.
    #[error("header {0:?} is required: it gives the request's cost in units")]
    MissingHeader(String),
    /// The JSON field the route reads is absent.
    #[error("body field {0:?} is required: it gives the request's cost in units")]
    MissingField(String),
    /// The body is not JSON.
    #[error("the request body must be JSON: {0}")]
    NotJson(String),
    /// The value is not a whole number in range.
    #[error("{0} must be a whole number from 0 to {UNITS_MAX}")]
    NotUnits(String),
    /// The model is not a string.
    #[error("{0} must be a string naming the model")]
    NotModel(String),
    /// The plan has no rates for the model.
    #[error("model {model:?} is not offered on this plan")]
    UnpricedModel {
        /// The field that named it.
        field: String,
        /// The model asked for.
        model: String,
    },
}

impl CostError {
    /// The header or body field at fault.
    pub fn field(&self) -> String {
        match self {
            CostError::MissingHeader(h) => format!("header:{h}"),
            CostError::MissingField(p) | CostError::NotUnits(p) | CostError::NotModel(p) => {
                p.clone()
            }
            CostError::UnpricedModel { field, .. } => field.clone(),
            CostError::NotJson(_) => "body".into(),
        }
    }
}

/// Whether the rule needs the request body.
pub fn needs_body(rule: &CostRule) -> bool {
    matches!(rule, CostRule::Json(_))
}

/// The model the request names at `pointer` of its JSON body (`None` when absent: the plan's
/// rates for any model apply).
pub fn model(pointer: &str, body: &[u8]) -> Result<Option<std::sync::Arc<str>>, CostError> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| CostError::NotJson(e.to_string()))?;
    match doc.pointer(pointer) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(m)) if m.len() <= MODEL_BYTES_MAX => {
            Ok(Some(m.as_str().into()))
        }
        Some(_) => Err(CostError::NotModel(pointer.to_owned())),
    }
}

/// The longest model name read from a request.
const MODEL_BYTES_MAX: usize = 256;

/// Reads the cost of a request: from the rule alone, a header, or the JSON `body`.
/// The request's units by `rule`, or `default` when the request does not state them (the
/// header or field is absent; a present but invalid value is still an error).
pub fn units_or(
    rule: &CostRule,
    default: Option<Units>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Units, CostError> {
    match (units(rule, headers, body), default) {
        (Err(CostError::MissingHeader(_) | CostError::MissingField(_)), Some(d)) => Ok(d),
        (result, _) => result,
    }
}

/// The request's units by `rule`.
pub fn units(rule: &CostRule, headers: &HeaderMap, body: &[u8]) -> Result<Units, CostError> {
    let units = match rule {
        CostRule::Fixed(n) => *n,
        CostRule::Header(name) => {
            let value = headers
                .get(name.as_str())
                .ok_or_else(|| CostError::MissingHeader(name.clone()))?;
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<Units>().ok())
                .ok_or_else(|| CostError::NotUnits(format!("header {name}")))?
        }
        CostRule::Json(pointer) => {
            let doc: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| CostError::NotJson(e.to_string()))?;
            let value = doc
                .pointer(pointer)
                .ok_or_else(|| CostError::MissingField(pointer.clone()))?;
            value
                .as_u64()
                .ok_or_else(|| CostError::NotUnits(pointer.clone()))?
        }
    };
    if units > UNITS_MAX {
        return Err(CostError::NotUnits(match rule {
            CostRule::Header(h) => format!("header {h}"),
            CostRule::Json(p) => p.clone(),
            CostRule::Fixed(_) => "cost.fixed".into(),
        }));
    }
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_stands_in_only_for_an_absent_value() {
        let rule = CostRule::Json("/max_tokens".into());
        let h = HeaderMap::new();
        assert_eq!(units_or(&rule, Some(256), &h, br#"{"model":"m"}"#), Ok(256));
        assert_eq!(
            units_or(&rule, Some(256), &h, br#"{"max_tokens":9}"#),
            Ok(9)
        );
        assert_eq!(
            units_or(&rule, Some(256), &h, br#"{"max_tokens":"many"}"#),
            Err(CostError::NotUnits("/max_tokens".into()))
        );
        assert!(units_or(&rule, Some(256), &h, b"not json").is_err());
        assert_eq!(
            units_or(&rule, None, &h, br#"{"model":"m"}"#),
            Err(CostError::MissingField("/max_tokens".into()))
        );
        let header = CostRule::Header("x-units".into());
        assert_eq!(units_or(&header, Some(4), &h, b""), Ok(4));
    }

    #[test]
    fn reads_each_rule() {
        let mut h = HeaderMap::new();
        h.insert("x-seconds", "12".parse().unwrap());
        assert_eq!(units(&CostRule::Fixed(3), &h, b""), Ok(3));
        assert_eq!(
            units(&CostRule::Header("x-seconds".into()), &h, b""),
            Ok(12)
        );
        assert_eq!(
            units(
                &CostRule::Json("/video/seconds".into()),
                &h,
                br#"{"video":{"seconds":8}}"#
            ),
            Ok(8)
        );
    }

    #[test]
    fn rejects_bad_values_naming_the_field() {
        let h = HeaderMap::new();
        let e = units(&CostRule::Header("x-seconds".into()), &h, b"").unwrap_err();
        assert_eq!(e.field(), "header:x-seconds");
        let e = units(&CostRule::Json("/seconds".into()), &h, br#"{"seconds":-1}"#).unwrap_err();
        assert_eq!(e, CostError::NotUnits("/seconds".into()));
        let e = units(
            &CostRule::Json("/seconds".into()),
            &h,
            br#"{"seconds":1.5}"#,
        )
        .unwrap_err();
        assert_eq!(e.field(), "/seconds");
        let e = units(&CostRule::Json("/seconds".into()), &h, b"not json").unwrap_err();
        assert_eq!(e.field(), "body");
        let e = units(
            &CostRule::Json("/seconds".into()),
            &h,
            br#"{"seconds":10000000000}"#,
        )
        .unwrap_err();
        assert_eq!(e, CostError::NotUnits("/seconds".into()));
    }
}
