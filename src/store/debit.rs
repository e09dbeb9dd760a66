//! How a charge's credits become debits against the committed balances: the ledger rule every
//! store applies inside its commit transaction, on grants it has locked.
//!
//! The decision drew from grants as the gateway's view saw them. The store's balances can be
//! lower: another replica spent the same grant, or an estimate was low. Each grant's draw takes
//! what the grant still holds; a shortfall continues down the waterfall over the committed
//! balances (the account's other grants that the plan's later layers would have used for this
//! feature, in spend order); only what the account as a whole no longer has is forgiven, on the
//! grant that was drawn, and recorded. The user never pays more than they had, and never pays
//! less than the price while they still have credits.

use smallvec::SmallVec;

use super::StoreError;
use crate::usage::LedgerEntry;
use crate::waterfall::{GrantKind, Millis, Pool};

/// A grant as a commit sees it: locked, with its committed balance.
#[derive(Debug, Clone)]
pub(super) struct LockedGrant {
    pub id: i64,
    pub account_id: String,
    pub kind: GrantKind,
    pub balance: i64,
    pub expires_at: Option<Millis>,
    pub priority: i32,
    /// Feature names it may pay for (`None`: all).
    pub features: Option<Vec<String>>,
}

/// What one charge does to one grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Debit {
    pub grant_id: i64,
    /// Credits taken from the balance.
    pub taken: i64,
    /// Credits owed that nobody could pay, forgiven.
    pub forgiven: i64,
    /// The grant's balance after this charge.
    pub balance_after: i64,
}

/// Plans the debits of one charged entry against `grants` (which include every grant of the
/// entry's account, and of the workspace whose grants it drew) and applies them to those
/// balances, so that the next charge of the same batch sees them. Debits come out one per
/// grant, in the order first touched.
///
/// A draw keeps the owner the engine chose: a shortfall of the account's own grant moves only
/// to the account's other grants, one of a workspace grant ([`Pool::Workspace`]) only to that
/// workspace's other credit grants; the member's cap counted the credits, not the grant.
pub(super) fn plan(
    entry: &LedgerEntry,
    grants: &mut [LockedGrant],
) -> Result<SmallVec<[Debit; 2]>, StoreError> {
    let mut debits: SmallVec<[Debit; 2]> = SmallVec::new();
    for draw in &entry.decision.draws {
        let (grant_id, in_pool) = match draw.pool {
            Pool::Grant { grant_id } => (grant_id, false),
            Pool::Workspace { grant_id, .. } => (grant_id, true),
            _ => continue,
        };
        let owed = i64::try_from(draw.credits)
            .map_err(|_| StoreError::Corrupt(format!("draw of {} credits", draw.credits)))?;
        let index = grants
            .iter()
            .position(|g| g.id == grant_id && (*g.account_id == *entry.account) != in_pool)
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "grant {grant_id} {} account {} is missing",
                    if in_pool { "of the workspace of" } else { "of" },
                    entry.account
                ))
            })?;
        let mut short = owed - take(&mut debits, &mut grants[index], owed);
        if short > 0 {
            let order = if in_pool {
                pool_fallbacks(entry, &grants[index].account_id.clone(), grants)
            } else {
                fallbacks(entry, draw.layer as usize, grants)
            };
            for fallback in order {
                short -= take(&mut debits, &mut grants[fallback], short);
                if short == 0 {
                    break;
                }
            }
        }
        if short > 0 {
            let grant = &grants[index];
            record(&mut debits, grant.id, 0, short, grant.balance);
        }
    }
    Ok(debits)
}

/// Takes up to `owed` from `grant`, records it, returns what it took.
fn take(debits: &mut SmallVec<[Debit; 2]>, grant: &mut LockedGrant, owed: i64) -> i64 {
    let taken = grant.balance.clamp(0, owed);
    if taken > 0 {
        grant.balance -= taken;
        record(debits, grant.id, taken, 0, grant.balance);
    }
    taken
}

