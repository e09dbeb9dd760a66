//! The cached view of accounts: what the hot path decides against, without the store.
//!
//! Each [`Account`] holds its waterfall state behind a `parking_lot::Mutex`. The lock is held
//! only for a decision and its hold (microseconds, no `.await` inside), never across the
//! upstream call: that is what lets one account's concurrent requests see each other's holds
//! immediately, so that nobody is admitted on numbers another request has already spent.
//!
//! The view is built from the store on start-up ([`Accounts::load`]): balances from grants,
//! window and free-tier usage from recent monetization events. There is no eviction: an evicted
//! account would lose its in-flight holds, so the cache must hold every active account.
//!
//! After that the store stays the truth and the view follows it, whoever wrote: an account
//! change (the admin API's, here or on another replica) is applied by re-reading the account
//! ([`Accounts::refresh`]); another replica's ledger commits arrive as numbers
//! ([`Accounts::apply`]); after a lost listener everything is re-read ([`Accounts::resync`]).
//! A re-read holds [`Accounts::reread_lock`] from its read to its update, alone, so that
//! nothing applies a read older than one already applied. The ledger writer (from its commit to
//! the view's update) and the replica follower hold [`Accounts::apply_lock`], shared: they may
//! run together, because each balance carries its commit's version and a draw is settled with
//! the balance of the commit that debited it (`AccountState::settled_in`), so whichever lands
//! first the view ends at the newest balance.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::Settings;
use crate::ids::AccountId;
use crate::store::{
    ApiKeyRow, GrantBalance, LedgerChange, ReadMark, Store, StoreError, StoredGrant,
};
use crate::waterfall::{self, AccountState, Credits, Draw, Grant, Millis, Plan};

/// One account in the cached view.
#[derive(Debug)]
pub struct Account {
    /// Its id.
    pub id: AccountId,
    /// Its plan.
    pub plan: Arc<Plan>,
    /// Whether its requests are refused.
    pub suspended: bool,
    /// Whether its requests run in shadow mode (decided and recorded, never blocked or
    /// charged: `crate::gateway::meter`).
    pub shadow: bool,
    /// Windows, free tier and grants, with every hold already applied. Shared with the
    /// account's successors ([`Accounts::change`]), so that a hold taken before a change of plan
    /// or suspension ends on the state the account has now.
    state: Arc<Mutex<AccountState>>,
    /// Its workspace, if a member of one. Boxed: most accounts are in none, and inline it
    /// would cost each of them 32 bytes (docs/BENCHMARKS.md, memory).
    membership: Option<Box<Membership>>,
}

/// A member's workspace and the link to its pool.
#[derive(Debug)]
struct Membership {
    /// The workspace whose pool the plan's `workspace` layers draw.
    workspace: AccountId,
    /// The workspace account's state (its grants are the pool), linked by
    /// [`Accounts::link_workspaces`] once the workspace is in the view. Shared, never a copy.
    pool: parking_lot::RwLock<Option<Arc<Mutex<AccountState>>>>,
}

impl Membership {
    fn of(workspace: Option<AccountId>) -> Option<Box<Membership>> {
        workspace.map(|workspace| {
            Box::new(Membership {
                workspace,
                pool: parking_lot::RwLock::new(None),
            })
        })
    }
}

impl Account {
    /// A new account with the given state.
    pub fn new(id: AccountId, plan: Arc<Plan>, suspended: bool, state: AccountState) -> Account {
        Account {
            id,
            plan,
            suspended,
            shadow: false,
            state: Arc::new(Mutex::new(state)),
            membership: None,
        }
    }

    /// The workspace whose pool the plan's `workspace` layers draw, if a member of one.
    pub fn workspace(&self) -> Option<&AccountId> {
        self.membership.as_ref().map(|m| &m.workspace)
    }

    /// The account with its own shadow mode on or off.
    #[must_use]
    pub fn shadowed(mut self, shadow: bool) -> Account {
        self.shadow = shadow;
        self
    }

    /// The account as a member of `workspace` (its pool is linked once both are in the view).
    #[must_use]
    pub fn in_workspace(mut self, workspace: Option<AccountId>) -> Account {
        self.membership = Membership::of(workspace);
        self
    }

