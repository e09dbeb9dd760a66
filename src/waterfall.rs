//! The waterfall engine: how much of a request is allowed, and from which pool.
//!
//! This module is pure. It reads no clock (the caller passes `now`), does no I/O and cannot
//! fail: every input it receives has been validated at the boundary (config, store, request).
//! That is what lets it be property-tested exhaustively and benchmarked in isolation.
//!
//! A [`Plan`] is an ordered list of [`Layer`]s. [`decide`] walks them in order against an
//! [`AccountState`]; each eligible layer covers what it can of the units still uncovered, and
//! the request is admitted when the layers together cover all of it (possibly split across
//! layers and grants). [`reserve`] then applies the decision's [`Draw`]s to the state (the
//! hold), and [`release`] gives them back exactly to the pools that paid.
//!
//! Units and credits are integers. A credit-priced layer covers whole units only: the credits
//! of a fraction of a unit stay where they are.

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
pub use chrono_tz::Tz;
use serde::Serialize;
use smallvec::SmallVec;

mod leases;
mod pricing;

pub use leases::{LeasePool, Leases, Slice, Wants};
pub use pricing::{PriceTable, PricesDoc, Quantities, RateRow, Rates, RatesDoc};

/// Units of a feature (tasks, seconds of video). Always whole.
pub type Units = u64;
/// Credits, the prepaid currency. Always whole.
pub type Credits = u64;
/// Milliseconds since the Unix epoch, UTC. The engine never reads a clock: time is passed in.
pub type Millis = i64;

/// A grant's `expires_at` when it does not expire: no instant comes after it.
pub const NEVER: Millis = Millis::MAX;

/// One minute, the windows' precision.
pub const MINUTE_MS: Millis = 60_000;

/// The most units one request may ask for (its cost rule, its config default, its settled
/// usage). Keeps `units × price` far from overflow (prices are capped at `config::PRICE_MAX`)
/// and catches typos like a cost in milliseconds.
pub const UNITS_MAX: Units = 1_000_000_000;

/// Index of a feature in the config's feature table. Interned so that the hot path compares
/// integers, not strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FeatureId(pub u16);

/// A set of features as a bitmask: at most [`FeatureSet::CAPACITY`] features per config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FeatureSet(u64);

impl FeatureSet {
    /// How many distinct features one config may declare.
    pub const CAPACITY: usize = 64;
    /// Every feature.
    pub const ALL: FeatureSet = FeatureSet(u64::MAX);
    /// No feature.
    pub const EMPTY: FeatureSet = FeatureSet(0);

    /// Adds `feature` to the set.
    #[must_use]
    pub fn with(self, feature: FeatureId) -> FeatureSet {
        debug_assert!((feature.0 as usize) < Self::CAPACITY);
        FeatureSet(self.0 | (1u64 << feature.0))
    }

    /// Whether `feature` is in the set.
    pub fn contains(self, feature: FeatureId) -> bool {
        self.0 & (1u64 << feature.0) != 0
    }
}

/// A plan: the waterfall an account's requests walk, and the prices in force.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The plan's name, as configured.
    pub name: Arc<str>,
    /// The layers, in the order they are walked.
    pub layers: Vec<Layer>,
    /// The plan's price versions, oldest first (never empty): the one in force at an instant
    /// is the last whose `effective_from` has passed. Every charge names the version it used.
    pub prices: Vec<PriceTable>,
    /// Strict mode: an account draws windows, free tier and grants only within slices this
    /// replica leased from the store ([`Leases`]), so that replicas together never overspend.
    pub strict: bool,
}

impl Plan {
    /// Whether an account's state kept for `self` means the same under `other`: the same kinds
    /// of stateful layers at the same places (free tiers with the same period in the same zone),
    /// and windows needing no more history than was kept for. A window that changes between
    /// rolling and calendar, or to another zone, keeps the per-minute log it counts from. Then a change of plan (or a reloaded config) keeps the state
    /// and with it the holds in flight; otherwise the state is rebuilt from the ledger.
    pub fn same_state_layout(&self, other: &Plan) -> bool {
        /// What a layer keeps per account (`None`: nothing; grant layers keep it in grants).
        /// A free tier's count belongs to one period of one zone; a usage log is per minute,
        /// whatever its windows count of it.
        fn kept(kind: &LayerKind) -> Option<(u8, Option<(Period, Tz)>)> {
            match kind {
                LayerKind::UsageLimit { .. } => Some((0, None)),
                LayerKind::FreeTier { period, zone, .. } => Some((1, Some((*period, *zone)))),
                LayerKind::Concurrency { .. } => Some((2, None)),
                LayerKind::Workspace { member_cap } => {
                    Some((3, member_cap.map(|c| (c.period, c.zone))))
                }
                _ => None,
            }
        }
        self.layers.len() == other.layers.len()
            && other.longest_window_minutes() <= self.longest_window_minutes()
            && self
                .layers
                .iter()
                .zip(&other.layers)
                .all(|(a, b)| kept(&a.kind) == kept(&b.kind))
    }

    /// The price table in force at `now`, with its index in [`Plan::prices`]. A plan without
    /// tables (config never builds one) prices nothing.
    pub fn prices_at(&self, now: Millis) -> (u8, &PriceTable) {
        let i = self
            .prices
            .iter()
            .rposition(|t| t.effective_from <= now)
            .unwrap_or(0);
        (i as u8, self.table(i as u8))
    }

    /// The price table at `index` in [`Plan::prices`]; one that prices nothing if there is none.
    pub fn table(&self, index: u8) -> &PriceTable {
        static NONE: std::sync::LazyLock<PriceTable> =
            std::sync::LazyLock::new(|| PriceTable::flat("", Vec::new()));
        self.prices.get(index as usize).unwrap_or(&NONE)
    }

    /// Credits per unit of `feature` at `now`, or `None` when the plan does not include it.
    pub fn price(&self, feature: FeatureId, now: Millis) -> Option<Credits> {
        self.prices_at(now).1.price(feature)
    }

    /// The price version a decision used.
    pub fn price_version(&self, decision: &Decision) -> &str {
        self.prices
            .get(decision.price_table as usize)
            .map_or("", |t| &t.version)
    }

    /// The end of the free-tier period of layer `layer` that starts at `start` (0 for a layer
    /// that is not a free tier: no decision would trust it).
    fn period_end(&self, layer: u8, start: Millis) -> Millis {
        match self.layers.get(layer as usize).map(|l| &l.kind) {
            Some(LayerKind::FreeTier { period, zone, .. }) => period.bounds(*zone, start).1,
            _ => 0,
        }
    }

    /// The longest usage-limit window of the plan, in minutes (0 if none): how much usage
    /// history the state must keep (a calendar window: its longest possible period).
    pub fn longest_window_minutes(&self) -> u32 {
        self.layers
            .iter()
            .filter_map(|l| match &l.kind {
                LayerKind::UsageLimit { windows } => {
                    windows.iter().map(Window::history_minutes).max()
                }
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// One layer of the waterfall.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The layer's name (used in headers, decisions and error bodies).
    pub name: Arc<str>,
    /// Which features this layer may pay for.
    pub features: FeatureSet,
    /// What kind of pool the layer is.
    pub kind: LayerKind,
}

/// The five kinds of layer of the design brief.
#[derive(Debug, Clone)]
pub enum LayerKind {
    /// Included units in rate-limit windows; a unit is available only if every window has room.
    UsageLimit {
        /// The windows, all of which must have room.
        windows: Vec<Window>,
    },
    /// An allowance of units that resets at the start of each period.
    FreeTier {
        /// Units per period.
        units: Units,
        /// The period.
        period: Period,
        /// The time zone whose midnight starts a period.
        zone: Tz,
    },
    /// Prepaid credit grants (purchases), spent in [`Grant`] order.
    Credits,
    /// Promotional grants, possibly limited to features, spent in [`Grant`] order.
    Promotions,
    /// An enterprise entitlement: a contracted pool of credits, or unlimited postpaid usage.
    Enterprise {
        /// Whether usage is billed afterwards instead of drawn from a pool.
        postpaid: bool,
    },
    /// At most `limit` requests of its features in flight at once for the account (a video
    /// model renders two at a time). Pays for nothing: a gate in front of the others.
    Concurrency {
        /// Requests allowed in flight at once.
        limit: u32,
    },
    /// The credit grants of the account's workspace (organisation), shared by its members: the
    /// pool's grants live in the workspace account's state, passed to [`decide_in`]; what a
    /// member drew this period is kept in the member's state ([`LayerState::WorkspaceUse`]).
    Workspace {
        /// At most this many credits per member per period (`None`: the whole pool).
        member_cap: Option<MemberCap>,
    },
}

/// How much one member may draw of its workspace's pool per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberCap {
    /// Credits per period.
    pub credits: Credits,
    /// The period after which the cap is whole again.
    pub period: Period,
    /// The time zone whose midnight starts a period.
    pub zone: Tz,
}

impl MemberCap {
    /// Start of the cap's period containing `now`, and its end.
    pub fn bounds(&self, now: Millis) -> (Millis, Millis) {
        self.period.bounds(self.zone, now)
    }
}

/// The period start a workspace layer's use is counted in at `now` (0 without a cap: one
/// period that never ends).
fn workspace_period(member_cap: Option<MemberCap>, now: Millis) -> Millis {
    member_cap.map_or(0, |c| c.bounds(now).0)
}

impl LayerKind {
    /// The grant kind this layer draws from, if it is a grant-backed layer.
    pub fn grant_kind(&self) -> Option<GrantKind> {
        match self {
            LayerKind::Credits => Some(GrantKind::Credits),
            LayerKind::Promotions => Some(GrantKind::Promotion),
            LayerKind::Enterprise { postpaid: false } => Some(GrantKind::Enterprise),
            _ => None,
        }
    }

    /// A short stable name for the kind, as it appears in decisions.
    pub fn tag(&self) -> &'static str {
        match self {
            LayerKind::UsageLimit { .. } => "usage_limit",
            LayerKind::FreeTier { .. } => "free_tier",
            LayerKind::Credits => "credits",
            LayerKind::Promotions => "promotions",
            LayerKind::Enterprise { postpaid: false } => "enterprise_pool",
            LayerKind::Enterprise { postpaid: true } => "enterprise_postpaid",
            LayerKind::Concurrency { .. } => "concurrency",
            LayerKind::Workspace { .. } => "workspace",
        }
    }
}

/// A usage-limit window with minute precision: rolling, or aligned to a calendar.
#[derive(Debug, Clone)]
pub struct Window {
    /// The window's name, e.g. `5h` (used in `x-ratelimit-*` header names).
    pub name: Arc<str>,
    /// Which usage counts.
    pub kind: WindowKind,
    /// Units allowed within the window.
    pub limit: Units,
}

/// Where a window's counted usage starts at an instant, and when it next resets all at once
/// (`None` for a rolling window): [`Window::span`].
pub type Span = (Millis, Option<Millis>);

/// Which usage a window counts at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// The last `minutes` minutes, the current one included: each minute's usage slides out
    /// `minutes` minutes after it.
    Rolling {
        /// Length of the window in minutes.
        minutes: u32,
    },
    /// The current calendar period in `zone`: everything used in it is free again at once at
    /// the next period's start (local midnight; Monday's; the 1st's).
    Calendar {
        /// The period.
        period: Period,
        /// The time zone whose midnight starts a period.
        zone: Tz,
    },
}

