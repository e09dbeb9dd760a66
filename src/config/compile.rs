//! The checks serde cannot make: references between sections, positive amounts, durations,
//! and feature names interned into [`FeatureId`]s. One function per section, in the order
//! each needs the ones before it (upstreams → routes and features → plans → accounts).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use toml::Spanned;

use super::*;
use crate::waterfall::{
    self, FeatureId, FeatureSet, GrantKind, Layer, LayerKind, Millis, Period, Plan, PriceTable, Tz,
    WindowKind,
};

/// Checks `raw` section by section into [`Settings`].
pub(super) fn compile(raw: RawConfig, cx: &Ctx<'_>) -> Result<Settings, ConfigError> {
    check_log_and_store(&raw, cx)?;
    let upstreams = upstreams(&raw.upstreams, cx)?;
    raw.usage_page.check()?;
    let (features, routes) = routes(&raw.routes, &upstreams, raw.usage_page.enabled, cx)?;
    let plans = plans(&raw.plans, &features, &routes, cx)?;
    let shadow_plans = raw
        .plans
        .iter()
        .filter(|(_, p)| p.shadow)
        .map(|(name, _)| name.clone())
        .collect();
    let accounts = accounts(&raw.accounts, &features, &plans, cx)?;
    let admin = admin(&raw.admin, cx)?;
    let export = export::compile(&raw.export, cx)?;
    let alerts = alerts::compile(raw.alerts.as_ref(), &plans, cx)?;
    let mut settings = Settings {
        server: raw.server,
        store: raw.store,
        identity: raw.identity,
        log: raw.log,
        admin,
        usage_page: raw.usage_page,
        features,
        upstreams,
        routes,
        plans,
        shadow_plans,
        accounts,
        export,
        alerts,
    };
    settings.lease_only_when_shared();
    Ok(settings)
}

fn check_log_and_store(raw: &RawConfig, cx: &Ctx<'_>) -> Result<(), ConfigError> {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
        return cx.err("log.level", None, format!("not a log filter: {e}"));
    }
    if raw.store.ledger_batch_size_max == 0 || raw.store.ledger_queue_max == 0 {
        return cx.err("store.ledger_batch_size_max", None, "must be at least 1");
    }
    if raw.store.expiry_interval_ms == 0 {
        return cx.err("store.expiry_interval_ms", None, "must be at least 1");
    }
    // A lease must outlive the margin a replica keeps before its expiry, and a round trip.
    if !(3_000..=3_600_000).contains(&raw.store.strict_lease_ttl_ms) {
        return cx.err(
            "store.strict_lease_ttl_ms",
            None,
            "must be between 3000 (3 s) and 3600000 (1 h)",
        );
    }
    if raw.store.strict_lease_idle_ms == 0 {
        return cx.err("store.strict_lease_idle_ms", None, "must be at least 1");
    }
    let server = &raw.server;
    for (key, value) in [
        (
            "server.client_header_timeout_ms",
            server.client_header_timeout_ms,
        ),
        (
            "server.client_body_timeout_ms",
            server.client_body_timeout_ms,
        ),
        ("server.connections_max", server.connections_max as u64),
        ("server.threads", server.threads as u64),
        (
            "server.http2_max_concurrent_streams",
            u64::from(server.http2_max_concurrent_streams),
        ),
    ] {
        if value == 0 {
            return cx.err(key, None, "must be at least 1");
        }
    }
    Ok(())
}

fn upstreams(
    raw_upstreams: &BTreeMap<String, RawUpstream>,
    cx: &Ctx<'_>,
) -> Result<Vec<Upstream>, ConfigError> {
    let mut upstreams = Vec::new();
    for (name, up) in raw_upstreams {
        let urls: Vec<&Spanned<String>> = up.url.iter().chain(&up.urls).collect();
        if urls.is_empty() || (up.url.is_some() && !up.urls.is_empty()) {
            return cx.err(
                format!("upstreams.{name}"),
                None,
                "give its address as url = \"http://host:port\" or several as urls = [...], not both",
            );
        }
        let mut addresses = Vec::new();
        for (i, url) in urls.into_iter().enumerate() {
            let key = if up.url.is_some() {
                format!("upstreams.{name}.url")
            } else {
                format!("upstreams.{name}.urls[{i}]")
            };
            let uri: http::Uri = match url.get_ref().parse() {
                Ok(u) => u,
                Err(e) => return cx.err(key, Some(url.span()), format!("not a URL: {e}")),
            };
            let (Some("http"), Some(authority), true) = (
                uri.scheme_str(),
                uri.authority(),
                uri.path() == "/" || uri.path().is_empty(),
            ) else {
                return cx.err(
                    key,
                    Some(url.span()),
                    "must be http://host:port with no path",
                );
            };
            addresses.push(authority.clone());
        }
        upstreams.push(Upstream {
            name: name.clone(),
            addresses,
        });
    }
    Ok(upstreams)
}