    /// Runs `f` on the state under the account's lock. `f` must not block.
    pub fn with_state<R>(&self, f: impl FnOnce(&Plan, &mut AccountState) -> R) -> R {
        f(&self.plan, &mut self.state.lock())
    }

    /// Runs `f` on the state and, for a member of a workspace, on the workspace's state (the
    /// pool), both locked: the member's first, then the workspace's (the lock order: a
    /// workspace has no workspace, so no thread ever waits the other way round). `f` must not
    /// block.
    pub fn with_states<R>(
        &self,
        f: impl FnOnce(&Plan, &mut AccountState, Option<&mut AccountState>) -> R,
    ) -> R {
        let pool = self.membership.as_ref().and_then(|m| m.pool.read().clone());
        let mut state = self.state.lock();
        match pool {
            Some(pool) if !Arc::ptr_eq(&pool, &self.state) => {
                f(&self.plan, &mut state, Some(&mut pool.lock()))
            }
            _ => f(&self.plan, &mut state, None),
        }
    }

    /// Whether the account is linked to its workspace's pool.
    pub fn has_pool(&self) -> bool {
        self.membership
            .as_ref()
            .is_some_and(|m| m.pool.read().is_some())
    }
}

/// The first 128 bits of an API key's SHA-256 digest: what the view finds a key's account by.
/// Half the digest is as safe a name as all of it (presenting another account's key means a
/// second preimage of 128 bits, 2^108 work against a million keys) and saves 34 bytes an
/// account in a million-account view (docs/BENCHMARKS.md).
type KeyDigest = [u8; 16];

/// [`KeyDigest`] of a full SHA-256 digest.
fn truncated(full: &[u8; 32]) -> KeyDigest {
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&full[..16]);
    digest
}

/// An account as the map by id holds it: the key is the account itself, found by its id (a
/// separate id key would be 16 bytes more per slot, ~35 an account at a million).
#[derive(Clone)]
struct ById(Arc<Account>);

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that a lookup by `&str` finds it (`Borrow`'s contract).
        self.0.id.as_str().hash(state);
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &ById) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl std::borrow::Borrow<str> for ById {
    fn borrow(&self) -> &str {
        self.0.id.as_str()
    }
}

/// The cached view: accounts by id and by API-key hash.
#[derive(Clone)]
pub struct Accounts {
    /// By id. A sharded map, not a cache: an account is never evicted (its holds live in it),
    /// and a cache's per-entry bookkeeping (moka's is ~300 bytes) would be a third of a
    /// million-account view's memory. A lookup holds one shard's read lock for the clone.
    by_id: Arc<dashmap::DashMap<ById, ()>>,
    /// By the key's [`KeyDigest`], held as bytes (looked up without formatting hex per
    /// request). A plain map: keys are never evicted, and moka's
    /// per-entry bookkeeping (~300 bytes) would be most of a million-account view's memory.
    /// Readers hold the lock only for the lookup; writers are the admin API's key creation.
    by_key_hash: Arc<parking_lot::RwLock<HashMap<KeyDigest, AccountId>>>,
    /// Written by re-reads, read by the ledger writer and the replica follower (see the module).
    sync: Arc<tokio::sync::RwLock<()>>,
    /// The configuration whose plans the view's accounts are on (`None`: a view built by hand,
    /// which never re-reads the store). Replaced only under [`Accounts::reread_lock`], so that
    /// no re-read applies an account on a plan of a configuration that was replaced meanwhile.
    settings: Arc<parking_lot::RwLock<Option<Arc<Settings>>>>,
    /// Which announced commits the view's last reads already include (see [`Marks`]).
    marks: Arc<Mutex<Marks>>,
}

/// Where the view's reads stand among other replicas' announced commits. A listener hears
/// every commit from the moment it listens, and a re-read made after that may include some of
/// them: without this, their usage would be counted twice (the re-read's, then the notice's).
#[derive(Debug, Default)]
struct Marks {
    /// The last whole re-read's (load, resync, reconfigure).
    view: Option<ReadMark>,
    /// Accounts whose usage was re-read on their own since then ([`Accounts::refresh`]).
    accounts: HashMap<AccountId, ReadMark>,
}