impl Window {
    /// A rolling window of `minutes`.
    pub fn rolling(name: &str, minutes: u32, limit: Units) -> Window {
        Window {
            name: name.into(),
            kind: WindowKind::Rolling { minutes },
            limit,
        }
    }

    /// A window that resets at the start of each `period` in `zone`.
    pub fn calendar(name: &str, period: Period, zone: Tz, limit: Units) -> Window {
        Window {
            name: name.into(),
            kind: WindowKind::Calendar { period, zone },
            limit,
        }
    }

    /// The first instant whose usage counts at `now`, and when the window next resets
    /// (`None` for a rolling window, which frees each minute separately).
    pub fn span(&self, now: Millis) -> Span {
        match self.kind {
            WindowKind::Rolling { minutes } => (
                (now.div_euclid(MINUTE_MS) - i64::from(minutes) + 1) * MINUTE_MS,
                None,
            ),
            WindowKind::Calendar { period, zone } => {
                let (start, end) = period.bounds(zone, now);
                (start, Some(end))
            }
        }
    }

    /// How many minutes of usage history the window can count: its length, or the longest
    /// its calendar period can last.
    pub fn history_minutes(&self) -> u32 {
        match self.kind {
            WindowKind::Rolling { minutes } => minutes,
            WindowKind::Calendar { period, .. } => period.longest_minutes(),
        }
    }

    /// How it resets, as the APIs name it: `rolling`, `daily`, `weekly` or `monthly`.
    pub fn reset_name(&self) -> &'static str {
        match self.kind {
            WindowKind::Rolling { .. } => "rolling",
            WindowKind::Calendar { period, .. } => period.reset_name(),
        }
    }

    /// The zone of a calendar window.
    pub fn zone(&self) -> Option<Tz> {
        match self.kind {
            WindowKind::Rolling { .. } => None,
            WindowKind::Calendar { zone, .. } => Some(zone),
        }
    }
}

/// A calendar period after which a free tier or a calendar window resets, in a time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// From midnight to midnight.
    Day,
    /// From Monday midnight to Monday midnight.
    Week,
    /// From the first of the month to the first of the next.
    Month,
}

impl Period {
    /// Start and end (exclusive) of the period containing `now` in `zone`: from one local
    /// midnight to the next, so that a day lasts 23 or 25 hours when the clocks change. A
    /// midnight the clocks skip starts its day when they jump; a midnight they repeat, at
    /// its first occurrence.
    pub fn bounds(self, zone: Tz, now: Millis) -> (Millis, Millis) {
        let t = DateTime::<Utc>::from_timestamp_millis(now).unwrap_or_default();
        let mut first = self.first_day(t.with_timezone(&zone).date_naive());
        let mut start = local_midnight(zone, first);
        // Only a zone whose clocks went back over a midnight could leave `now` outside the
        // period its local date names; then the neighbour holds it.
        if now < start {
            let before = first.pred_opt().map_or(first, |d| self.first_day(d));
            first = before;
            start = local_midnight(zone, first);
        }
        let next = self.next_first_day(first);
        let mut end = local_midnight(zone, next);
        if now >= end && end > start {
            start = end;
            end = local_midnight(zone, self.next_first_day(next));
        }
        (start, end)
    }

    /// The first day of the period containing `day`.
    fn first_day(self, day: NaiveDate) -> NaiveDate {
        match self {
            Period::Day => day,
            Period::Week => day
                .checked_sub_days(chrono::Days::new(u64::from(
                    day.weekday().num_days_from_monday(),
                )))
                .unwrap_or(day),
            Period::Month => day.with_day(1).unwrap_or(day),
        }
    }

    /// The first day of the period after the one starting on `first`.
    fn next_first_day(self, first: NaiveDate) -> NaiveDate {
        match self {
            Period::Day => first.succ_opt(),
            Period::Week => first.checked_add_days(chrono::Days::new(7)),
            Period::Month => first.checked_add_months(chrono::Months::new(1)),
        }
        .unwrap_or(NaiveDate::MAX)
    }

    /// The longest a period can last, in minutes: its calendar length plus a day, for the
    /// clocks that change (by an hour or two, or, as Samoa's did, by a whole day).
    pub fn longest_minutes(self) -> u32 {
        const DAY: u32 = 24 * 60;
        match self {
            Period::Day => 2 * DAY,
            Period::Week => 8 * DAY,
            Period::Month => 32 * DAY,
        }
    }

    /// The period as the config and the APIs name a free tier's: `day`, `week`, `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The period as the config and the APIs name a window's reset: `daily`, `weekly`,
    /// `monthly`.
    pub fn reset_name(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
        }
    }
}

/// The instant `day` starts in `zone`: its local midnight, the first of two when the clocks
/// repeat it, or the moment they jump when they skip it.
fn local_midnight(zone: Tz, day: NaiveDate) -> Millis {
    let midnight = day.and_time(chrono::NaiveTime::MIN);
    match zone.from_local_datetime(&midnight) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.timestamp_millis(),
        LocalResult::None => skipped_midnight(zone, midnight),
    }
}

/// The instant the clocks of `zone` jump over `midnight`: the first second whose local time
/// is at or after it, between the instants it would be under the offsets a day either side.
fn skipped_midnight(zone: Tz, midnight: NaiveDateTime) -> Millis {
    let naive = midnight.and_utc().timestamp();
    let offset_at = |secs: i64| {
        DateTime::<Utc>::from_timestamp(secs, 0).map_or(0, |t| {
            i64::from(
                zone.offset_from_utc_datetime(&t.naive_utc())
                    .fix()
                    .local_minus_utc(),
            )
        })
    };
    const DAY_S: i64 = 86_400;
    let (mut lo, mut hi) = (
        naive - offset_at(naive + DAY_S),
        naive - offset_at(naive - DAY_S),
    );
    let reached = |secs: i64| {
        DateTime::<Utc>::from_timestamp(secs, 0)
            .is_some_and(|t| t.with_timezone(&zone).naive_local() >= midnight)
    };
    if lo >= hi || !reached(hi) {
        return hi * 1000;
    }
    // `reached` is false before the jump and true from it on.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if reached(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    hi * 1000
}

/// What a grant-backed pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    /// Purchased credits.
    Credits,
    /// Promotional credits.
    Promotion,
    /// An enterprise contract's pool.
    Enterprise,
}

impl GrantKind {
    /// The name stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Credits => "credits",
            GrantKind::Promotion => "promotion",
            GrantKind::Enterprise => "enterprise",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<GrantKind> {
        match s {
            "credits" => Some(GrantKind::Credits),
            "promotion" => Some(GrantKind::Promotion),
            "enterprise" => Some(GrantKind::Enterprise),
            _ => None,
        }
    }
}

/// A grant of credits: a purchase, a promotion or an enterprise pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The store's id of the grant; draws and balance updates refer to it.
    pub id: i64,
    /// Which layer kind may draw from it.
    pub kind: GrantKind,
    /// Credits left to draw: the store's balance minus `unsettled`.
    pub balance: Credits,
    /// Credits drawn in memory (held, or charged and queued) that the store has not debited
    /// yet. What the store reports is reconciled against it ([`AccountState::sync_grant`]).
    pub unsettled: Credits,
    /// The version of the committed balance `balance` was last taken from (the store's
    /// `grants.version`): a committed balance of a lower version is older and is ignored.
    pub version: u64,
    /// From this instant on the grant is never drawn from; [`NEVER`] for a grant that does
    /// not expire (a sentinel, not an `Option`: 8 bytes a grant less, at a million accounts).
    pub expires_at: Millis,
    /// Lower is spent first; ties go to the earliest expiry.
    pub priority: i32,
    /// Which features it may pay for (promotions may be limited).
    pub features: FeatureSet,
}

impl Grant {
    /// Whether the grant may pay for `feature` at `now`.
    pub fn usable(&self, kind: GrantKind, feature: FeatureId, now: Millis) -> bool {
        self.kind == kind && self.features.contains(feature) && now < self.expires_at
    }

    /// When it expires, if it does.
    pub fn expiry(&self) -> Option<Millis> {
        (self.expires_at != NEVER).then_some(self.expires_at)
    }