fn routes(
    raw_routes: &[RawRoute],
    upstreams: &[Upstream],
    usage_page: bool,
    cx: &Ctx<'_>,
) -> Result<(Vec<Arc<str>>, Vec<Route>), ConfigError> {
    let mut features: Vec<Arc<str>> = Vec::new();
    let mut routes = Vec::new();
    for (i, r) in raw_routes.iter().enumerate() {
        let key = |k: &str| format!("routes[{i}].{k}");
        let method =
            match http::Method::from_bytes(r.method.get_ref().to_ascii_uppercase().as_bytes()) {
                Ok(m) => m,
                Err(_) => {
                    return cx.err(key("method"), Some(r.method.span()), "not an HTTP method");
                }
            };
        if !r.path.get_ref().starts_with('/') {
            return cx.err(key("path"), Some(r.path.span()), "must start with '/'");
        }
        if let Some(reserved) = reserved_path(r.path.get_ref(), usage_page) {
            let hint = if reserved.starts_with("/usage") {
                " (or turn the usage page off: [usage_page] enabled = false)"
            } else {
                ""
            };
            return cx.err(
                key("path"),
                Some(r.path.span()),
                format!("{reserved} is served by the gateway itself; choose another path{hint}"),
            );
        }
        let Some(upstream) = upstreams
            .iter()
            .position(|u| &u.name == r.upstream.get_ref())
        else {
            return cx.err(
                key("upstream"),
                Some(r.upstream.span()),
                format!(
                    "unknown upstream {:?} (declared: {})",
                    r.upstream.get_ref(),
                    upstreams
                        .iter()
                        .map(|u| u.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        };
        let name = r.feature.get_ref();
        if !valid_name(name) {
            return cx.err(
                key("feature"),
                Some(r.feature.span()),
                "use letters, digits, '_' and '-' only",
            );
        }
        let feature = match features.iter().position(|f| &**f == name.as_str()) {
            Some(p) => p,
            None => {
                if features.len() == FeatureSet::CAPACITY {
                    return cx.err(
                        key("feature"),
                        Some(r.feature.span()),
                        format!("at most {} features", FeatureSet::CAPACITY),
                    );
                }
                features.push(name.as_str().into());
                features.len() - 1
            }
        };
        let cost = r.cost.get_ref().clone();
        match &cost {
            CostRule::Fixed(0) => {
                return cx.err(key("cost.fixed"), Some(r.cost.span()), "must be at least 1");
            }
            CostRule::Header(h) if http::HeaderName::from_bytes(h.as_bytes()).is_err() => {
                return cx.err(
                    key("cost.header"),
                    Some(r.cost.span()),
                    "not a valid header name",
                );
            }
            CostRule::Json(p) if !p.starts_with('/') => {
                return cx.err(
                    key("cost.json"),
                    Some(r.cost.span()),
                    "a JSON pointer starts with '/', e.g. \"/seconds\"",
                );
            }
            _ => {}
        }
        if let Some(default) = &r.cost_default {
            if matches!(cost, CostRule::Fixed(_)) {
                return cx.err(
                    key("cost_default"),
                    Some(default.span()),
                    "a fixed cost is always stated: cost_default applies to a header or json cost",
                );
            }
            if *default.get_ref() > waterfall::UNITS_MAX {
                return cx.err(
                    key("cost_default"),
                    Some(default.span()),
                    format!("at most {} units", waterfall::UNITS_MAX),
                );
            }
        }
        let settle = r.settle.as_ref().map(|s| s.get_ref().clone());
        if let Some(rule) = &r.settle {
            match rule.get_ref() {
                SettleRule::Header(h) if http::HeaderName::from_bytes(h.as_bytes()).is_err() => {
                    return cx.err(
                        key("settle.header"),
                        Some(rule.span()),
                        "not a valid header name",
                    );
                }
                SettleRule::Json(p) | SettleRule::Sse(p) | SettleRule::Body(p)
                    if !p.starts_with('/') =>
                {
                    return cx.err(
                        key("settle"),
                        Some(rule.span()),
                        "a JSON pointer starts with '/', e.g. \"/usage/units\"",
                    );
                }
                SettleRule::Dimensions(d) if d.is_empty() || d.len() > DIMENSIONS_MAX => {
                    return cx.err(
                        key("settle.dimensions"),
                        Some(rule.span()),
                        format!("from 1 to {DIMENSIONS_MAX} dimensions"),
                    );
                }
                SettleRule::Dimensions(d) => {
                    for (name, at) in d {
                        if !valid_name(name) {
                            return cx.err(
                                key(&format!("settle.dimensions.{name}")),
                                Some(rule.span()),
                                "use letters, digits, '_' and '-' only",
                            );
                        }
                        if at.pointers().any(|p| !p.starts_with('/')) {
                            return cx.err(
                                key(&format!("settle.dimensions.{name}")),
                                Some(rule.span()),
                                "a JSON pointer starts with '/', e.g. \"/usage/prompt_tokens\"",
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(model) = &r.model
            && !model.get_ref().starts_with('/')
        {
            return cx.err(
                key("model"),
                Some(model.span()),
                "a JSON pointer starts with '/', e.g. \"/model\"",
            );
        }
        let measured: Vec<&String> = match &settle {
            Some(SettleRule::Dimensions(d)) => d.keys().collect(),
            _ => Vec::new(),
        };
        if let Some(dim) = &r.cost_dimension
            && !measured.contains(&dim.get_ref())
        {
            return cx.err(
                key("cost_dimension"),
                Some(dim.span()),
                "must be one of the dimensions the route settles (settle = { dimensions = … })",
            );
        }
        let watch = match &r.watch {
            None => None,
            Some(w) => Some(watch_rule(w.get_ref(), cx, &key("watch"), w.span())?),
        };
        routes.push(Route {
            method,
            path: r.path.get_ref().clone(),
            feature: FeatureId(feature as u16),
            upstream,
            cost,
            cost_default: r.cost_default.as_ref().map(|d| *d.get_ref()),
            settle,
            model: r.model.as_ref().map(|m| m.get_ref().clone()),
            cost_dimension: r
                .cost_dimension
                .as_ref()
                .map(|d| d.get_ref().as_str().into()),
            idempotency: r.idempotency,
            watch,
            shadow: r.shadow,
        });
    }
    Ok((features, routes))
}

/// A route's `watch`: exactly one way to measure progress, each a usable number.
fn watch_rule(
    w: &RawWatch,
    cx: &Ctx<'_>,
    key: &str,
    span: std::ops::Range<usize>,
) -> Result<WatchRule, ConfigError> {
    let err = |msg: &str| cx.err(key, Some(span.clone()), msg);
    let progress = match (&w.sse, w.bytes_per_unit, &w.time_per_unit) {
        (Some(p), None, None) if p.starts_with('/') => Progress::Sse(p.clone()),
        (Some(_), None, None) => {
            return err("sse: a JSON pointer starts with '/', e.g. \"/usage/seconds\"");
        }
        (None, Some(0), None) => return err("bytes_per_unit must be at least 1"),
        (None, Some(n), None) => Progress::Bytes(n),
        (None, None, Some(t)) => match humantime::parse_duration(t) {
            Ok(d) if d.as_millis() >= 1 && d.as_millis() <= u64::MAX as u128 => {
                Progress::Time(d.as_millis() as u64)
            }
            _ => return err("time_per_unit: a duration of at least 1ms, e.g. \"1s\""),
        },
        _ => return err("give exactly one of sse, bytes_per_unit, time_per_unit"),
    };
    Ok(WatchRule {
        progress,
        on_exhausted: w.on_exhausted,
    })
}

/// The set of the features `list` names (all when absent); an unknown name is an error at `key`.
fn feature_set(
    features: &[Arc<str>],
    cx: &Ctx<'_>,
    key: String,
    list: &Option<Spanned<Vec<String>>>,
) -> Result<FeatureSet, ConfigError> {
    let Some(list) = list else {
        return Ok(FeatureSet::ALL);
    };
    let mut set = FeatureSet::EMPTY;
    for name in list.get_ref() {
        match features.iter().position(|f| **f == **name) {
            Some(p) => set = set.with(FeatureId(p as u16)),
            None => {
                return cx.err(
                    key,
                    Some(list.span()),
                    format!(
                        "unknown feature {name:?} (routes declare: {})",
                        features.join(", ")
                    ),
                );
            }
        }
    }
    Ok(set)
}

/// A plan that `extends` another takes its layers (when it has none) and the prices it does
/// not set itself; one level only.
fn resolve_extends(
    raw_plans: &BTreeMap<String, RawPlan>,
    cx: &Ctx<'_>,
) -> Result<BTreeMap<String, RawPlan>, ConfigError> {
    let mut resolved = BTreeMap::new();
    for (name, p) in raw_plans {
        let mut plan = p.clone();
        if let Some(base) = &p.extends {
            let Some(b) = raw_plans.get(base.get_ref()) else {
                return cx.err(
                    format!("plans.{name}.extends"),
                    Some(base.span()),
                    format!("unknown plan {:?}", base.get_ref()),
                );
            };
            if b.extends.is_some() {
                return cx.err(
                    format!("plans.{name}.extends"),
                    Some(base.span()),
                    "extends a plan that extends another: one level only",
                );
            }
            if plan.layers.is_empty() {
                plan.layers = b.layers.clone();
            }
            for (feature, price) in &b.prices {
                plan.prices
                    .entry(feature.clone())
                    .or_insert_with(|| price.clone());
            }
        }
        resolved.insert(name.clone(), plan);
    }
    Ok(resolved)
}

/// The dimensions the routes of each feature measure (empty: the feature is measured in units).
fn dimensions_by_feature(features: &[Arc<str>], routes: &[Route]) -> Vec<Vec<String>> {
    let mut dims = vec![Vec::new(); features.len()];
    for r in routes {
        if let Some(SettleRule::Dimensions(d)) = &r.settle {
            let known = &mut dims[r.feature.0 as usize];
            for name in d.keys() {
                if !known.contains(name) {
                    known.push(name.clone());
                }
            }
        }
    }
    dims
}

/// One price version's table: `base` (the version before) with `prices` applied.
fn price_table(
    key: &str,
    (version, effective_from): (&str, Millis),
    base: Option<&PriceTable>,
    prices: &BTreeMap<String, Spanned<RawPrice>>,
    (features, dims): (&[Arc<str>], &[Vec<String>]),
    cx: &Ctx<'_>,
) -> Result<PriceTable, ConfigError> {
    let mut table = match base {
        Some(b) => b.clone(),
        None => PriceTable::flat(version, vec![None; features.len()]),
    };
    table.version = version.into();
    table.effective_from = effective_from;
    for (feature, price) in prices {
        let fkey = format!("{key}.{feature}");
        let Some(pos) = features.iter().position(|f| **f == **feature) else {
            return cx.err(
                fkey,
                Some(price.span()),
                format!("unknown feature (routes declare: {})", features.join(", ")),
            );
        };
        let measured = &dims[pos];
        match price.get_ref() {
            RawPrice::Flat(_) if !measured.is_empty() => {
                return cx.err(
                    fkey,
                    Some(price.span()),
                    format!(
                        "its routes measure dimensions ({}): price it per model and dimension, \
                         e.g. {{ per = 1000000, models = {{ \"*\" = {{ {} = 1 }} }} }}",
                        measured.join(", "),
                        measured[0]
                    ),
                );
            }
            RawPrice::Flat(credits) if *credits > PRICE_MAX => {
                return cx.err(
                    fkey,
                    Some(price.span()),
                    format!("at most {PRICE_MAX} credits per unit"),
                );
            }
            RawPrice::Flat(credits) => {
                table.credits[pos] = Some(*credits);
                table.rates[pos] = None;
            }
            RawPrice::Rated(_) if measured.is_empty() => {
                return cx.err(
                    fkey,
                    Some(price.span()),
                    "priced by dimension, but no route of the feature measures dimensions \
                     (settle = { dimensions = { … } })",
                );
            }
            RawPrice::Rated(r) => {
                if r.per == 0 || r.per > RATE_PER_MAX {
                    return cx.err(
                        format!("{fkey}.per"),
                        Some(price.span()),
                        format!("must be from 1 to {RATE_PER_MAX}"),
                    );
                }
                if r.models.is_empty() {
                    return cx.err(
                        format!("{fkey}.models"),
                        Some(price.span()),
                        "needs at least one model (\"*\": any model)",
                    );
                }
                let mut models = Vec::with_capacity(r.models.len());
                for (model, row) in &r.models {
                    let mut rates = waterfall::RateRow::new();
                    for (dim, rate) in row {
                        if !measured.contains(dim) {
                            return cx.err(
                                format!("{fkey}.models.{model}.{dim}"),
                                Some(price.span()),
                                format!(
                                    "the feature's routes measure no such dimension (they measure: {})",
                                    measured.join(", ")
                                ),
                            );
                        }
                        if *rate > PRICE_MAX {
                            return cx.err(
                                format!("{fkey}.models.{model}.{dim}"),
                                Some(price.span()),
                                format!("at most {PRICE_MAX} credits per {}", r.per),
                            );
                        }
                        rates.push((dim.as_str().into(), *rate));
                    }
                    let name = (model != "*").then(|| model.as_str().into());
                    models.push((name, rates));
                }
                table.credits[pos] = Some(1);
                table.rates[pos] = Some(Arc::new(waterfall::Rates { per: r.per, models }));
            }
        }
    }
    Ok(table)
}

fn plans(
    raw_plans: &BTreeMap<String, RawPlan>,
    features: &[Arc<str>],
    routes: &[Route],
    cx: &Ctx<'_>,
) -> Result<HashMap<String, Arc<Plan>>, ConfigError> {
    let mut plans = HashMap::new();
    let dims = dimensions_by_feature(features, routes);
    for (plan_name, p) in &resolve_extends(raw_plans, cx)? {
        let first = price_table(
            &format!("plans.{plan_name}.prices"),
            (&p.price_version, Millis::MIN),
            None,
            &p.prices,
            (features, &dims),
            cx,
        )?;
        let mut prices = vec![first];
        for (i, change) in p.price_changes.iter().enumerate() {
            let key = format!("plans.{plan_name}.price_changes[{i}]");
            let Some(at) = parse_instant(change.effective_from.get_ref()) else {
                return cx.err(
                    format!("{key}.effective_from"),
                    Some(change.effective_from.span()),
                    "not an RFC 3339 instant like \"2027-01-01T00:00:00Z\"",
                );
            };
            let before = prices.last().filter(|t| t.effective_from < at);
            let Some(before) = before else {
                return cx.err(
                    format!("{key}.effective_from"),
                    Some(change.effective_from.span()),
                    "price changes must be listed in time order",
                );
            };
            if prices.iter().any(|t| *t.version == *change.price_version) {
                return cx.err(
                    format!("{key}.price_version"),
                    Some(change.effective_from.span()),
                    "each price version needs a name of its own",
                );
            }
            let table = price_table(
                &format!("{key}.prices"),
                (&change.price_version, at),
                Some(before),
                &change.prices,
                (features, &dims),
                cx,
            )?;
            prices.push(table);
        }
        if prices.len() > usize::from(u8::MAX) {
            return cx.err(
                format!("plans.{plan_name}.price_changes"),
                None,
                "at most 254 price changes",
            );
        }
        let mut layers = Vec::new();
        for (i, l) in p.layers.iter().enumerate() {
            let key = |k: &str| format!("plans.{plan_name}.layers[{i}].{k}");
            let kind = match l.kind.get_ref().as_str() {
                "usage_limit" => {
                    if l.windows.is_empty() {
                        return cx.err(key("windows"), Some(l.kind.span()), "a usage_limit layer needs at least one window");
                    }
                    let mut windows = Vec::new();
                    for (j, w) in l.windows.iter().enumerate() {
                        let wkey = |k: &str| key(&format!("windows[{j}].{k}"));
                        let name = w.name.get_ref();
                        if !valid_name(name) {
                            return cx.err(wkey("name"), Some(w.name.span()), "use letters, digits, '_' and '-' only (it becomes a header name)");
                        }
                        let kind = match (&w.duration, &w.reset) {
                            (Some(duration), None) => {
                                if let Some(tz) = &w.time_zone {
                                    return cx.err(wkey("time_zone"), Some(tz.span()), "only a calendar window (reset = \"daily\", \"weekly\" or \"monthly\") has a time zone; a rolling one counts the last `duration` wherever it is");
                                }
                                let minutes = match humantime::parse_duration(duration.get_ref()) {
                                    Ok(d) if d.as_secs() >= 60 && d.as_secs() % 60 == 0 && d.as_secs() / 60 <= u64::from(u32::MAX) => (d.as_secs() / 60) as u32,
                                    Ok(_) => return cx.err(wkey("duration"), Some(duration.span()), "must be a whole number of minutes, at least 1m"),
                                    Err(e) => return cx.err(wkey("duration"), Some(duration.span()), format!("not a duration like \"5h\" or \"7days\": {e}")),
                                };
                                WindowKind::Rolling { minutes }
                            }
                            (None, Some(reset)) => {
                                let period = match reset.get_ref().as_str() {
                                    "daily" => Period::Day,
                                    "weekly" => Period::Week,
                                    "monthly" => Period::Month,
                                    _ => return cx.err(wkey("reset"), Some(reset.span()), "must be \"daily\" (local midnight), \"weekly\" (Monday 00:00) or \"monthly\" (the 1st, 00:00)"),
                                };
                                WindowKind::Calendar { period, zone: time_zone(cx, wkey("time_zone"), w.time_zone.as_ref())? }
                            }
                            (Some(_), Some(reset)) => return cx.err(wkey("reset"), Some(reset.span()), "a window is either rolling (duration) or calendar-aligned (reset), not both"),
                            (None, None) => return cx.err(wkey("duration"), Some(w.name.span()), "a window needs duration = \"5h\" (rolling) or reset = \"daily\", \"weekly\" or \"monthly\" (calendar-aligned)"),
                        };
                        if *w.limit.get_ref() == 0 {
                            return cx.err(wkey("limit"), Some(w.limit.span()), "must be at least 1");
                        }
                        windows.push(waterfall::Window { name: name.as_str().into(), kind, limit: *w.limit.get_ref() });
                    }
                    LayerKind::UsageLimit { windows }
                }
                "free_tier" => {
                    let Some(units) = l.units.filter(|u| *u > 0) else {
                        return cx.err(key("units"), Some(l.kind.span()), "a free_tier layer needs units >= 1");
                    };
                    let period = match l.period.as_ref().map(|p| (p.get_ref().as_str(), p.span())) {
                        Some(("day", _)) => Period::Day,
                        Some(("week", _)) => Period::Week,
                        Some(("month", _)) | None => Period::Month,
                        Some((_, span)) => return cx.err(key("period"), Some(span), "must be \"day\", \"week\" or \"month\""),
                    };
                    LayerKind::FreeTier { units, period, zone: time_zone(cx, key("time_zone"), l.time_zone.as_ref())? }
                }
                "credits" => LayerKind::Credits,
                "promotions" => LayerKind::Promotions,
                "workspace" => {
                    let member_cap = match &l.member_cap {
                        None => None,
                        Some(cap) if *cap.get_ref() == 0 || *cap.get_ref() > i64::MAX as u64 => {
                            return cx.err(key("member_cap"), Some(cap.span()), "must be a positive integer (credits per member per period)");
                        }
                        Some(cap) => {
                            let period = match l.period.as_ref().map(|p| (p.get_ref().as_str(), p.span())) {
                                Some(("day", _)) => Period::Day,
                                Some(("week", _)) => Period::Week,
                                Some(("month", _)) | None => Period::Month,
                                Some((_, span)) => return cx.err(key("period"), Some(span), "must be \"day\", \"week\" or \"month\""),
                            };
                            Some(waterfall::MemberCap { credits: *cap.get_ref(), period, zone: time_zone(cx, key("time_zone"), l.time_zone.as_ref())? })
                        }
                    };
                    LayerKind::Workspace { member_cap }
                }
                "enterprise" => LayerKind::Enterprise { postpaid: l.postpaid },
                "concurrency" => {
                    let Some(limit) = l.limit.filter(|n| *n > 0) else {
                        return cx.err(key("limit"), Some(l.kind.span()), "a concurrency layer needs limit >= 1 (requests at once)");
                    };
                    LayerKind::Concurrency { limit }
                }
                other => return cx.err(key("kind"), Some(l.kind.span()), format!("unknown layer kind {other:?} (usage_limit, free_tier, credits, promotions, enterprise, concurrency, workspace)")),
            };
            if let (Some(cap), false) = (&l.member_cap, matches!(kind, LayerKind::Workspace { .. }))
            {
                return cx.err(
                    key("member_cap"),
                    Some(cap.span()),
                    "only a workspace layer has a member_cap",
                );
            }
            if let (Some(tz), false) = (
                &l.time_zone,
                matches!(
                    kind,
                    LayerKind::FreeTier { .. }
                        | LayerKind::Workspace {
                            member_cap: Some(_)
                        }
                ),
            ) {
                return cx.err(key("time_zone"), Some(tz.span()), "only a free_tier layer has a time zone (a calendar window takes its own, in windows)");
            }
            let name = l.name.clone().unwrap_or_else(|| kind.tag().to_string());
            layers.push(Layer {
                name: name.into(),
                features: feature_set(features, cx, key("features"), &l.features)?,
                kind,
            });
        }
        if layers.len() > usize::from(u8::MAX) {
            return cx.err(
                format!("plans.{plan_name}.layers"),
                None,
                "at most 255 layers",
            );
        }
        let plan = Plan {
            name: plan_name.as_str().into(),
            layers,
            prices,
            strict: p.strict,
        };
        // The store keeps strict mode's usage counters for 40 days (`ledger`): a rolling window
        // of 31 days or a calendar month (at most 32 days of history) fits.
        let too_long = |w: &waterfall::Window| matches!(w.kind, WindowKind::Rolling { minutes } if minutes > STRICT_WINDOW_MINUTES_MAX);
        if plan.strict
            && plan.layers.iter().any(
                |l| matches!(&l.kind, LayerKind::UsageLimit { windows } if windows.iter().any(too_long)),
            )
        {
            return cx.err(
                format!("plans.{plan_name}.strict"),
                None,
                "a strict plan's rolling windows are at most 31 days long (a calendar month is fine)",
            );
        }
        // Leases do not cover a workspace's pool: a strict member could overspend it.
        if plan.strict
            && plan
                .layers
                .iter()
                .any(|l| matches!(l.kind, LayerKind::Workspace { .. }))
        {
            return cx.err(
                format!("plans.{plan_name}.strict"),
                None,
                "strict plans cannot draw a workspace pool yet",
            );
        }
        plans.insert(plan_name.clone(), Arc::new(plan));
    }
    Ok(plans)
}

/// Most dimensions one route settles.
const DIMENSIONS_MAX: usize = 8;

/// The largest `per` of a dimension's rates.
const RATE_PER_MAX: u64 = 1_000_000_000_000;

/// The longest rolling window a strict plan may have.
const STRICT_WINDOW_MINUTES_MAX: u32 = 31 * 24 * 60;

/// The zone named at `key` (an IANA name; absent: UTC).
fn time_zone(cx: &Ctx<'_>, key: String, name: Option<&Spanned<String>>) -> Result<Tz, ConfigError> {
    let Some(name) = name else {
        return Ok(Tz::UTC);
    };
    match name.get_ref().parse::<Tz>() {
        Ok(zone) => Ok(zone),
        Err(_) => cx.err(
            key,
            Some(name.span()),
            format!(
                "unknown time zone {:?}: use an IANA name such as \"UTC\", \"Europe/Paris\" or \"America/New_York\"",
                name.get_ref()
            ),
        ),
    }
}

fn accounts(
    raw_accounts: &[RawAccount],
    features: &[Arc<str>],
    plans: &HashMap<String, Arc<Plan>>,
    cx: &Ctx<'_>,
) -> Result<Vec<AccountSeed>, ConfigError> {
    let mut accounts: Vec<AccountSeed> = Vec::new();
    for (i, a) in raw_accounts.iter().enumerate() {
        let key = |k: &str| format!("accounts[{i}].{k}");
        let id = a.id.get_ref();
        if id.is_empty() || id.len() > 128 || accounts.iter().any(|s| &s.id == id) {
            return cx.err(
                key("id"),
                Some(a.id.span()),
                "must be unique, 1 to 128 characters",
            );
        }
        if !plans.contains_key(a.plan.get_ref()) {
            return cx.err(
                key("plan"),
                Some(a.plan.span()),
                format!("unknown plan {:?}", a.plan.get_ref()),
            );
        }
        let mut grants: Vec<GrantSeed> = Vec::new();
        for (j, g) in a.grants.iter().enumerate() {
            let gkey = |k: &str| key(&format!("grants[{j}].{k}"));
            if grants.iter().any(|s| s.external_id == g.id) {
                return cx.err(
                    gkey("id"),
                    Some(g.kind.span()),
                    "duplicate grant id for this account",
                );
            }
            let Some(kind) = GrantKind::parse(g.kind.get_ref()) else {
                return cx.err(
                    gkey("kind"),
                    Some(g.kind.span()),
                    "must be \"credits\", \"promotion\" or \"enterprise\"",
                );
            };
            if *g.amount.get_ref() == 0 || *g.amount.get_ref() > i64::MAX as u64 {
                return cx.err(
                    gkey("amount"),
                    Some(g.amount.span()),
                    "must be a positive integer",
                );
            }
            let expires_at = match &g.expires_at {
                None => None,
                Some(s) => match DateTime::parse_from_rfc3339(s.get_ref()) {
                    Ok(t) => Some(t.with_timezone(&Utc).timestamp_millis()),
                    Err(e) => {
                        return cx.err(
                            gkey("expires_at"),
                            Some(s.span()),
                            format!("not an RFC 3339 time like 2027-01-01T00:00:00Z: {e}"),
                        );
                    }
                },
            };
            let features = match &g.features {
                None => None,
                Some(list) => {
                    feature_set(features, cx, gkey("features"), &g.features)?;
                    Some(list.get_ref().clone())
                }
            };
            grants.push(GrantSeed {
                external_id: g.id.clone(),
                kind,
                amount: *g.amount.get_ref(),
                expires_at,
                priority: g.priority,
                features,
            });
        }
        if let Some(ws) = &a.workspace {
            let Some(owner) = raw_accounts.iter().find(|o| o.id.get_ref() == ws.get_ref()) else {
                return cx.err(
                    key("workspace"),
                    Some(ws.span()),
                    format!(
                        "unknown account {:?}: a workspace is another configured account",
                        ws.get_ref()
                    ),
                );
            };
            if owner.id.get_ref() == id || owner.workspace.is_some() {
                return cx.err(
                    key("workspace"),
                    Some(ws.span()),
                    format!("account {:?} cannot be a workspace: a workspace is another account and has no workspace itself", ws.get_ref()),
                );
            }
        }
        accounts.push(AccountSeed {
            id: id.clone(),
            plan: a.plan.get_ref().clone(),
            suspended: a.suspended,
            shadow: a.shadow,
            workspace: a.workspace.as_ref().map(|w| w.get_ref().clone()),
            keys: a.api_keys.iter().map(|k| KeySeed::of(k)).collect(),
            grants,
        });
    }
    Ok(accounts)
}

fn admin(raw_admin: &RawAdmin, cx: &Ctx<'_>) -> Result<AdminSettings, ConfigError> {
    let mut admin = AdminSettings::default();
    for (i, hash) in raw_admin.token_hashes.iter().enumerate() {
        let digest = hex::decode(hash.get_ref().trim())
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(d).ok());
        let Some(digest) = digest else {
            return cx.err(
                format!("admin.token_hashes[{i}]"),
                Some(hash.span()),
                "must be a SHA-256 digest in hex (64 characters), e.g. the output of `printf %s TOKEN | sha256sum`",
            );
        };
        admin.token_hashes.push(digest);
    }
    Ok(admin)
}