impl Marks {
    /// Whether `account`'s numbers as the view has them already include transaction `xid`.
    fn includes(&self, account: &str, xid: u64) -> bool {
        self.view.as_ref().is_some_and(|m| m.includes(xid))
            || self.accounts.get(account).is_some_and(|m| m.includes(xid))
    }
}

impl Default for Accounts {
    fn default() -> Self {
        Accounts::new()
    }
}

impl Accounts {
    /// An empty view.
    pub fn new() -> Accounts {
        Accounts {
            by_id: Arc::default(),
            by_key_hash: Arc::default(),
            sync: Arc::default(),
            settings: Arc::default(),
            marks: Arc::default(),
        }
    }

    fn settings(&self) -> Option<Arc<Settings>> {
        self.settings.read().clone()
    }

    /// Held alone by a re-read ([`Accounts::refresh`], [`Accounts::resync`],
    /// [`Accounts::reconfigure`]) from its read of the store to its update of the view. Never
    /// held by the hot path.
    async fn reread_lock(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.sync.write().await
    }

    /// Keeps re-reads out, and no one else: the ledger writer holds it from a commit to the
    /// view's update (a re-read between the two would miss usage neither committed in what it
    /// read nor unsettled any more), the replica follower while it applies the notices queued
    /// ([`Accounts::apply`]). The two hold it at once: the writer's store commit, which on
    /// PostgreSQL waits for grant rows other replicas hold, never delays what they announce.
    /// Never held by the hot path.
    pub async fn apply_lock(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.sync.read().await
    }

    /// Adds or replaces an account.
    pub fn insert(&self, account: Account) {
        self.put(Arc::new(account));
    }

    /// Adds `account`, or replaces the account with its id (the key too: it is the account).
    fn put(&self, account: Arc<Account>) {
        match self.by_id.entry(ById(account)) {
            dashmap::Entry::Occupied(e) => drop(e.replace_entry(())),
            dashmap::Entry::Vacant(e) => drop(e.insert(())),
        }
    }

    /// Maps an API-key hash (SHA-256, hex, as stored) to an account.
    pub fn insert_key(&self, key_hash: &str, account: AccountId) {
        if let Some(digest) = digest_of(key_hash, &account) {
            self.by_key_hash.write().insert(digest, account);
        }
    }