    /// The order in which grants are spent: priority, then earliest expiry (never-expiring
    /// last), then the oldest grant.
    fn spend_order(&self) -> (i32, Millis, i64) {
        (self.priority, self.expires_at, self.id)
    }
}

/// The in-memory state of one account: what the hot path decides against.
#[derive(Debug, Clone)]
pub struct AccountState {
    /// Per-layer state, index-aligned with the plan's layers. Boxed slices, not vectors, here
    /// and for the grants: 16 bytes an account less, which at a million accounts took the
    /// state's cell to a smaller allocation class (docs/BENCHMARKS.md, memory).
    pub layers: Box<[LayerState]>,
    /// The account's grants, kept in spend order. A grant is added rarely (a purchase, a
    /// promotion); each addition reallocates.
    grants: Box<[Grant]>,
    /// Strict mode's slices (`None` for a plan that is not strict). Boxed: most plans are not
    /// strict, and inline slices would cost every account of a large view 208 bytes.
    pub leases: Option<Box<Leases>>,
}

/// The state a layer keeps for one account.
///
/// Usage is split like a grant's balance: what counts (`used`) is what the store has committed,
/// from every replica, plus what this gateway holds and has not committed yet (`unsettled`,
/// included in `used`). That split is what lets a replica rebuild its counts from the store
/// ([`AccountState::resync_usage`]) without forgetting its own requests in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerState {
    /// Units used per minute, oldest first, for a usage-limit layer.
    UsageLimit {
        /// Per minute, everything that counts (committed and unsettled) and, of it, this
        /// gateway's holds and queued charges not yet committed. One log for both: at a million
        /// accounts, a second log per layer was 80 bytes an account (docs/BENCHMARKS.md).
        log: UsageLog,
    },
    /// Units used in the free tier's current period.
    FreeTier {
        /// Start of the period the count belongs to.
        period_start: Millis,
        /// Its end (exclusive): while `now` is before it, a decision need not find the period
        /// in the calendar (`Period::bounds`, a third of a decision's time before).
        period_end: Millis,
        /// Units used in that period: committed and unsettled.
        used: Units,
        /// Of `used`, what this gateway has not committed yet.
        unsettled: Units,
    },
    /// Requests in flight, for a concurrency layer.
    InFlight(u32),
    /// Credits a member drew from its workspace's pool in the cap's current period.
    WorkspaceUse {
        /// Start of the period the count belongs to (0 when the layer has no cap).
        period_start: Millis,
        /// Credits drawn in that period: committed and unsettled.
        used: Credits,
        /// Of `used`, what this gateway has not committed yet.
        unsettled: Credits,
    },
    /// Grant-backed and postpaid layers keep their state in the grants.
    Stateless,
}

/// The first minute (since the epoch) that starts at or after `at`.
fn first_minute(at: Millis) -> i64 {
    at.div_euclid(MINUTE_MS) + i64::from(at.rem_euclid(MINUTE_MS) != 0)
}

/// One minute of a [`UsageLog`].
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// The minute, since the epoch.
    minute: i64,
    /// Units that count in it: committed and unsettled.
    used: Units,
    /// Of `used`, what this gateway has not committed yet.
    unsettled: Units,
    /// `used` of this minute and of every earlier one in the log, counted (wrapping) from an
    /// origin of no meaning: what minutes `i..` of the log hold is the last bucket's `through`
    /// less bucket `i`'s, plus bucket `i`'s `used`. A window's use is then two binary searches
    /// and a subtraction, however many minutes it spans: summing a heavy user's week of
    /// minutes was 10 000 additions a decision.
    through: Units,
}

/// Two minutes are equal when they hold the same units: `through` depends on where the log's
/// sums started, not on what it holds.
impl PartialEq for Bucket {
    fn eq(&self, other: &Bucket) -> bool {
        (self.minute, self.used, self.unsettled) == (other.minute, other.used, other.unsettled)
    }
}

impl Eq for Bucket {}

/// Units used per minute, oldest first; minutes with neither usage nor unsettled units are
/// absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageLog {
    buckets: VecDeque<Bucket>,
}

impl UsageLog {
    /// Units used in the minutes that start at or after `from`.
    pub fn used_since(&self, from: Millis) -> Units {
        self.used_from(self.start_of(first_minute(from)))
    }

    /// The index of the first minute at or after `first`: the log's length if none.
    fn start_of(&self, first: i64) -> usize {
        // Most windows hold the whole log (a light user, or the longest window, which the log
        // is pruned to) or none of it: no search for those.
        match (self.buckets.front(), self.buckets.back()) {
            (Some(f), _) if f.minute >= first => 0,
            (_, Some(l)) if l.minute < first => self.buckets.len(),
            _ => self.buckets.partition_point(|b| b.minute < first),
        }
    }

    /// Units used in the log's minutes from index `i` on.
    fn used_from(&self, i: usize) -> Units {
        match (self.buckets.get(i), self.buckets.back()) {
            (Some(b), Some(last)) => last.through.wrapping_sub(b.through).wrapping_add(b.used),
            _ => 0,
        }
    }

    /// The `through` sum just before index `i` (the origin for the first minute).
    fn through_before(&self, i: usize) -> Units {
        match i.checked_sub(1).and_then(|j| self.buckets.get(j)) {
            Some(prev) => prev.through,
            None => self
                .buckets
                .front()
                .map_or(0, |f| f.through.wrapping_sub(f.used)),
        }
    }

    /// Adds `delta` (wrapping: a negative one as its two's complement) to the sums of the
    /// minutes from index `i` on, after a change of minute `i`'s use. Almost always the last
    /// minute or two: usage is logged, and released, in the current minute.
    fn shift_through(&mut self, i: usize, delta: Units) {
        for b in self.buckets.range_mut(i..) {
            b.through = b.through.wrapping_add(delta);
        }
    }

    /// Where minute `at_minute` is (`Ok`) or would go (`Err`), looking at the newest first.
    fn find(&self, at_minute: i64) -> Result<usize, usize> {
        let len = self.buckets.len();
        match self.buckets.back() {
            Some(last) if last.minute == at_minute => Ok(len - 1),
            Some(last) if last.minute < at_minute => Err(len),
            None => Err(0),
            Some(_) => {
                let pos = self.buckets.partition_point(|b| b.minute < at_minute);
                match self.buckets.get(pos) {
                    Some(b) if b.minute == at_minute => Ok(pos),
                    _ => Err(pos),
                }
            }
        }
    }

    /// Of the units logged, those this gateway has not committed yet.
    pub fn unsettled(&self) -> Units {
        self.buckets.iter().map(|b| b.unsettled).sum()
    }

    /// Units `window` counts at `now`.
    pub fn used(&self, window: &Window, now: Millis) -> Units {
        self.used_since(window.span(now).0)
    }

    /// The instant at which at least `needed` units of `window` are free, given no further
    /// usage: for a rolling window, the end of the minute after which enough old usage has slid
    /// out; for a calendar window, the next period's start. `now` if they are free already;
    /// `None` if the window is too small to ever hold `needed`.
    pub fn free_at(&self, window: &Window, needed: Units, now: Millis) -> Option<Millis> {
        let span = window.span(now);
        self.free_at_given(window, span, self.used_since(span.0), needed, now)
    }

    /// [`UsageLog::free_at`] given the window's `span` at `now` and the units it counts then
    /// (a decision has both already).
    fn free_at_given(
        &self,
        window: &Window,
        (from, reset): Span,
        used: Units,
        needed: Units,
        now: Millis,
    ) -> Option<Millis> {
        if needed > window.limit {
            return None;
        }
        // Usage can exceed the limit: replicas that admitted within each other's notification
        // lag both count what the other committed.
        let room = |used: Units| window.limit.saturating_sub(used) >= needed;
        if room(used) {
            return Some(now);
        }
        let WindowKind::Rolling { minutes } = window.kind else {
            return reset;
        };
        let first = first_minute(from);
        let oldest = self.start_of(first);
        let origin = self.through_before(oldest);
        // The first minute whose sliding out (with every older one of the window) leaves
        // room: what slides out only grows minute by minute. Usually the oldest minute or the
        // next (a decision asks when one more unit is free), so look there before searching.
        let short = |b: &Bucket| !room(used.saturating_sub(b.through.wrapping_sub(origin)));
        let frees = match (self.buckets.get(oldest), self.buckets.get(oldest + 1)) {
            (Some(b), _) if !short(b) => oldest,
            (Some(_), Some(b)) if !short(b) => oldest + 1,
            (Some(_), Some(_)) => self
                .buckets
                .partition_point(|b| b.minute < first || short(b)),
            _ => self.buckets.len(),
        };
        match self.buckets.get(frees) {
            Some(b) => Some((b.minute + i64::from(minutes)) * MINUTE_MS),
            None => Some(now),
        }
    }

    /// Records `used` units in `at_minute`, of which `unsettled` are this gateway's and not
    /// committed yet.
    fn add(&mut self, at_minute: i64, used: Units, unsettled: Units) {
        if used == 0 && unsettled == 0 {
            return; // an empty minute is an absent one
        }
        match self.find(at_minute) {
            Ok(pos) => {
                let b = &mut self.buckets[pos];
                b.used += used;
                b.unsettled += unsettled;
                self.shift_through(pos, used);
            }
            Err(pos) => {
                if self.buckets.capacity() == 0 {
                    // Room for exactly one: most accounts of a large view have a minute or two
                    // in their windows, and the default first allocation holds four (96 bytes
                    // more an account). A second minute grows it to four as usual.
                    self.buckets.reserve_exact(1);
                }
                let bucket = Bucket {
                    minute: at_minute,
                    used,
                    unsettled,
                    through: self.through_before(pos).wrapping_add(used),
                };
                self.buckets.insert(pos, bucket);
                self.shift_through(pos + 1, used);
            }
        }
    }