fn record(
    debits: &mut SmallVec<[Debit; 2]>,
    grant_id: i64,
    taken: i64,
    forgiven: i64,
    balance_after: i64,
) {
    match debits.iter_mut().find(|d| d.grant_id == grant_id) {
        Some(d) => {
            d.taken += taken;
            d.forgiven += forgiven;
            d.balance_after = balance_after;
        }
        None => debits.push(Debit {
            grant_id,
            taken,
            forgiven,
            balance_after,
        }),
    }
}

/// The workspace `owner`'s credit grants that could have paid for the entry, in spend order.
fn pool_fallbacks(entry: &LedgerEntry, owner: &str, grants: &[LockedGrant]) -> Vec<usize> {
    let mut usable: Vec<(usize, (i32, Millis, i64))> = grants
        .iter()
        .enumerate()
        .filter(|(_, g)| {
            *g.account_id == *owner
                && g.kind == GrantKind::Credits
                && g.balance > 0
                && g.expires_at.is_none_or(|at| entry.decided_at < at)
                && g.features
                    .as_ref()
                    .is_none_or(|f| f.iter().any(|name| **name == *entry.feature))
        })
        .map(|(i, g)| (i, (g.priority, g.expires_at.unwrap_or(Millis::MAX), g.id)))
        .collect();
    usable.sort_unstable_by_key(|(_, order)| *order);
    usable.into_iter().map(|(i, _)| i).collect()
}

/// The grants that own `debits`, by grant id: the account for a balance a commit reports.
pub(super) fn owner_of(grants: &[LockedGrant], grant_id: i64) -> Option<&str> {
    grants
        .iter()
        .find(|g| g.id == grant_id)
        .map(|g| g.account_id.as_str())
}