    /// The account with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Account>> {
        self.by_id.get(id).map(|a| a.key().0.clone())
    }

    /// The account that owns this API key.
    pub fn by_api_key(&self, key: &str) -> Option<Arc<Account>> {
        use sha2::Digest;
        let full: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
        let id = self.by_key_hash.read().get(&truncated(&full)).cloned();
        id.and_then(|id| self.get(&id))
    }

    /// Number of accounts in the view.
    pub fn len(&self) -> u64 {
        self.by_id.len() as u64
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives `draws` back to the account's pools (a hold ended without a charge, or the store
    /// found a charge to be a duplicate).
    pub fn release(&self, id: &str, draws: &[Draw], now: Millis) {
        if draws.is_empty() {
            return;
        }
        if let Some(account) = self.get(id) {
            account.with_states(|plan, state, pool| {
                waterfall::release_in(plan, state, pool, draws, now)
            });
        }
    }

    /// Marks an entry's draws as debited by the store (a member's draws from its workspace's
    /// grants on the workspace's state). `committed` says what the commit left in a grant, its
    /// balance and version, where known (see [`AccountState::settled_in`]).
    pub fn settled(
        &self,
        id: &str,
        draws: &[Draw],
        committed: impl Fn(i64) -> Option<(Credits, u64)>,
    ) {
        if let Some(account) = self.get(id) {
            account.with_states(|_, state, pool| state.settled_in(pool, draws, committed));
        }
    }

    /// Links every member account to its workspace's state (after a load, a refresh or a
    /// resync added accounts). A workspace missing from the view leaves its members unlinked:
    /// their workspace layers have nothing to give.
    pub fn link_workspaces(&self) {
        // Members only (the others have nothing to link), collected first: linking looks
        // accounts up, and a shard's read lock taken again while iterating could wait behind a
        // writer queued on it.
        let members: Vec<Arc<Account>> = self
            .by_id
            .iter()
            .filter(|a| a.key().0.membership.is_some())
            .map(|a| a.key().0.clone())
            .collect();
        for account in members {
            self.link(&account);
        }
    }

    fn link(&self, account: &Account) {
        let Some(membership) = &account.membership else {
            return;
        };
        let ws = &membership.workspace;
        let pool = self
            .get(ws)
            .filter(|w| w.membership.is_none() && w.id != account.id)
            .map(|w| w.state.clone());
        if pool.is_none() {
            tracing::warn!(account = %account.id, workspace = %ws, "workspace not in the view; its pool is not drawn");
        }
        *membership.pool.write() = pool;
    }

    /// Takes the store's committed balances as the truth (see [`AccountState::sync_grant`]).
    /// Returns the accounts that have grants the view does not know yet.
    pub fn sync_balances(&self, balances: &[GrantBalance]) -> Vec<String> {
        let mut unknown: Vec<String> = Vec::new();
        for b in balances {
            if let Some(account) = self.get(&b.account) {
                let known = account
                    .with_state(|_, state| state.sync_grant(b.grant_id, b.balance, b.version));
                if !known && !unknown.contains(&b.account) {
                    unknown.push(b.account.clone());
                }
            }
        }
        unknown
    }

    /// Applies a refund the store has made: windows and free tier get the charge's units back,
    /// grants take the store's new balances.
    pub fn refunded(&self, id: &str, draws: &[Draw], balances: &[GrantBalance]) {
        if let Some(account) = self.get(id) {
            account.with_state(|_, state| {
                for draw in draws {
                    state.unobserve(draw);
                }
            });
        }
        let _ = self.sync_balances(balances);
    }

    /// Builds the view from the store: every account, its grants' balances, and the usage
    /// still inside its windows and free-tier period at `now`.
    pub async fn load(
        store: &Store,
        settings: &Arc<Settings>,
        now: Millis,
    ) -> Result<Accounts, StoreError> {
        let accounts = Accounts::new();
        *accounts.settings.write() = Some(settings.clone());
        let since = history_since(settings, now);
        let read = store.read_view(since).await?;
        accounts.marks.lock().view = read.mark;
        let mut loaded = Vec::new();
        for stored in read.accounts {
            let Some(plan) = settings.plans.get(&stored.plan) else {
                tracing::error!(account = %stored.id, plan = %stored.plan, "account's plan is not in the config; its requests will be refused");
                continue;
            };
            let grants = stored
                .grants
                .iter()
                .map(|g| grant_of(settings, g))
                .collect();
            let id: AccountId = stored.id.as_str().into();
            for hash in &stored.key_hashes {
                accounts.insert_key(hash, id.clone());
            }
            let state = AccountState::new(plan, grants, now);
            loaded.push(id.clone());
            accounts.insert(
                Account::new(id, plan.clone(), stored.suspended, state)
                    .shadowed(stored.shadow)
                    .in_workspace(stored.workspace.as_deref().map(AccountId::from)),
            );
        }
        accounts.link_workspaces();
        for (account, draws) in read.draws {
            if let Some(a) = accounts.get(&account) {
                a.with_state(|plan, state| {
                    for draw in &draws {
                        state.observe(plan, draw, now);
                    }
                });
            }
        }
        tracing::info!(
            accounts = loaded.len(),
            "account view loaded from the store"
        );
        Ok(accounts)
    }
}