    /// Takes back `used` and `unsettled` units recorded in `at_minute` (a released hold takes
    /// both; a commit only `unsettled`, a refund only `used`).
    fn remove(&mut self, at_minute: i64, used: Units, unsettled: Units) {
        let Ok(pos) = self.find(at_minute) else {
            return;
        };
        let b = &mut self.buckets[pos];
        let taken = b.used.min(used);
        b.used -= taken;
        b.unsettled = b.unsettled.saturating_sub(unsettled);
        let empty = b.used == 0 && b.unsettled == 0;
        self.shift_through(pos, taken.wrapping_neg());
        if empty {
            // It adds nothing to the sums after it.
            self.buckets.remove(pos);
        }
    }

    /// Forgets what the store committed: every minute counts only what this gateway has not
    /// committed yet (a resync then observes the store's truth on top).
    fn keep_unsettled(&mut self) {
        let mut through: Units = 0;
        self.buckets.retain_mut(|b| {
            b.used = b.unsettled;
            through = through.wrapping_add(b.used);
            b.through = through;
            b.unsettled > 0
        });
    }

    /// Forgets minutes older than `keep_minutes` before `now`: they can no longer count.
    fn prune(&mut self, keep_minutes: u32, now: Millis) {
        let first = now.div_euclid(MINUTE_MS) - i64::from(keep_minutes) + 1;
        while self.buckets.front().is_some_and(|b| b.minute < first) {
            self.buckets.pop_front();
        }
    }

    /// Whether every minute's `through` is its predecessor's plus its own use (tests).
    #[cfg(test)]
    fn sums_hold(&self) -> bool {
        self.buckets
            .iter()
            .zip(self.buckets.iter().skip(1))
            .all(|(a, b)| b.through == a.through.wrapping_add(b.used))
    }
}

impl AccountState {
    /// A fresh state for `plan` at `now`: nothing used, the given grants.
    pub fn new(plan: &Plan, grants: Vec<Grant>, now: Millis) -> AccountState {
        let layers = plan
            .layers
            .iter()
            .map(|l| match &l.kind {
                LayerKind::UsageLimit { .. } => LayerState::UsageLimit {
                    log: UsageLog::default(),
                },
                LayerKind::FreeTier { period, zone, .. } => {
                    let (period_start, period_end) = period.bounds(*zone, now);
                    LayerState::FreeTier {
                        period_start,
                        period_end,
                        used: 0,
                        unsettled: 0,
                    }
                }
                LayerKind::Concurrency { .. } => LayerState::InFlight(0),
                LayerKind::Workspace { member_cap } => LayerState::WorkspaceUse {
                    period_start: workspace_period(*member_cap, now),
                    used: 0,
                    unsettled: 0,
                },
                _ => LayerState::Stateless,
            })
            .collect();
        let mut grants = grants;
        // Stable: grants that tie keep the order they came in, as adding them one by one would.
        grants.sort_by_key(Grant::spend_order);
        AccountState {
            layers,
            grants: grants.into_boxed_slice(),
            leases: plan.strict.then(Box::default),
        }
    }

    /// Adds a grant, keeping spend order.
    pub fn add_grant(&mut self, grant: Grant) {
        let pos = self
            .grants
            .partition_point(|g| g.spend_order() <= grant.spend_order());
        let mut grants = std::mem::take(&mut self.grants).into_vec();
        grants.insert(pos, grant);
        self.grants = grants.into_boxed_slice();
    }

    /// The account's grants, in spend order.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Marks `draws` as committed by the store: they are no longer unsettled (they still count).
    /// A grant's balance is left for the caller to sync. Draws from a workspace pool settle only
    /// the member's count here: see [`AccountState::settled_in`].
    pub fn settled(&mut self, draws: &[Draw]) {
        self.settled_in(None, draws, |_| None);
    }

    /// [`AccountState::settled`] for a member whose workspace's state is `pool` (a draw from the
    /// workspace's grants is settled there), given what the commit that debited the draws left
    /// in each grant: `committed(grant id)`, its balance and version.
    ///
    /// A grant's balance is then right at once, whatever another replica's notice did in the
    /// meantime (see [`settle_grant`]): the replica follower applies notices while the ledger
    /// writer settles, so a notice of a later commit, which counts these draws already, may
    /// have been taken before them.
    pub fn settled_in(
        &mut self,
        mut pool: Option<&mut AccountState>,
        draws: &[Draw],
        committed: impl Fn(i64) -> Option<(Credits, u64)>,
    ) {
        for draw in draws {
            if let (Some(leases), Some(pool)) = (&mut self.leases, draw.lease_pool()) {
                leases.committed(pool, draw.lease_amount());
            }
            match (&draw.pool, self.layers.get_mut(draw.layer as usize)) {
                (Pool::Grant { grant_id }, _) => {
                    if let Some(grant) = self.grants.iter_mut().find(|g| g.id == *grant_id) {
                        settle_grant(grant, draw.credits, committed(*grant_id));
                    }
                }
                (Pool::Window { minute }, Some(LayerState::UsageLimit { log })) => {
                    log.remove(*minute, 0, draw.units);
                }
                (
                    Pool::FreeTier { period_start: p },
                    Some(LayerState::FreeTier {
                        period_start,
                        unsettled,
                        ..
                    }),
                ) if *p == *period_start => *unsettled = unsettled.saturating_sub(draw.units),
                (
                    Pool::Workspace {
                        grant_id,
                        period_start: p,
                    },
                    layer,
                ) => {
                    if let Some(LayerState::WorkspaceUse {
                        period_start,
                        unsettled,
                        ..
                    }) = layer
                        && *p == *period_start
                    {
                        *unsettled = unsettled.saturating_sub(draw.credits);
                    }
                    if let Some(pool) = pool.as_deref_mut()
                        && let Some(grant) = pool.grants.iter_mut().find(|g| g.id == *grant_id)
                    {
                        settle_grant(grant, draw.credits, committed(*grant_id));
                    }
                }
                _ => {}
            }
        }
    }

    /// Takes the store's committed balance of a grant as the truth: what is left to draw is
    /// that balance minus what this gateway holds unsettled. This is how the view learns what
    /// other replicas spent, and what a debit found missing. A balance of a lower `version`
    /// than the one last taken is older (heard late) and changes nothing; `None` (a version
    /// not known) is taken as it comes. Returns whether the grant is known.
    pub fn sync_grant(&mut self, grant_id: i64, committed: Credits, version: Option<u64>) -> bool {
        match self.grants.iter_mut().find(|g| g.id == grant_id) {
            Some(grant) => {
                match version {
                    Some(v) if v < grant.version => return true,
                    Some(v) => grant.version = v,
                    None => {}
                }
                grant.balance = committed.saturating_sub(grant.unsettled);
                true
            }
            None => false,
        }
    }

    /// Sets which features a grant may pay for (the config's feature table was reloaded).
    pub fn set_grant_features(&mut self, grant_id: i64, features: FeatureSet) {
        if let Some(grant) = self.grants.iter_mut().find(|g| g.id == grant_id) {
            grant.features = features;
        }
    }

    /// Counts usage the store has committed (read on start-up or a resync, or announced by
    /// another replica) in the windows and free tier. Grant draws are ignored: balances travel
    /// as balances ([`AccountState::sync_grant`]).
    pub fn observe(&mut self, plan: &Plan, draw: &Draw, now: Millis) {
        match (&draw.pool, self.layers.get_mut(draw.layer as usize)) {
            (Pool::Window { minute }, Some(LayerState::UsageLimit { log })) => {
                log.add(*minute, draw.units, 0);
                log.prune(plan.longest_window_minutes(), now);
            }
            (
                Pool::FreeTier { period_start: p },
                Some(LayerState::FreeTier {
                    period_start,
                    period_end,
                    used,
                    unsettled,
                }),
            ) => {
                // Another replica may have started the next period before this one did.
                if *p > *period_start {
                    *period_start = *p;
                    *period_end = plan.period_end(draw.layer, *p);
                    *used = 0;
                    *unsettled = 0;
                }
                if *p == *period_start {
                    *used += draw.units;
                }
            }
            (
                Pool::Workspace {
                    period_start: p, ..
                },
                Some(LayerState::WorkspaceUse {
                    period_start,
                    used,
                    unsettled,
                }),
            ) => {
                if *p > *period_start {
                    *period_start = *p;
                    *used = 0;
                    *unsettled = 0;
                }
                if *p == *period_start {
                    *used += draw.credits;
                }
            }
            _ => {}
        }
    }

    /// Takes back committed usage from the windows and free tier (a refunded charge).
    pub fn unobserve(&mut self, draw: &Draw) {
        match (&draw.pool, self.layers.get_mut(draw.layer as usize)) {
            (Pool::Window { minute }, Some(LayerState::UsageLimit { log })) => {
                log.remove(*minute, draw.units, 0);
            }
            (
                Pool::FreeTier { period_start: p },
                Some(LayerState::FreeTier {
                    period_start, used, ..
                }),
            ) if *p == *period_start => *used = used.saturating_sub(draw.units),
            (
                Pool::Workspace {
                    period_start: p, ..
                },
                Some(LayerState::WorkspaceUse {
                    period_start, used, ..
                }),
            ) if *p == *period_start => *used = used.saturating_sub(draw.credits),
            _ => {}
        }
    }

