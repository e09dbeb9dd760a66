//! Prices: what a unit of each feature costs under each price version, and, for a feature
//! priced by dimensions (an AI API's input, cached input and output tokens, per model), how the
//! quantities a request measured become units.
//!
//! A dimension-priced ("rated") feature is metered in credits: its units are
//! `⌈Σ quantity × rate ÷ per⌉` for the request's model, and each unit costs one credit. So its
//! windows and free tier count credits' worth of usage, and its charge is exactly the sum of
//! its dimensions at the rates of the version in force when it was decided.

use std::collections::BTreeMap;
use std::sync::Arc;

use smallvec::SmallVec;

use super::{Credits, FeatureId, Millis, UNITS_MAX, Units};

/// One version of a plan's prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    /// The version's name; every charge records it.
    pub version: Arc<str>,
    /// From when it is in force (`Millis::MIN` for a plan's first table).
    pub effective_from: Millis,
    /// Credits per unit, by [`FeatureId`]; `None`: the plan does not include the feature. A
    /// rated feature costs 1 credit per unit.
    pub credits: Vec<Option<Credits>>,
    /// Rates of dimension-priced features, by [`FeatureId`].
    pub rates: Vec<Option<Arc<Rates>>>,
}

impl PriceTable {
    /// A table of per-unit prices only, in force from the beginning.
    pub fn flat(version: &str, credits: Vec<Option<Credits>>) -> PriceTable {
        PriceTable {
            version: version.into(),
            effective_from: Millis::MIN,
            rates: vec![None; credits.len()],
            credits,
        }
    }

    /// Credits per unit of `feature`, or `None` when the table does not include it.
    pub fn price(&self, feature: FeatureId) -> Option<Credits> {
        self.credits.get(feature.0 as usize).copied().flatten()
    }

    /// The rates of `feature`, when it is priced by dimensions.
    pub fn rates(&self, feature: FeatureId) -> Option<&Rates> {
        self.rates.get(feature.0 as usize)?.as_deref()
    }
}

/// A dimension-priced feature's rates: per model, credits per `per` of each dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rates {
    /// Quantities are priced per this many (1 000 000 tokens, say).
    pub per: u64,
    /// Rows by model; the row without a model applies to any model not listed.
    pub models: Vec<(Option<Arc<str>>, RateRow)>,
}

/// Credits per `per` of each dimension, by dimension name. A dimension without a rate is free.
pub type RateRow = SmallVec<[(Arc<str>, Credits); 4]>;

/// What a request measured of each dimension, by name.
pub type Quantities = SmallVec<[(Arc<str>, u64); 4]>;

impl Rates {
    /// The row for `model`: its own, else the one for any model.
    pub fn row(&self, model: Option<&str>) -> Option<&RateRow> {
        let own = model.and_then(|m| {
            self.models
                .iter()
                .find(|(name, _)| name.as_deref() == Some(m))
        });
        own.or_else(|| self.models.iter().find(|(name, _)| name.is_none()))
            .map(|(_, row)| row)
    }

    /// The units (credits) of `quantities` for `model`: `⌈Σ quantity × rate ÷ per⌉`. `None`
    /// when the model is not priced or the result exceeds [`UNITS_MAX`].
    pub fn units<'a>(
        &self,
        model: Option<&str>,
        quantities: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Option<Units> {
        let row = self.row(model)?;
        let mut sum: u128 = 0;
        for (dim, qty) in quantities {
            let rate = row.iter().find(|(d, _)| &**d == dim).map_or(0, |(_, r)| *r);
            sum += u128::from(qty) * u128::from(rate);
        }
        let units = sum.div_ceil(u128::from(self.per.max(1)));
        u64::try_from(units).ok().filter(|u| *u <= UNITS_MAX)
    }
}

/// A price table as the ledger stores it: by feature name, so that it reads the same whatever
/// the configuration's feature numbering becomes. Its JSON is deterministic (sorted maps), so
/// that a version stored twice can be compared by text.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PricesDoc {
    /// Credits per unit, by feature (1 for a dimension-priced feature).
    pub credits: BTreeMap<String, Credits>,
    /// Rates of dimension-priced features, by feature.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rates: BTreeMap<String, RatesDoc>,
}

/// [`Rates`] as stored: `"*"` is the row for any model.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RatesDoc {
    /// Rates are credits per this many of each dimension.
    pub per: u64,
    /// By model, credits per `per` of each dimension.
    pub models: BTreeMap<String, BTreeMap<String, Credits>>,
}

impl PriceTable {
    /// The table as the ledger stores it; `features` names the [`FeatureId`]s.
    pub fn document(&self, features: &[Arc<str>]) -> PricesDoc {
        let mut doc = PricesDoc::default();
        for (i, name) in features.iter().enumerate() {
            let feature = FeatureId(i as u16);
            if let Some(credits) = self.price(feature) {
                doc.credits.insert(name.to_string(), credits);
            }
            if let Some(rates) = self.rates(feature) {
                let models = rates
                    .models
                    .iter()
                    .map(|(model, row)| {
                        let row = row.iter().map(|(d, r)| (d.to_string(), *r)).collect();
                        (model.as_deref().unwrap_or("*").to_owned(), row)
                    })
                    .collect();
                doc.rates.insert(
                    name.to_string(),
                    RatesDoc {
                        per: rates.per,
                        models,
                    },
                );
            }
        }
        doc
    }
}

impl RatesDoc {
    /// The rates to price with.
    pub fn rates(&self) -> Rates {
        Rates {
            per: self.per,
            models: self
                .models
                .iter()
                .map(|(model, row)| {
                    let name = (model != "*").then(|| model.as_str().into());
                    (
                        name,
                        row.iter().map(|(d, r)| (d.as_str().into(), *r)).collect(),
                    )
                })
                .collect(),
        }
    }
}