impl Accounts {
    /// Changes an account's plan, suspension or shadow mode in the view; `false` if the view
    /// lacks it.
    ///
    /// The account is replaced by a successor sharing its state (see [`Account`]): grants, and
    /// the holds of requests in flight, carry over. When the new plan keeps its state
    /// differently ([`Plan::same_state_layout`]), the usage-limit and free-tier state is rebuilt
    /// for it from `history` (the account's committed draws since [`history_start`] of the new
    /// plan), as a restart would rebuild it. The swap happens under the account's lock; a
    /// request that identified the account just before it decides once more under the old plan.
    pub fn change(
        &self,
        id: &str,
        plan: Arc<Plan>,
        (suspended, shadow): (bool, bool),
        history: &[Draw],
        now: Millis,
    ) -> bool {
        let Some(old) = self.get(id) else {
            return false;
        };
        let mut state = old.state.lock();
        if !old.plan.same_state_layout(&plan) {
            state.layers = AccountState::new(&plan, Vec::new(), now).layers;
            for draw in history {
                state.observe(&plan, draw, now);
            }
            // Slices of the old layers mean nothing now; the writer gives their leases back.
            if state.leases.is_some() {
                state.leases = Some(Default::default());
            }
        }
        // Strict mode follows the plan: a plan that became strict leases at its first request,
        // one that no longer is gives its leases back (`crate::strict`).
        match (plan.strict, state.leases.is_some()) {
            (true, false) => state.leases = Some(Default::default()),
            (false, true) => state.leases = None,
            _ => {}
        }
        self.put(Arc::new(Account {
            id: old.id.clone(),
            plan,
            suspended,
            shadow,
            state: old.state.clone(),
            membership: old.membership.as_ref().map(|m| {
                Box::new(Membership {
                    workspace: m.workspace.clone(),
                    pool: parking_lot::RwLock::new(m.pool.read().clone()),
                })
            }),
        }));
        drop(state);
        true
    }
}

/// The [`KeyDigest`] of a stored API-key hash. A hash that is not 64 hex digits cannot match any
/// key: it is logged and skipped.
fn digest_of(key_hash: &str, account: &str) -> Option<KeyDigest> {
    let mut digest = [0u8; 32];
    match hex::decode_to_slice(key_hash, &mut digest) {
        Ok(()) => Some(truncated(&digest)),
        Err(e) => {
            tracing::error!(%account, error = %e, "stored API-key hash is not SHA-256 hex; key ignored");
            None
        }
    }
}

impl Accounts {
    /// Makes the view's copy of account `id` what the store has now: its plan and suspension,
    /// its live API keys (revoked ones stop identifying it), its grants and their balances. The
    /// one way an account change reaches the view, on the replica that made it and on every
    /// other (see the module).
    pub async fn refresh(&self, store: &Store, id: &str, now: Millis) -> Result<(), StoreError> {
        let _sync = self.reread_lock().await;
        let Some(settings) = self.settings() else {
            return Ok(());
        };
        let settings = &*settings;
        let Some(row) = store.account(id).await? else {
            return Ok(());
        };
        let keys = store.api_keys(id).await?;
        let grants = store.grants(id).await?;
        self.apply_keys(id, &keys);
        let Some(plan) = settings.plans.get(&row.plan) else {
            tracing::warn!(account = %id, plan = %row.plan, "account's plan is not in the config; its requests are refused");
            return Ok(());
        };
        let current = self.get(id);
        let history = match &current {
            Some(a) if a.plan.same_state_layout(plan) => Vec::new(),
            _ => {
                let (draws, mark) = store.account_history(id, history_start(plan, now)).await?;
                if let Some(mark) = mark {
                    self.marks.lock().accounts.insert(id.into(), mark);
                }
                draws
            }
        };
        let workspace = row.workspace.as_deref().map(AccountId::from);
        match current {
            Some(a) => {
                if !Arc::ptr_eq(&a.plan, plan)
                    || a.suspended != row.suspended
                    || a.shadow != row.shadow
                {
                    let flags = (row.suspended, row.shadow);
                    self.change(id, plan.clone(), flags, &history, now);
                }
                a.with_state(|_, state| merge_grants(settings, state, &grants));
                self.set_workspace(id, workspace);
            }
            None => {
                let grants = grants.iter().map(|g| grant_of(settings, g)).collect();
                let mut state = AccountState::new(plan, grants, now);
                for draw in &history {
                    state.observe(plan, draw, now);
                }
                self.insert(
                    Account::new(id.into(), plan.clone(), row.suspended, state)
                        .shadowed(row.shadow)
                        .in_workspace(workspace),
                );
                // Members may have waited for this workspace.
                self.link_workspaces();
            }
        }
        Ok(())
    }