    /// Rebuilds the windows' and free tier's counts from the store's truth: `committed` (every
    /// replica's charges since [`Plan::longest_window_minutes`] and the free tier's period
    /// start) plus what this gateway still holds unsettled. Used after a replica may have missed
    /// announcements (a lost listener).
    pub fn resync_usage(&mut self, plan: &Plan, committed: &[Draw], now: Millis) {
        for (layer, state) in plan.layers.iter().zip(self.layers.iter_mut()) {
            match (&layer.kind, state) {
                (LayerKind::UsageLimit { .. }, LayerState::UsageLimit { log }) => {
                    log.keep_unsettled();
                }
                (
                    LayerKind::FreeTier { period, zone, .. },
                    LayerState::FreeTier {
                        period_start,
                        period_end,
                        used,
                        unsettled,
                    },
                ) => {
                    let (current, end) = period.bounds(*zone, now);
                    if *period_start != current {
                        *period_start = current;
                        *unsettled = 0;
                    }
                    *period_end = end;
                    *used = *unsettled;
                }
                (
                    LayerKind::Workspace { member_cap },
                    LayerState::WorkspaceUse {
                        period_start,
                        used,
                        unsettled,
                    },
                ) => {
                    let current = workspace_period(*member_cap, now);
                    if *period_start != current {
                        *period_start = current;
                        *unsettled = 0;
                    }
                    *used = *unsettled;
                }
                _ => {}
            }
        }
        for draw in committed {
            self.observe(plan, draw, now);
        }
    }

    /// Credits left in grants of `kind` usable for `feature` at `now`.
    pub fn credits_available(&self, kind: GrantKind, feature: FeatureId, now: Millis) -> Credits {
        self.grants
            .iter()
            .filter(|g| g.usable(kind, feature, now))
            .map(|g| g.balance)
            .sum()
    }

    /// Credits left in every unexpired credit and promotion grant usable for `feature`.
    pub fn spendable_credits(&self, feature: FeatureId, now: Millis) -> Credits {
        self.credits_available(GrantKind::Credits, feature, now)
            + self.credits_available(GrantKind::Promotion, feature, now)
    }

    fn free_tier_used(&self, layer: usize, period_start_now: Millis) -> Units {
        match self.layers.get(layer) {
            Some(LayerState::FreeTier {
                period_start, used, ..
            }) if *period_start == period_start_now => *used,
            _ => 0,
        }
    }

    /// Credits drawn from the workspace pool by workspace layer `layer` in the period starting
    /// at `period_start_now`.
    pub fn workspace_used(&self, layer: usize, period_start_now: Millis) -> Credits {
        match self.layers.get(layer) {
            Some(LayerState::WorkspaceUse {
                period_start, used, ..
            }) if *period_start == period_start_now => *used,
            _ => 0,
        }
    }

    /// The per-minute usage of usage-limit layer `layer` (`None` for any other layer).
    pub fn usage_log(&self, layer: usize) -> Option<&UsageLog> {
        match self.layers.get(layer) {
            Some(LayerState::UsageLimit { log }) => Some(log),
            _ => None,
        }
    }

    /// Requests in flight in the concurrency layer `layer` (0 for any other layer).
    pub fn in_flight(&self, layer: usize) -> u32 {
        match self.layers.get(layer) {
            Some(LayerState::InFlight(n)) => *n,
            _ => 0,
        }
    }

    /// The status of each window of usage-limit layer `layer` at `now`.
    pub fn windows<'a>(
        &'a self,
        plan: &'a Plan,
        layer: usize,
        now: Millis,
    ) -> impl Iterator<Item = WindowStatus<'a>> + 'a {
        let windows: &[Window] = match plan.layers.get(layer).map(|l| &l.kind) {
            Some(LayerKind::UsageLimit { windows }) => windows,
            _ => &[],
        };
        let log = self.usage_log(layer);
        windows.iter().map(move |w| {
            let (from, period_end) = w.span(now);
            let used = log.map_or(0, |l| l.used_since(from));
            let reset_at = match period_end {
                Some(end) => end,
                None => log.and_then(|l| l.free_at(w, w.limit, now)).unwrap_or(now),
            };
            WindowStatus {
                window: w,
                used,
                remaining: w.limit.saturating_sub(used),
                reset_at,
            }
        })
    }
}

/// Takes a slot in every concurrency layer of the plan that gates `feature`; call once per
/// admitted request, and [`finish_request`] once when it ends, however it ends.
pub fn start_request(plan: &Plan, state: &mut AccountState, feature: FeatureId) {
    step_in_flight(plan, state, feature, true);
}

/// Gives back the slots [`start_request`] took.
pub fn finish_request(plan: &Plan, state: &mut AccountState, feature: FeatureId) {
    step_in_flight(plan, state, feature, false);
}

fn step_in_flight(plan: &Plan, state: &mut AccountState, feature: FeatureId, up: bool) {
    for (layer, slot) in plan.layers.iter().zip(state.layers.iter_mut()) {
        if let (LayerKind::Concurrency { .. }, LayerState::InFlight(n)) = (&layer.kind, slot)
            && layer.features.contains(feature)
        {
            *n = if up {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            };
        }
    }
}

/// A window's numbers at one instant.
#[derive(Debug, Clone, Copy)]
pub struct WindowStatus<'a> {
    /// The window.
    pub window: &'a Window,
    /// Units used inside it.
    pub used: Units,
    /// Units still allowed.
    pub remaining: Units,
    /// When it resets: a rolling window's when all its current usage has slid out (equal to
    /// now when nothing is used), a calendar window's at the next period's start.
    pub reset_at: Millis,
}

/// Where a draw was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "pool", rename_all = "snake_case")]
pub enum Pool {
    /// A usage-limit layer, in the given minute.
    Window {
        /// Minute (since the epoch) the units were counted in.
        minute: i64,
    },
    /// A free tier, in the period starting at `period_start`.
    FreeTier {
        /// Start of the period, in ms.
        period_start: Millis,
    },
    /// A grant (credits, promotion or enterprise pool).
    Grant {
        /// The grant's store id.
        grant_id: i64,
    },
    /// A credit grant of the account's workspace, counted against the member's cap in the
    /// period starting at `period_start` (0: a layer without a cap).
    Workspace {
        /// The workspace grant's store id.
        grant_id: i64,
        /// Start of the cap's period, in ms.
        period_start: Millis,
    },
    /// Unlimited enterprise usage, billed afterwards.
    Postpaid,
    /// A feature whose price is 0, covered by a grant layer at no charge.
    NoCharge,
}

/// One part of an admitted request's cost: `units` covered by `layer` from `pool`.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct Draw {
    /// Index of the layer in the plan.
    pub layer: u8,
    /// Where the decision found the drawn grant in its account's grants: where [`reserve`]
    /// and [`release`] look first. Only a hint, checked against the grant's id (grants added
    /// since may have moved it), never stored and not part of the draw's value. Without it each
    /// grant draw searched for its grant, and how far it had to look varied from draw to draw:
    /// a third of a 67-draw decision's time was that search's mispredicted branch.
    #[serde(skip)]
    slot: u32,
    /// Where the units were taken from.
    #[serde(flatten)]
    pub pool: Pool,
    /// Units covered.
    pub units: Units,
    /// Credits taken (0 for windows and the free tier).
    pub credits: Credits,
}

impl PartialEq for Draw {
    fn eq(&self, other: &Draw) -> bool {
        // `slot` is where to look, not what was drawn.
        (self.layer, self.pool, self.units, self.credits)
            == (other.layer, other.pool, other.units, other.credits)
    }
}

impl Eq for Draw {}

impl Draw {
    /// `units` (costing `credits`) covered by `layer` from `pool`.
    pub fn new(layer: u8, pool: Pool, units: Units, credits: Credits) -> Draw {
        Draw {
            layer,
            slot: 0,
            pool,
            units,
            credits,
        }
    }

    /// The pool strict mode leases for this draw (`None`: postpaid and free features).
    pub fn lease_pool(&self) -> Option<LeasePool> {
        match self.pool {
            Pool::Window { .. } | Pool::FreeTier { .. } => Some(LeasePool::Layer(self.layer)),
            Pool::Grant { grant_id } => Some(LeasePool::Grant(grant_id)),
            // Strict plans cannot have a workspace layer (config).
            Pool::Workspace { .. } | Pool::Postpaid | Pool::NoCharge => None,
        }
    }

    /// What the draw takes of its leased pool: credits of a grant, units of anything else.
    pub fn lease_amount(&self) -> u64 {
        match self.pool {
            Pool::Grant { .. } | Pool::Workspace { .. } => self.credits,
            _ => self.units,
        }
    }

    /// The grant whose balance pays for this draw, if any (the account's own or its
    /// workspace's).
    pub fn grant_id(&self) -> Option<i64> {
        match self.pool {
            Pool::Grant { grant_id } | Pool::Workspace { grant_id, .. } => Some(grant_id),
            _ => None,
        }
    }
}

/// What one layer had and gave, as recorded in a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LayerReport {
    /// Index of the layer in the plan.
    pub layer: u8,
    /// Whether the layer may pay for the request's feature.
    pub eligible: bool,
    /// Units the layer could have covered before this request.
    pub available_units: Units,
    /// Credits the layer held (grant-backed layers), before this request.
    pub available_credits: Option<Credits>,
    /// Units it gave to this request.
    pub gave_units: Units,
    /// Credits it gave to this request.
    pub gave_credits: Credits,
    /// When the layer next has more room (windows, free tier, a member cap), if it is short.
    pub reset_at: Option<Millis>,
    /// A workspace layer: the credits the workspace's pool held for the feature.
    pub pool_credits: Option<Credits>,
    /// A workspace layer with a member cap: the credits of the cap left this period.
    pub cap_left: Option<Credits>,
}