/// The ids of the workspace grants `entries` drew (their owners' grants must be read too).
pub(super) fn pool_grant_ids<'a>(entries: impl Iterator<Item = &'a LedgerEntry>) -> Vec<i64> {
    let mut ids: Vec<i64> = entries
        .flat_map(|e| e.decision.draws.iter())
        .filter_map(|d| match d.pool {
            Pool::Workspace { grant_id, .. } => Some(grant_id),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The account's grants that could have paid for the entry at and after plan layer `from`, in
/// the order the waterfall would have used them: by layer, then spend order.
fn fallbacks(entry: &LedgerEntry, from: usize, grants: &[LockedGrant]) -> Vec<usize> {
    let plan = &entry.plan;
    let feature = entry.decision.feature;
    let layer_of = |kind: GrantKind| {
        plan.layers
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| l.features.contains(feature) && l.kind.grant_kind() == Some(kind))
            .map(|(i, _)| i)
    };
    let mut usable: Vec<(usize, (usize, i32, Millis, i64))> = grants
        .iter()
        .enumerate()
        .filter(|(_, g)| {
            *g.account_id == *entry.account
                && g.balance > 0
                && g.expires_at.is_none_or(|at| entry.decided_at < at)
                && g.features
                    .as_ref()
                    .is_none_or(|f| f.iter().any(|name| **name == *entry.feature))
        })
        .filter_map(|(i, g)| {
            let layer = layer_of(g.kind)?;
            Some((
                i,
                (layer, g.priority, g.expires_at.unwrap_or(Millis::MAX), g.id),
            ))
        })
        .collect();
    usable.sort_unstable_by_key(|(_, order)| *order);
    usable.into_iter().map(|(i, _)| i).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use smallvec::smallvec;

    use super::*;
    use crate::usage::Outcome;
    use crate::waterfall::{
        Decision, Draw, FeatureId, FeatureSet, Layer, LayerKind, Plan, PriceTable,
    };

    fn entry(draws: &[(u8, i64, u64)], decided_at: Millis) -> LedgerEntry {
        let plan = Plan {
            name: "p".into(),
            layers: vec![
                Layer {
                    name: "credits".into(),
                    features: FeatureSet::ALL,
                    kind: LayerKind::Credits,
                },
                Layer {
                    name: "promotions".into(),
                    features: FeatureSet::ALL,
                    kind: LayerKind::Promotions,
                },
            ],
            prices: vec![PriceTable::flat("v1", vec![Some(1)])],
            strict: false,
        };
        LedgerEntry {
            decision_id: uuid::Uuid::now_v7(),
            account: "a".into(),
            plan: Arc::new(plan),
            feature: "task".into(),
            used_units: draws.iter().map(|d| d.2).sum(),
            model: None,
            quantities: None,
            forgiven_units: 0,
            decision: Decision {
                feature: FeatureId(0),
                units: draws.iter().map(|d| d.2).sum(),
                credits_per_unit: 1,
                price_table: 0,
                denial: None,
                draws: draws
                    .iter()
                    .map(|&(layer, grant_id, credits)| {
                        Draw::new(layer, Pool::Grant { grant_id }, credits, credits)
                    })
                    .collect(),
                layers: smallvec![],
            },
            outcome: Outcome::Completed,
            code: None,
            upstream_status: Some(200),
            idempotency_key: None,
            decided_at,
            completed_at: decided_at,
            committed: None,
            shadow: None,
        }
    }

    fn grant(id: i64, kind: GrantKind, balance: i64) -> LockedGrant {
        LockedGrant {
            id,
            account_id: "a".into(),
            kind,
            balance,
            expires_at: None,
            priority: 0,
            features: None,
        }
    }

    fn debit(grant_id: i64, taken: i64, forgiven: i64, balance_after: i64) -> Debit {
        Debit {
            grant_id,
            taken,
            forgiven,
            balance_after,
        }
    }

    #[test]
    fn a_covered_draw_is_taken_as_drawn() {
        let mut grants = [
            grant(1, GrantKind::Credits, 50),
            grant(2, GrantKind::Credits, 50),
        ];
        let debits = plan(&entry(&[(0, 1, 30)], 0), &mut grants).unwrap();
        assert_eq!(debits.as_slice(), [debit(1, 30, 0, 20)]);
        assert_eq!((grants[0].balance, grants[1].balance), (20, 50));
    }

    #[test]
    fn a_shortfall_moves_to_the_next_usable_grant_in_waterfall_order() {
        let mut grants = [
            grant(1, GrantKind::Credits, 10),
            grant(2, GrantKind::Promotion, 100), // a later layer: used last
            grant(3, GrantKind::Credits, 5),
            LockedGrant {
                expires_at: Some(1_000), // expired when decided
                ..grant(4, GrantKind::Credits, 100)
            },
            LockedGrant {
                features: Some(vec!["video".into()]), // may not pay for tasks
                ..grant(5, GrantKind::Credits, 100)
            },
            LockedGrant {
                account_id: "b".into(), // someone else's
                ..grant(6, GrantKind::Credits, 100)
            },
        ];
        let debits = plan(&entry(&[(0, 1, 30)], 1_000), &mut grants).unwrap();
        assert_eq!(
            debits.as_slice(),
            [debit(1, 10, 0, 0), debit(3, 5, 0, 0), debit(2, 15, 0, 85)]
        );
        assert!(grants[3..].iter().all(|g| g.balance == 100));
    }

    #[test]
    fn a_promotion_shortfall_never_moves_back_to_an_earlier_layer() {
        let mut grants = [
            grant(1, GrantKind::Credits, 100),
            grant(2, GrantKind::Promotion, 4),
        ];
        let debits = plan(&entry(&[(1, 2, 10)], 0), &mut grants).unwrap();
        assert_eq!(debits.as_slice(), [debit(2, 4, 6, 0)]);
        assert_eq!(grants[0].balance, 100);
    }

    #[test]
    fn what_nobody_can_pay_is_forgiven_on_the_drawn_grant() {
        let mut grants = [
            grant(1, GrantKind::Credits, 3),
            grant(2, GrantKind::Credits, 4),
        ];
        let debits = plan(&entry(&[(0, 1, 10)], 0), &mut grants).unwrap();
        assert_eq!(debits.as_slice(), [debit(1, 3, 3, 0), debit(2, 4, 0, 0)]);
        let paid: i64 = debits.iter().map(|d| d.taken + d.forgiven).sum();
        assert_eq!(paid, 10, "every credit owed is either taken or forgiven");
    }

    #[test]
    fn charges_of_one_batch_see_each_others_debits() {
        let mut grants = [grant(1, GrantKind::Credits, 10)];
        plan(&entry(&[(0, 1, 6)], 0), &mut grants).unwrap();
        let second = plan(&entry(&[(0, 1, 6)], 0), &mut grants).unwrap();
        assert_eq!(second.as_slice(), [debit(1, 4, 2, 0)]);
    }

    #[test]
    fn a_grant_that_expires_later_still_takes_a_shortfall() {
        let mut grants = [
            grant(1, GrantKind::Credits, 2),
            LockedGrant {
                expires_at: Some(5_000), // after the decision
                ..grant(2, GrantKind::Credits, 100)
            },
        ];
        let debits = plan(&entry(&[(0, 1, 10)], 1_000), &mut grants).unwrap();
        assert_eq!(debits.as_slice(), [debit(1, 2, 0, 0), debit(2, 8, 0, 92)]);
    }

    #[test]
    fn a_grant_that_gives_nothing_gets_no_balance_update() {
        let mut grants = [
            grant(1, GrantKind::Credits, 0),
            grant(2, GrantKind::Credits, 10),
        ];
        let debits = plan(&entry(&[(0, 1, 5)], 0), &mut grants).unwrap();
        assert_eq!(debits.as_slice(), [debit(2, 5, 0, 5)]);
    }

    #[test]
    fn two_draws_on_one_grant_make_one_debit_of_their_sum() {
        let mut grants = [grant(1, GrantKind::Credits, 20)];
        let debits = plan(&entry(&[(0, 1, 6), (0, 1, 3)], 0), &mut grants).unwrap();
        assert_eq!(debits.as_slice(), [debit(1, 9, 0, 11)]);
    }

    #[test]
    fn a_draw_on_an_unknown_grant_is_corrupt() {
        let mut grants = [grant(1, GrantKind::Credits, 10)];
        assert!(matches!(
            plan(&entry(&[(0, 9, 1)], 0), &mut grants),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_workspace_draw_is_debited_on_the_workspace_and_its_shortfall_stays_there() {
        let ws = |id, balance| LockedGrant {
            account_id: "ws".into(),
            ..grant(id, GrantKind::Credits, balance)
        };
        let mut e = entry(&[(0, 1, 30)], 0);
        e.decision.draws.push(Draw::new(
            1,
            Pool::Workspace {
                grant_id: 10,
                period_start: 0,
            },
            20,
            20,
        ));
        // The member's own grant is short by 10 and the member has nothing else: that is
        // forgiven, never taken from the workspace; the workspace's short grant moves to its
        // other grant, never to the member's.
        let mut grants = [grant(1, GrantKind::Credits, 20), ws(10, 5), ws(11, 100)];
        let debits = plan(&e, &mut grants).unwrap();
        assert_eq!(
            debits.as_slice(),
            [
                debit(1, 20, 10, 0),
                debit(10, 5, 0, 0),
                debit(11, 15, 0, 85)
            ]
        );
        assert_eq!(owner_of(&grants, 11), Some("ws"));
        // A workspace grant the commit did not read is an error, not a debit elsewhere.
        let mut only_mine = [
            grant(1, GrantKind::Credits, 50),
            grant(10, GrantKind::Credits, 50),
        ];
        assert!(matches!(
            plan(&e, &mut only_mine),
            Err(StoreError::Corrupt(_))
        ));
    }
}