    /// Makes `id` a member of `workspace` (or of none) and links it to the pool. A member that
    /// changes workspace keeps its state; holds on the old pool end there only if they end
    /// before this (a rare operator change: they are released on the new pool, saturating).
    fn set_workspace(&self, id: &str, workspace: Option<AccountId>) {
        let Some(current) = self.get(id) else {
            return;
        };
        if current.workspace() != workspace.as_ref() {
            let next = Account {
                id: current.id.clone(),
                plan: current.plan.clone(),
                suspended: current.suspended,
                shadow: current.shadow,
                state: current.state.clone(),
                membership: Membership::of(workspace),
            };
            self.link(&next);
            self.put(Arc::new(next));
        } else {
            self.link(&current);
        }
    }

    /// Maps the live keys of `id` to it and forgets its revoked ones.
    fn apply_keys(&self, id: &str, keys: &[ApiKeyRow]) {
        let mut map = self.by_key_hash.write();
        for key in keys {
            let Some(digest) = digest_of(&key.key_hash, id) else {
                continue;
            };
            if key.revoked_at.is_none() {
                map.insert(digest, id.into());
            } else if map.get(&digest).is_some_and(|owner| &**owner == id) {
                map.remove(&digest);
            }
        }
    }

    /// Applies another replica's ledger commit: its window and free-tier usage counts here too,
    /// a refund's usage no longer does, and grants take their committed balances. A commit an
    /// account's last re-read already included is skipped for it. Returns the accounts with
    /// grants the view lacks (to [`Accounts::refresh`]). Call it under [`Accounts::apply_lock`],
    /// so that no re-read lands between the check and the change.
    pub fn apply(&self, change: &LedgerChange, now: Millis) -> Vec<String> {
        let marks = self.marks.lock();
        let new = |account: &str| !marks.includes(account, change.xid);
        for (id, draw) in change.used.iter().filter(|(id, _)| new(id)) {
            if let Some(a) = self.get(id) {
                a.with_state(|plan, state| state.observe(plan, draw, now));
            }
        }
        for (id, draw) in change.refunded.iter().filter(|(id, _)| new(id)) {
            if let Some(a) = self.get(id) {
                a.with_state(|_, state| state.unobserve(draw));
            }
        }
        let balances: Vec<GrantBalance> = change
            .balances
            .iter()
            .filter(|b| new(&b.account))
            .cloned()
            .collect();
        self.sync_balances(&balances)
    }

    /// Re-reads everything from the store, as after a lost listener: accounts, keys, grants with
    /// their balances, and each account's windows and free tier as committed by every replica
    /// plus what this gateway still holds unsettled.
    pub async fn resync(&self, store: &Store, now: Millis) -> Result<(), StoreError> {
        let _sync = self.reread_lock().await;
        let Some(settings) = self.settings() else {
            return Ok(());
        };
        let stored = Stored::read(store, &settings, now).await?;
        self.apply_stored(&stored, &settings, now);
        Ok(())
    }

    /// Moves the view to a new configuration (a reload): as [`Accounts::resync`], with every
    /// account put on its plan's new version and every grant's features numbered anew. On an
    /// error nothing has changed.
    pub async fn reconfigure(
        &self,
        store: &Store,
        settings: Arc<Settings>,
        now: Millis,
    ) -> Result<(), StoreError> {
        let _sync = self.reread_lock().await;
        let stored = Stored::read(store, &settings, now).await?;
        *self.settings.write() = Some(settings.clone());
        self.apply_stored(&stored, &settings, now);
        Ok(())
    }