/// Why a request was denied (read back from a stored decision by the usage page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Denial {
    /// The usage limits are used up and nothing after them can pay; waiting will help.
    UsageLimitReached {
        /// When enough of the limits has freed up.
        retry_at: Millis,
    },
    /// Nothing can pay, and waiting will not help.
    InsufficientCredits {
        /// Credits the uncovered units would cost.
        needed_credits: Credits,
        /// Credits usable for the feature.
        available_credits: Credits,
    },
    /// The plan does not include the feature.
    NotEntitled,
    /// As many requests of the feature as the plan allows are running; one ending will help.
    ConcurrencyLimit {
        /// Requests allowed at once.
        limit: u32,
        /// Requests running now.
        running: u32,
    },
}

/// The answer to "how much of this request is allowed, and from which pool".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The feature asked for.
    pub feature: FeatureId,
    /// Units asked for.
    pub units: Units,
    /// Price in force (0 when not entitled).
    pub credits_per_unit: Credits,
    /// Which of the plan's price tables was in force ([`Plan::price_version`]).
    pub price_table: u8,
    /// `None` when admitted.
    pub denial: Option<Denial>,
    /// How the cost is covered (empty when denied).
    pub draws: SmallVec<[Draw; 4]>,
    /// What every layer had and gave, in plan order.
    pub layers: SmallVec<[LayerReport; 6]>,
}

impl Decision {
    /// Whether the request may proceed.
    pub fn admitted(&self) -> bool {
        self.denial.is_none()
    }

    /// Total credits drawn.
    pub fn credits(&self) -> Credits {
        self.draws.iter().map(|d| d.credits).sum()
    }

    /// The request this decision admitted, for asking the waterfall for more of it.
    pub fn ongoing(&self) -> Ongoing {
        Ongoing {
            feature: self.feature,
            price_table: self.price_table,
        }
    }
}

/// An admitted request that needs more units than it was given (a response that settles above
/// its estimate, a watched stream that grows): the waterfall covers more of the same feature at
/// the price version it was decided under, and does not gate it again on concurrency (it is
/// already running, in its own slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ongoing {
    /// The feature asked for.
    pub feature: FeatureId,
    /// The price table the request was decided under.
    pub price_table: u8,
}

/// What a walk of the waterfall covers.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// A new request of a feature: priced at `now`, gated on concurrency.
    New(FeatureId),
    /// More for a running request.
    More(Ongoing),
}

impl Start {
    fn feature(self) -> FeatureId {
        match self {
            Start::New(f) => f,
            Start::More(o) => o.feature,
        }
    }
}

/// Decides how `units` of `feature` are covered for an account in `state` at `now`.
///
/// Walks the plan's layers in order; each eligible layer covers what it can of what is still
/// uncovered. Does not change the state: [`reserve`] applies an admitted decision.
pub fn decide(
    plan: &Plan,
    state: &AccountState,
    feature: FeatureId,
    units: Units,
    now: Millis,
) -> Decision {
    walk(
        plan,
        state,
        None,
        Start::New(feature),
        units,
        now,
        Caps::Leased,
    )
}

/// [`decide`] for a member of a workspace whose state (and grants, the pool) is `pool`: the
/// plan's workspace layers draw from the pool's credit grants, within the member's cap. With
/// `None` a workspace layer has nothing to give.
pub fn decide_in(
    plan: &Plan,
    state: &AccountState,
    pool: Option<&AccountState>,
    feature: FeatureId,
    units: Units,
    now: Millis,
) -> Decision {
    walk(
        plan,
        state,
        pool,
        Start::New(feature),
        units,
        now,
        Caps::Leased,
    )
}

/// What a strict account must lease before [`decide`] can be trusted to walk the waterfall in
/// order: per pool, how much more than its slice the request would draw if every pool that
/// the store has not said is drained could be leased. Empty when the slices suffice, for a
/// plan that is not strict, and when the request would be denied anyway.
pub fn lease_wants(
    plan: &Plan,
    state: &AccountState,
    feature: FeatureId,
    units: Units,
    now: Millis,
) -> Wants {
    let mut wants = Wants::new();
    let Some(leases) = &state.leases else {
        return wants;
    };
    let wished = walk(
        plan,
        state,
        None,
        Start::New(feature),
        units,
        now,
        Caps::Wanting,
    );
    if !wished.admitted() {
        return wants;
    }
    for draw in &wished.draws {
        let Some(pool) = draw.lease_pool() else {
            continue;
        };
        match wants.iter_mut().find(|(p, _)| *p == pool) {
            Some((_, need)) => *need += draw.lease_amount(),
            None => wants.push((pool, draw.lease_amount())),
        }
    }
    wants.retain(|(pool, need)| {
        let room = leases.room(*pool, now);
        *need = need.saturating_sub(room);
        *need > 0
    });
    wants
}

/// Which limit a strict account's pools are walked with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caps {
    /// Within the leased slices: what may be drawn now.
    Leased,
    /// Within what could be leased: the slices only for pools the store said are drained.
    Wanting,
}

impl AccountState {
    /// `room` of `pool` as strict mode lets this replica draw it.
    fn capped(&self, pool: LeasePool, room: u64, caps: Caps, now: Millis) -> u64 {
        match (&self.leases, caps) {
            (None, _) => room,
            (Some(l), Caps::Wanting) if !l.drained(pool, now) => room,
            (Some(l), _) => room.min(l.room(pool, now)),
        }
    }
}

fn walk(
    plan: &Plan,
    state: &AccountState,
    pool: Option<&AccountState>,
    start: Start,
    units: Units,
    now: Millis,
    caps: Caps,
) -> Decision {
    let feature = start.feature();
    let mut decision = Decision {
        feature,
        units,
        credits_per_unit: 0,
        price_table: 0,
        denial: None,
        draws: SmallVec::new(),
        layers: SmallVec::new(),
    };
    let (table, prices) = match start {
        Start::New(_) => plan.prices_at(now),
        Start::More(ongoing) => (ongoing.price_table, plan.table(ongoing.price_table)),
    };
    decision.price_table = table;
    let Some(price) = prices.price(feature) else {
        decision.denial = Some(Denial::NotEntitled);
        return decision;
    };
    decision.credits_per_unit = price;
    // Concurrency gates first: a request that could not start now is not priced at all.
    for (index, layer) in plan.layers.iter().enumerate() {
        if matches!(start, Start::More(_)) {
            break; // already running, in a slot of its own
        }
        if let LayerKind::Concurrency { limit } = layer.kind
            && layer.features.contains(feature)
        {
            let running = state.in_flight(index);
            if running >= limit {
                decision.denial = Some(Denial::ConcurrencyLimit { limit, running });
                return decision;
            }
        }
    }
    if units == 0 {
        return decision; // nothing to cover: admitted, drawing from no pool
    }
    let minute = now.div_euclid(MINUTE_MS);
    let mut left = units;

    for (index, layer) in plan.layers.iter().enumerate() {
        let idx = index as u8;
        let mut report = LayerReport {
            layer: idx,
            eligible: layer.features.contains(feature),
            available_units: 0,
            available_credits: None,
            gave_units: 0,
            gave_credits: 0,
            reset_at: None,
            pool_credits: None,
            cap_left: None,
        };
        if !report.eligible {
            decision.layers.push(report);
            continue;
        }
        match &layer.kind {
            LayerKind::UsageLimit { windows } => {
                let log = state.usage_log(index);
                // Each window's span and use, found once: a short layer's reset needs them too.
                let mut seen: SmallVec<[(Span, Units); 4]> = SmallVec::new();
                let mut room = if windows.is_empty() { 0 } else { Units::MAX };
                for w in windows {
                    let span = w.span(now);
                    let used = log.map_or(0, |l| l.used_since(span.0));
                    room = room.min(w.limit.saturating_sub(used));
                    seen.push((span, used));
                }
                let available = state.capped(LeasePool::Layer(idx), room, caps, now);
                let give = available.min(left);
                report.available_units = available;
                report.gave_units = give;
                if give > 0 {
                    decision
                        .draws
                        .push(Draw::new(idx, Pool::Window { minute }, give, 0));
                }
                if available == give {
                    // Short (or exactly used up): say when one more unit frees up.
                    report.reset_at = windows
                        .iter()
                        .zip(&seen)
                        .filter_map(|(w, &(span, used))| {
                            log.and_then(|l| l.free_at_given(w, span, used, give + 1, now))
                        })
                        .max();
                }
                left -= give;
            }
            LayerKind::FreeTier {
                units: allowance,
                period,
                zone,
            } => {
                let (start, end) = match state.layers.get(index) {
                    Some(&LayerState::FreeTier {
                        period_start,
                        period_end,
                        ..
                    }) if period_start <= now && now < period_end => (period_start, period_end),
                    _ => period.bounds(*zone, now),
                };
                debug_assert_eq!((start, end), period.bounds(*zone, now), "the period's memo");
                let room = allowance.saturating_sub(state.free_tier_used(index, start));
                let available = state.capped(LeasePool::Layer(idx), room, caps, now);
                let give = available.min(left);
                report.available_units = available;
                report.gave_units = give;
                if available == give {
                    report.reset_at = Some(end);
                }
                if give > 0 {
                    decision.draws.push(Draw::new(
                        idx,
                        Pool::FreeTier {
                            period_start: start,
                        },
                        give,
                        0,
                    ));
                }
                left -= give;
            }
            LayerKind::Workspace { member_cap } => {
                let period_start = workspace_period(*member_cap, now);
                let usable = |g: &&Grant| g.usable(GrantKind::Credits, feature, now);
                let held: Credits = pool.map_or(0, |p| {
                    unexpired(&p.grants, now)
                        .1
                        .iter()
                        .filter(usable)
                        .map(|g| g.balance)
                        .sum()
                });
                let cap_left = member_cap.map(|c| {
                    c.credits
                        .saturating_sub(state.workspace_used(index, period_start))
                });
                let spendable = cap_left.map_or(held, |c| c.min(held));
                let coverable = spendable.checked_div(price).unwrap_or(left);
                let give = coverable.min(left);
                report.pool_credits = Some(held);
                report.cap_left = cap_left;
                report.available_credits = Some(spendable);
                report.available_units = coverable;
                report.gave_units = give;
                report.gave_credits = give * price;
                if let (Some(cap), Some(c)) = (member_cap, cap_left)
                    && c < held
                    && give == coverable
                {
                    // The cap, not the pool, is what runs out: it is whole again next period.
                    report.reset_at = Some(cap.bounds(now).1);
                }
                if price == 0 {
                    if give > 0 {
                        decision.draws.push(Draw::new(idx, Pool::NoCharge, give, 0));
                    }
                } else if let Some(pool) = pool {
                    let mut owed = give * price;
                    let first = decision.draws.len();
                    let (skipped, grants) = unexpired(&pool.grants, now);
                    for (i, grant) in grants.iter().enumerate() {
                        if owed == 0 {
                            break;
                        }
                        if !usable(&grant) {
                            continue;
                        }
                        let take = grant.balance.min(owed);
                        if take == 0 {
                            continue;
                        }
                        owed -= take;
                        decision.draws.push(Draw {
                            layer: idx,
                            slot: (skipped + i) as u32,
                            pool: Pool::Workspace {
                                grant_id: grant.id,
                                period_start,
                            },
                            units: 0,
                            credits: take,
                        });
                    }
                    debug_assert_eq!(owed, 0, "the pool held less than it reported");
                    attribute_units(&mut decision.draws[first..], give, price);
                }
                left -= give;
            }
            LayerKind::Enterprise { postpaid: true } => {
                report.available_units = left;
                report.gave_units = left;
                report.gave_credits = left * price;
                if left > 0 {
                    decision
                        .draws
                        .push(Draw::new(idx, Pool::Postpaid, left, left * price));
                }
                left = 0;
            }
            kind => {
                let Some(grant_kind) = kind.grant_kind() else {
                    continue;
                };
                // One pass over the grants: what they hold (for the report) and, in spend
                // order, the draws paying for all that is left. When they cannot pay it all,
                // what was drawn beyond whole units is given back below.
                let wanted = left.saturating_mul(price);
                let mut owed = wanted;
                let mut held: Credits = 0;
                let first = decision.draws.len();
                let (skipped, grants) = unexpired(&state.grants, now);
                for (i, grant) in grants.iter().enumerate() {
                    if !grant.usable(grant_kind, feature, now) {
                        continue;
                    }
                    let room = state.capped(LeasePool::Grant(grant.id), grant.balance, caps, now);
                    held += room;
                    let take = room.min(owed);
                    if take == 0 {
                        continue;
                    }
                    owed -= take;
                    if decision.draws.len() == decision.draws.capacity() {
                        // Room for a draw from every grant left, at once: many small grants
                        // grew the list five times, a heap allocation each.
                        decision.draws.reserve(grants.len() - i);
                    }
                    decision.draws.push(Draw {
                        layer: idx,
                        slot: (skipped + i) as u32,
                        pool: Pool::Grant { grant_id: grant.id },
                        units: 0,
                        credits: take,
                    });
                }
                // A free feature (price 0) is covered whole.
                let coverable = held.checked_div(price).unwrap_or(left);
                let give = coverable.min(left);
                report.available_credits = Some(held);
                report.available_units = coverable;
                report.gave_units = give;
                report.gave_credits = give * price;
                if price == 0 {
                    if give > 0 {
                        decision.draws.push(Draw::new(idx, Pool::NoCharge, give, 0));
                    }
                    left -= give;
                    decision.layers.push(report);
                    if left == 0 {
                        break;
                    }
                    continue;
                }
                // Short: the grants were drawn whole, but only whole units are given. The part
                // of a unit drawn beyond them goes back, from the last draws (as trim does).
                let mut excess = (wanted - owed) - give * price;
                while excess > 0
                    && let Some(last) = decision.draws.last_mut()
                {
                    let back = last.credits.min(excess);
                    last.credits -= back;
                    excess -= back;
                    if last.credits == 0 {
                        decision.draws.pop();
                    }
                }
                attribute_units(&mut decision.draws[first..], give, price);
                left -= give;
            }
        }
        decision.layers.push(report);
        if left == 0 {
            break;
        }
    }

    if left > 0 {
        decision.draws.clear();
        decision.denial = Some(deny_reason(plan, state, &decision, feature, left, now));
    }
    decision
}

