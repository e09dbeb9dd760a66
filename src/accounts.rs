//! The cached view of accounts: what the hot path decides against, without the store.
//!
//! Each [`Account`] holds its waterfall state behind a `parking_lot::Mutex`. The lock is held
//! only for a decision and its hold (microseconds, no `.await` inside), never across the
//! upstream call: that is what lets one account's concurrent requests see each other's holds
//! immediately, so that nobody is admitted on numbers another request has already spent.
//!
//! The view is rebuilt from the store on start-up ([`Accounts::load`]): balances from grants,
//! window and free-tier usage from recent monetization events. There is no eviction: an evicted
//! account would lose its in-flight holds, so the cache must hold every active account.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::Settings;
use crate::ids::AccountId;
use crate::store::{GrantBalance, Store, StoreError, StoredGrant};
use crate::waterfall::{self, AccountState, Draw, Grant, Millis, Plan, Pool};

/// One account in the cached view.
#[derive(Debug)]
pub struct Account {
    /// Its id.
    pub id: AccountId,
    /// Its plan.
    pub plan: Arc<Plan>,
    /// Whether its requests are refused.
    pub suspended: bool,
    /// Windows, free tier and grants, with every hold already applied. Shared with the
    /// account's successors ([`Accounts::change`]), so that a hold taken before a change of plan
    /// or suspension ends on the state the account has now.
    state: Arc<Mutex<AccountState>>,
}

impl Account {
    /// A new account with the given state.
    pub fn new(id: AccountId, plan: Arc<Plan>, suspended: bool, state: AccountState) -> Account {
        Account {
            id,
            plan,
            suspended,
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Runs `f` on the state under the account's lock. `f` must not block.
    pub fn with_state<R>(&self, f: impl FnOnce(&Plan, &mut AccountState) -> R) -> R {
        f(&self.plan, &mut self.state.lock())
    }
}

/// The SHA-256 digest of an API key.
type KeyDigest = [u8; 32];

/// The cached view: accounts by id and by API-key hash.
#[derive(Clone)]
pub struct Accounts {
    by_id: moka::sync::Cache<AccountId, Arc<Account>>,
    /// By the SHA-256 digest of the key, held as its 32 bytes (half its hex form, and looked up
    /// without formatting one per request). A plain map: keys are never evicted, and moka's
    /// per-entry bookkeeping (~300 bytes) would be most of a million-account view's memory.
    /// Readers hold the lock only for the lookup; writers are the admin API's key creation.
    by_key_hash: Arc<parking_lot::RwLock<HashMap<KeyDigest, AccountId>>>,
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
            by_id: moka::sync::Cache::builder().build(),
            by_key_hash: Arc::default(),
        }
    }

    /// Adds or replaces an account.
    pub fn insert(&self, account: Account) {
        self.by_id.insert(account.id.clone(), Arc::new(account));
    }

    /// Maps an API-key hash (SHA-256, hex, as stored) to an account. A hash that is not 64 hex
    /// digits cannot match any key: it is logged and skipped.
    pub fn insert_key(&self, key_hash: &str, account: AccountId) {
        let mut digest = [0u8; 32];
        match hex::decode_to_slice(key_hash, &mut digest) {
            Ok(()) => {
                self.by_key_hash.write().insert(digest, account);
            }
            Err(e) => {
                tracing::error!(account = %account, error = %e, "stored API-key hash is not SHA-256 hex; key ignored")
            }
        }
    }