    /// Makes the view what `stored` says, keeping this gateway's unsettled holds.
    fn apply_stored(&self, stored: &Stored, settings: &Settings, now: Millis) {
        *self.marks.lock() = Marks {
            view: stored.mark.clone(),
            accounts: HashMap::new(),
        };
        let mut keys =
            HashMap::with_capacity(stored.accounts.iter().map(|a| a.key_hashes.len()).sum());
        for a in &stored.accounts {
            for hash in &a.key_hashes {
                if let Some(digest) = digest_of(hash, &a.id) {
                    keys.insert(digest, AccountId::from(a.id.as_str()));
                }
            }
        }
        *self.by_key_hash.write() = keys;
        for a in &stored.accounts {
            let Some(plan) = settings.plans.get(&a.plan) else {
                continue;
            };
            let committed = stored.draws.get(&a.id).map_or(&[][..], Vec::as_slice);
            match self.get(&a.id) {
                Some(current) => {
                    if !Arc::ptr_eq(&current.plan, plan)
                        || current.suspended != a.suspended
                        || current.shadow != a.shadow
                    {
                        let flags = (a.suspended, a.shadow);
                        self.change(&a.id, plan.clone(), flags, committed, now);
                    }
                    if let Some(current) = self.get(&a.id) {
                        current.with_state(|plan, state| {
                            merge_grants(settings, state, &a.grants);
                            state.resync_usage(plan, committed, now);
                        });
                    }
                    self.set_workspace(&a.id, a.workspace.as_deref().map(AccountId::from));
                }
                None => {
                    let grants = a.grants.iter().map(|g| grant_of(settings, g)).collect();
                    let mut state = AccountState::new(plan, grants, now);
                    state.resync_usage(plan, committed, now);
                    self.insert(
                        Account::new(a.id.as_str().into(), plan.clone(), a.suspended, state)
                            .shadowed(a.shadow)
                            .in_workspace(a.workspace.as_deref().map(AccountId::from)),
                    );
                }
            }
        }
        self.link_workspaces();
        tracing::info!(
            accounts = stored.accounts.len(),
            "account view re-read from the store"
        );
    }
}

/// Everything the view is built from, as read from the store.
struct Stored {
    accounts: Vec<crate::store::StoredAccount>,
    /// Committed draws still inside some plan's windows or free-tier period, by account.
    draws: HashMap<String, Vec<Draw>>,
    /// Which announced commits the read includes.
    mark: Option<ReadMark>,
}

impl Stored {
    async fn read(store: &Store, settings: &Settings, now: Millis) -> Result<Stored, StoreError> {
        let read = store.read_view(history_since(settings, now)).await?;
        let mut draws: HashMap<String, Vec<Draw>> = HashMap::new();
        for (account, d) in read.draws {
            draws.entry(account).or_default().extend(d);
        }
        Ok(Stored {
            accounts: read.accounts,
            draws,
            mark: read.mark,
        })
    }
}

/// Adds the stored grants the state lacks, takes every stored balance as committed, and each
/// grant's features as the config (maybe reloaded) numbers them.
fn merge_grants(settings: &Settings, state: &mut AccountState, stored: &[StoredGrant]) {
    for g in stored {
        if state.sync_grant(g.id, g.balance, Some(g.version)) {
            state.set_grant_features(g.id, settings.feature_set(g.features.as_deref()));
        } else {
            state.add_grant(grant_of(settings, g));
        }
    }
}

/// The earliest instant whose usage counts for any configured plan at `now`.
fn history_since(settings: &Settings, now: Millis) -> Millis {
    settings
        .plans
        .values()
        .map(|p| history_start(p, now))
        .min()
        .unwrap_or(now)
}

/// The engine's grant for a stored one.
pub fn grant_of(settings: &Settings, g: &StoredGrant) -> Grant {
    Grant {
        id: g.id,
        kind: g.kind,
        balance: g.balance,
        unsettled: 0,
        version: g.version,
        expires_at: g.expires_at.unwrap_or(waterfall::NEVER),
        priority: g.priority,
        features: settings.feature_set(g.features.as_deref()),
    }
}

/// The earliest instant whose usage still counts for `plan` at `now`.
pub fn history_start(plan: &Plan, now: Millis) -> Millis {
    plan.layers
        .iter()
        .map(|l| match &l.kind {
            waterfall::LayerKind::UsageLimit { windows } => {
                windows.iter().map(|w| w.span(now).0).min().unwrap_or(now)
            }
            waterfall::LayerKind::FreeTier { period, zone, .. } => period.bounds(*zone, now).0,
            waterfall::LayerKind::Workspace {
                member_cap: Some(cap),
            } => cap.bounds(now).0,
            _ => now,
        })
        .min()
        .unwrap_or(now)
}