/// Settles `credits` of `grant` that a commit debited, the commit having left the grant at
/// `committed` (its balance and version; `None` when not known, and the caller syncs the
/// balance afterwards). What is left to draw stays the committed balance minus what is still
/// unsettled, whichever commit the view's balance is of:
/// - one before this commit: the view takes this commit's balance, which counts the draw;
/// - this commit or a later one (another replica's, heard first): its balance counts the draw
///   already, and only held it back as unsettled; now it holds it back no more.
fn settle_grant(grant: &mut Grant, credits: Credits, committed: Option<(Credits, u64)>) {
    let freed = grant.unsettled.min(credits);
    grant.unsettled -= freed;
    match committed {
        Some((balance, version)) if version > grant.version => {
            grant.version = version;
            grant.balance = balance.saturating_sub(grant.unsettled);
        }
        Some(_) => grant.balance += freed,
        None => {}
    }
}

/// `grants` (in spend order) without the expired ones at their head, which no decision can draw:
/// the first priority's grants come first, earliest expiry first, so its expired grants are a
/// prefix, found by a binary search. An account keeps its expired grants (the usage API lists
/// them), and one that bought many expiring packs would otherwise walk them all on every
/// decision. Expired grants of later priorities are left to [`Grant::usable`]. With it, how
/// many were skipped: where the slice starts in `grants`.
fn unexpired(grants: &[Grant], now: Millis) -> (usize, &[Grant]) {
    let expired = |g: &Grant| g.expires_at <= now;
    match grants.first() {
        Some(first) if expired(first) => {
            let skip = grants.partition_point(|g| g.priority == first.priority && expired(g));
            (skip, &grants[skip..])
        }
        _ => (0, grants), // the usual case: nothing expired at the head, no search
    }
}

/// Spreads `units` over one grant layer's `draws` in proportion to their credits, so that each
/// draw says how many units it paid for (a unit split between two grants goes to the first).
fn attribute_units(draws: &mut [Draw], units: Units, price: Credits) {
    if price == 0 {
        if let Some(first) = draws.first_mut() {
            first.units = units;
        }
        return;
    }
    // `covered` is `paid` in units, rounded up; `bound` what that many units cost. A draw of
    // less than a unit's price moves them by at most one unit, without a division (one per
    // draw was a tenth of a 67-draw decision's time).
    let (mut paid, mut covered, mut bound): (Credits, Units, Credits) = (0, 0, 0);
    let mut given: Units = 0;
    for draw in draws {
        paid += draw.credits;
        if paid > bound {
            if paid - bound <= price {
                covered += 1;
                bound += price;
            } else {
                covered = paid.div_ceil(price);
                bound = covered.saturating_mul(price);
            }
        }
        let now_given = covered.min(units);
        draw.units = now_given - given;
        given = now_given;
    }
}

/// Decides whether waiting for the usage limits would admit the request (429 with a reset
/// time) or whether only more credits would (no point retrying).
fn deny_reason(
    plan: &Plan,
    state: &AccountState,
    decision: &Decision,
    feature: FeatureId,
    short: Units,
    now: Millis,
) -> Denial {
    let price = decision.credits_per_unit;
    // Waiting helps only if one usage-limit layer, once enough of it frees up, could cover
    // what it gives now plus the shortfall.
    let retry_at = plan
        .layers
        .iter()
        .zip(&decision.layers)
        .filter(|(_, r)| r.eligible)
        .filter_map(|(layer, report)| match &layer.kind {
            LayerKind::UsageLimit { windows } => {
                let log = state.usage_log(report.layer as usize)?;
                let needed = report.gave_units + short;
                // Strict mode: room other replicas have leased is not free before they give
                // it back or it lapses.
                let leased = state
                    .leases
                    .as_ref()
                    .and_then(|l| l.drained_until(LeasePool::Layer(report.layer), now))
                    .unwrap_or(now);
                windows
                    .iter()
                    .map(|w| log.free_at(w, needed, now))
                    .try_fold(leased, |latest, at| at.map(|at| latest.max(at)))
            }
            _ => None,
        })
        .min();
    match retry_at {
        Some(retry_at) if retry_at > now => Denial::UsageLimitReached { retry_at },
        _ => Denial::InsufficientCredits {
            needed_credits: short.saturating_mul(price),
            available_credits: state.spendable_credits(feature, now)
                + plan
                    .layers
                    .iter()
                    .zip(&decision.layers)
                    .filter(|(l, r)| r.eligible && matches!(l.kind, LayerKind::Workspace { .. }))
                    .filter_map(|(_, r)| r.available_credits)
                    .sum::<Credits>(),
        },
    }
}