    /// The account with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Account>> {
        self.by_id.get(id)
    }

    /// The account that owns this API key.
    pub fn by_api_key(&self, key: &str) -> Option<Arc<Account>> {
        use sha2::Digest;
        let digest: KeyDigest = sha2::Sha256::digest(key.as_bytes()).into();
        let id = self.by_key_hash.read().get(&digest).cloned();
        id.and_then(|id| self.get(&id))
    }

    /// Number of accounts in the view.
    pub fn len(&self) -> u64 {
        self.by_id.run_pending_tasks();
        self.by_id.entry_count()
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
            account.with_state(|plan, state| waterfall::release(plan, state, draws, now));
        }
    }

    /// Marks an entry's draws as debited by the store.
    pub fn settled(&self, id: &str, draws: &[Draw]) {
        if let Some(account) = self.get(id) {
            account.with_state(|_, state| state.settled(draws));
        }
    }

    /// Takes the store's committed balances as the truth (see [`AccountState::sync_grant`]).
    /// Returns the accounts that have grants the view does not know yet.
    pub fn sync_balances(&self, balances: &[GrantBalance]) -> Vec<String> {
        let mut unknown: Vec<String> = Vec::new();
        for b in balances {
            if let Some(account) = self.get(&b.account) {
                let known = account.with_state(|_, state| state.sync_grant(b.grant_id, b.balance));
                if !known && !unknown.contains(&b.account) {
                    unknown.push(b.account.clone());
                }
            }
        }
        unknown
    }

    /// Adds the grants of `id` that the store has and the view lacks (granted elsewhere).
    pub async fn add_new_grants(
        &self,
        store: &Store,
        settings: &Settings,
        id: &str,
    ) -> Result<(), StoreError> {
        let Some(account) = self.get(id) else {
            return Ok(());
        };
        let stored = store.grants(id).await?;
        account.with_state(|_, state| {
            for g in &stored {
                if !state.grants().iter().any(|known| known.id == g.id) {
                    state.add_grant(grant_of(settings, g));
                }
            }
        });
        Ok(())
    }

    /// Applies a refund the store has made: windows and free tier get the charge's units back,
    /// grants take the store's new balances.
    pub fn refunded(&self, id: &str, draws: &[Draw], balances: &[GrantBalance], now: Millis) {
        if let Some(account) = self.get(id) {
            let units: Vec<Draw> = draws
                .iter()
                .filter(|d| matches!(d.pool, Pool::Window { .. } | Pool::FreeTier { .. }))
                .copied()
                .collect();
            account.with_state(|plan, state| waterfall::release(plan, state, &units, now));
        }
        let _ = self.sync_balances(balances);
    }

    /// Builds the view from the store: every account, its grants' balances, and the usage
    /// still inside its windows and free-tier period at `now`.
    pub async fn load(
        store: &Store,
        settings: &Settings,
        now: Millis,
    ) -> Result<Accounts, StoreError> {
        let accounts = Accounts::new();
        let since = settings
            .plans
            .values()
            .map(|p| history_start(p, now))
            .min()
            .unwrap_or(now);
        let mut loaded = Vec::new();
        for stored in store.load_accounts().await? {
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
            accounts.insert(Account::new(id, plan.clone(), stored.suspended, state));
        }
        for (account, draws) in store.load_draws_since(since).await? {
            if let Some(a) = accounts.get(&account) {
                a.with_state(|plan, state| {
                    for draw in &draws {
                        state.replay(plan, draw, now);
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
    /// Changes an account's plan or suspension in the view; `false` if the view lacks it.
    ///
    /// The account is replaced by a successor sharing its state (see [`Account`]): grants, and
    /// the holds of requests in flight, carry over. On a change of plan the usage-limit and
    /// free-tier state is rebuilt for the new plan from `history` (the account's recorded draws
    /// since [`history_start`] of the new plan), as a restart would rebuild it. The swap happens
    /// under the account's lock; a request that identified the account just before it decides
    /// once more under the old plan.
    pub fn change(
        &self,
        id: &str,
        plan: Arc<Plan>,
        suspended: bool,
        history: &[Draw],
        now: Millis,
    ) -> bool {
        let Some(old) = self.get(id) else {
            return false;
        };
        let mut state = old.state.lock();
        if plan.name != old.plan.name {
            state.layers = AccountState::new(&plan, Vec::new(), now).layers;
            for draw in history {
                state.replay(&plan, draw, now);
            }
        }
        self.by_id.insert(
            old.id.clone(),
            Arc::new(Account {
                id: old.id.clone(),
                plan,
                suspended,
                state: old.state.clone(),
            }),
        );
        drop(state);
        true
    }
}

/// The engine's grant for a stored one.
pub fn grant_of(settings: &Settings, g: &StoredGrant) -> Grant {
    Grant {
        id: g.id,
        kind: g.kind,
        balance: g.balance,
        unsettled: 0,
        expires_at: g.expires_at,
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
                now - windows
                    .iter()
                    .map(|w| i64::from(w.minutes))
                    .max()
                    .unwrap_or(0)
                    * 60_000
            }
            waterfall::LayerKind::FreeTier { period, .. } => period.bounds(now).0,
            _ => now,
        })
        .min()
        .unwrap_or(now)
}