/// Takes `excess` units off the end of `draws` (the most expensive pools are the last ones the
/// waterfall used, so they are refunded first) and returns what was taken off, to be given
/// back with [`release`]. A grant layer gives back exactly `units × credits_per_unit` credits,
/// from its last-drawn grants first, and its remaining units are attributed again, so that
/// every layer's draws still cost exactly their units at the price.
pub fn trim(
    draws: &mut SmallVec<[Draw; 4]>,
    mut excess: Units,
    credits_per_unit: Credits,
) -> SmallVec<[Draw; 4]> {
    let mut released: SmallVec<[Draw; 4]> = SmallVec::new();
    while excess > 0 {
        let Some(layer) = draws.last().map(|d| d.layer) else {
            break;
        };
        // The trailing run of draws from this layer.
        let start = draws
            .iter()
            .rposition(|d| d.layer != layer)
            .map_or(0, |i| i + 1);
        let run = &mut draws[start..];
        let units: Units = run.iter().map(|d| d.units).sum();
        let take = units.min(excess);
        if run.iter().any(|d| d.credits > 0) {
            let mut owed = take * credits_per_unit;
            let first_released = released.len();
            for d in run.iter_mut().rev() {
                let credits = d.credits.min(owed);
                if credits > 0 {
                    released.push(Draw {
                        units: 0,
                        credits,
                        ..*d
                    });
                    d.credits -= credits;
                    owed -= credits;
                }
            }
            attribute_units(run, units - take, credits_per_unit);
            attribute_units(&mut released[first_released..], take, credits_per_unit);
        } else {
            let mut owed = take;
            for d in run.iter_mut().rev() {
                let give = d.units.min(owed);
                if give > 0 {
                    released.push(Draw { units: give, ..*d });
                    d.units -= give;
                    owed -= give;
                }
            }
        }
        draws.retain(|d| d.units > 0 || d.credits > 0);
        excess -= take;
        if take == 0 {
            break; // only empty draws were left
        }
    }
    released
}

/// Covers as much of `extra` more units of an `ongoing` request as the account can pay now:
/// the admitted decision for the largest amount the waterfall allows (to [`reserve`]), and
/// what is left uncovered. Used when a response settles above its estimate: the request
/// already ran, so it is not denied; what nobody can pay is forgiven.
pub fn cover_up_to(
    plan: &Plan,
    state: &AccountState,
    ongoing: Ongoing,
    extra: Units,
    now: Millis,
) -> (Option<Decision>, Units) {
    cover_up_to_in(plan, state, None, ongoing, extra, now)
}

/// [`cover_up_to`] for a member of a workspace whose state is `pool` (see [`decide_in`]).
pub fn cover_up_to_in(
    plan: &Plan,
    state: &AccountState,
    pool: Option<&AccountState>,
    ongoing: Ongoing,
    extra: Units,
    now: Millis,
) -> (Option<Decision>, Units) {
    let decide = |units| extend_in(plan, state, pool, ongoing, units, now);
    let full = decide(extra);
    if full.admitted() {
        return (Some(full), 0);
    }
    // Admission is monotone in units: search the largest amount admitted.
    let (mut lo, mut hi) = (0, extra);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if decide(mid).admitted() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if lo == 0 {
        return (None, extra);
    }
    (Some(decide(lo)), extra - lo)
}

/// Decides how `extra` more units of an `ongoing` request are covered, all or nothing (a
/// watched stream that must stop when the account cannot pay for what comes next). Like
/// [`decide_in`], but at the request's price version and without a concurrency gate.
pub fn extend_in(
    plan: &Plan,
    state: &AccountState,
    pool: Option<&AccountState>,
    ongoing: Ongoing,
    extra: Units,
    now: Millis,
) -> Decision {
    walk(
        plan,
        state,
        pool,
        Start::More(ongoing),
        extra,
        now,
        Caps::Leased,
    )
}

/// Applies an admitted decision's draws to the state: the hold.
pub fn reserve(plan: &Plan, state: &mut AccountState, decision: &Decision, now: Millis) {
    reserve_in(plan, state, None, decision, now);
}

/// [`reserve`] for a member of a workspace whose state is `pool`: draws from the pool's grants
/// are taken there, and counted against the member's cap in `state`.
pub fn reserve_in(
    plan: &Plan,
    state: &mut AccountState,
    pool: Option<&mut AccountState>,
    decision: &Decision,
    now: Millis,
) {
    debug_assert!(decision.admitted());
    apply_draws(plan, state, pool, &decision.draws, now, Direction::Take);
}

/// Gives `draws` back to exactly the pools that paid them (a released hold, a refund).
pub fn release(plan: &Plan, state: &mut AccountState, draws: &[Draw], now: Millis) {
    release_in(plan, state, None, draws, now);
}

/// [`release`] for a member of a workspace whose state is `pool`.
pub fn release_in(
    plan: &Plan,
    state: &mut AccountState,
    pool: Option<&mut AccountState>,
    draws: &[Draw],
    now: Millis,
) {
    apply_draws(plan, state, pool, draws, now, Direction::Give);
}

/// Applies `draws` in `dir`. Most draws are a grant's, of an account that leases nothing: they
/// go straight to their grant in a loop of their own, without the lease bookkeeping and the
/// layer lookup the other pools need.
#[inline(always)]
fn apply_draws(
    plan: &Plan,
    state: &mut AccountState,
    mut pool: Option<&mut AccountState>,
    draws: &[Draw],
    now: Millis,
    dir: Direction,
) {
    let mut hints = (0, 0);
    if state.leases.is_none() {
        for draw in draws {
            if let Pool::Grant { grant_id } = &draw.pool {
                apply_grant(&mut state.grants, *grant_id, draw, dir, &mut hints.0);
            } else {
                apply_draw(plan, state, pool.as_deref_mut(), draw, now, dir, &mut hints);
            }
        }
    } else {
        for draw in draws {
            apply_draw(plan, state, pool.as_deref_mut(), draw, now, dir, &mut hints);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Take,
    Give,
}

/// A grant is looked for first where the decision found it (the draw's `slot`). Failing that
/// (a draw read back from the store, or grants added since), the search starts at `hints`:
/// where the previous draw's grant was. A decision draws grants in spend order, the order
/// `state.grants` keeps, so the next one is found a step or two further on and a draw over
/// many grants costs linear, not quadratic, time.
///
/// Inlined into the loops of [`apply_draws`]: a call per draw, saving and
/// restoring the registers of every branch, was a sixth of a typical decision's instructions.
#[inline(always)]
fn apply_draw(
    plan: &Plan,
    state: &mut AccountState,
    pool: Option<&mut AccountState>,
    draw: &Draw,
    now: Millis,
    dir: Direction,
    hints: &mut (usize, usize),
) {
    if let Some(leases) = &mut state.leases
        && let Some(pool) = draw.lease_pool()
    {
        match dir {
            Direction::Take => leases.take(pool, draw.lease_amount(), now),
            Direction::Give => leases.give(pool, draw.lease_amount()),
        }
    }
    match (&draw.pool, state.layers.get_mut(draw.layer as usize)) {
        (Pool::Window { minute }, Some(LayerState::UsageLimit { log })) => match dir {
            Direction::Take => {
                log.add(*minute, draw.units, draw.units);
                log.prune(plan.longest_window_minutes(), now);
            }
            Direction::Give => log.remove(*minute, draw.units, draw.units),
        },
        (
            Pool::FreeTier { period_start: p },
            Some(LayerState::FreeTier {
                period_start,
                period_end,
                used,
                unsettled,
            }),
        ) => {
            match dir {
                Direction::Take => {
                    if *period_start != *p {
                        *period_start = *p;
                        *period_end = plan.period_end(draw.layer, *p);
                        *used = 0;
                        *unsettled = 0;
                    }
                    *used += draw.units;
                    *unsettled += draw.units;
                }
                // A hold released after its period ended has nothing left to give back.
                Direction::Give if *period_start == *p => {
                    *used = used.saturating_sub(draw.units);
                    *unsettled = unsettled.saturating_sub(draw.units);
                }
                Direction::Give => {}
            }
        }
        (Pool::Grant { grant_id }, _) => {
            apply_grant(&mut state.grants, *grant_id, draw, dir, &mut hints.0);
        }
        (
            Pool::Workspace {
                grant_id,
                period_start: p,
            },
            layer,
        ) => {
            if let Some(LayerState::WorkspaceUse {
                period_start,
                used,
                unsettled,
            }) = layer
            {
                match dir {
                    Direction::Take => {
                        if *period_start != *p {
                            *period_start = *p;
                            *used = 0;
                            *unsettled = 0;
                        }
                        *used += draw.credits;
                        *unsettled += draw.credits;
                    }
                    // A hold released after its period ended has no cap left to give back.
                    Direction::Give if *period_start == *p => {
                        *used = used.saturating_sub(draw.credits);
                        *unsettled = unsettled.saturating_sub(draw.credits);
                    }
                    Direction::Give => {}
                }
            }
            if let Some(pool) = pool {
                apply_grant(&mut pool.grants, *grant_id, draw, dir, &mut hints.1);
            }
        }
        _ => {}
    }
}

fn apply_grant(grants: &mut [Grant], grant_id: i64, draw: &Draw, dir: Direction, hint: &mut usize) {
    let slot = draw.slot as usize;
    if let Some(grant) = grants.get_mut(slot)
        && grant.id == grant_id
    {
        *hint = slot + 1;
        move_credits(grant, draw.credits, dir);
        return;
    }
    let start = (*hint).min(grants.len());
    let (before, after) = grants.split_at(start);
    let found = match after.iter().position(|g| g.id == grant_id) {
        Some(i) => start + i,
        None => match before.iter().position(|g| g.id == grant_id) {
            Some(i) => i,
            None => return,
        },
    };
    *hint = found + 1;
    if let Some(grant) = grants.get_mut(found) {
        move_credits(grant, draw.credits, dir);
    }
}

/// Takes `credits` from `grant` into its unsettled hold, or gives them back.
#[inline(always)]
fn move_credits(grant: &mut Grant, credits: Credits, dir: Direction) {
    match dir {
        Direction::Take => {
            debug_assert!(grant.balance >= credits, "overdrawn grant");
            grant.balance = grant.balance.saturating_sub(credits);
            grant.unsettled += credits;
        }
        Direction::Give => {
            grant.balance += credits;
            grant.unsettled = grant.unsettled.saturating_sub(credits);
        }
    }
}

#[cfg(test)]
mod tests;
