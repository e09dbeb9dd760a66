//! How replicas tell each other what changed: `NOTIFY`, sent inside the transaction that made
//! the change, so that it is delivered only if that transaction commits, and in commit order.
//!
//! Two channels:
//! - [`LEDGER_CHANNEL`]: what a ledger transaction did to numbers — each grant's balance after
//!   it, the window and free-tier usage it charged, the usage a refund gave back. Signed by the
//!   sending replica, which skips its own (its writer applied them in step with its holds).
//! - [`ACCOUNTS_CHANNEL`]: an account id whose row, API keys or grants changed. Every replica,
//!   the writer's included, re-reads the account from the store (see `crate::accounts`).
//!
//! A listener that loses its connection misses what was sent meanwhile: [`watch`] then reports
//! [`Change::Resync`] and the view re-reads the store.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Transaction};

use super::super::{Change, GrantBalance, LedgerChange, StoreError};
use crate::waterfall::Draw;

/// Numbers changed by a ledger transaction.
pub(super) const LEDGER_CHANNEL: &str = "flowgate_ledger";
/// An account (row, keys, grants) changed.
pub(super) const ACCOUNTS_CHANNEL: &str = "flowgate_accounts";
/// Largest payload sent (PostgreSQL's limit is 8000 bytes): a larger notice is split.
const NOTIFY_BYTES_MAX: usize = 7000;

/// One [`LEDGER_CHANNEL`] payload. Short field names: a batch's notice is split by size.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Notice {
    /// The sending replica.
    r: String,
    /// When it sent it (its clock, ms): the receiver measures the notification lag.
    #[serde(default)]
    t: i64,
    /// `(account, grant id, balance after)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    b: Vec<(String, i64, u64)>,
    /// The version of each balance in `b`, in the same order (a field of its own, so that a
    /// replica of an older version still reads `b`; a notice from one has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    v: Vec<u64>,
    /// Window and free-tier usage charged: `(account, draw)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    u: Vec<(String, Draw)>,
    /// Window and free-tier usage given back by a refund.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    x: Vec<(String, Draw)>,
}

/// Whether a draw counts against a window or free tier (what other replicas must count too).
pub(super) fn counts_usage(draw: &Draw) -> bool {
    matches!(
        draw.pool,
        crate::waterfall::Pool::Window { .. }
            | crate::waterfall::Pool::FreeTier { .. }
            | crate::waterfall::Pool::Workspace { .. }
    )
}

/// Sends `change` on [`LEDGER_CHANNEL`] as part of `tx`, in as many notifications as its size
/// needs. Nothing is sent for an empty change.
pub(super) async fn announce_ledger(
    tx: &mut Transaction<'_, Postgres>,
    replica: &str,
    change: &LedgerChange,
) -> Result<(), StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("notice: {e}"));
    let mut notice = Notice {
        r: replica.to_owned(),
        t: change.sent_at,
        ..Notice::default()
    };
    // Each item's JSON length, plus the envelope, bounds the payload's length.
    let envelope = serde_json::to_string(&notice).map_err(corrupt)?.len() + 24;
    let mut size = envelope;
    let items = change
        .balances
        .iter()
        .map(|b| Item::Balance((b.account.clone(), b.grant_id, b.balance), b.version))
        .chain(change.used.iter().map(|u| Item::Used(u.clone())))
        .chain(change.refunded.iter().map(|u| Item::Refunded(u.clone())));
    for item in items {
        let len = item.json_len().map_err(corrupt)? + 1;
        if size + len > NOTIFY_BYTES_MAX && size > envelope {
            send(tx, LEDGER_CHANNEL, &notice).await?;
            notice.b.clear();
            notice.v.clear();
            notice.u.clear();
            notice.x.clear();
            size = envelope;
        }
        size += len;
        match item {
            Item::Balance(b, version) => {
                notice.b.push(b);
                // Versions go with every balance or none: a notice is read by position.
                notice.v.extend(version);
            }
            Item::Used(u) => notice.u.push(u),
            Item::Refunded(u) => notice.x.push(u),
        }
    }
    if size > envelope {
        send(tx, LEDGER_CHANNEL, &notice).await?;
    }
    Ok(())
}

enum Item {
    Balance((String, i64, u64), Option<u64>),
    Used((String, Draw)),
    Refunded((String, Draw)),
}

impl Item {
    fn json_len(&self) -> Result<usize, serde_json::Error> {
        Ok(match self {
            Item::Balance(b, version) => {
                serde_json::to_string(b)?.len() + version.map_or(0, |v| v.to_string().len() + 1)
            }
            Item::Used(u) | Item::Refunded(u) => serde_json::to_string(u)?.len(),
        })
    }
}

/// Sends `notice` prefixed with the transaction's id and a space (`<xid> {…}`): a receiver
/// skips a commit its last re-read already included (`ReadMark::includes`).
async fn send(
    tx: &mut Transaction<'_, Postgres>,
    channel: &str,
    notice: &Notice,
) -> Result<(), StoreError> {
    let payload =
        serde_json::to_string(notice).map_err(|e| StoreError::Corrupt(format!("notice: {e}")))?;
    sqlx::query("SELECT pg_notify($1, pg_current_xact_id()::text || ' ' || $2)")
        .bind(channel)
        .bind(payload)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A [`LEDGER_CHANNEL`] payload: the sending transaction's id (0 when a replica of an older
/// version sent bare JSON) and the notice.
fn parse_ledger(payload: &str) -> Result<(u64, Notice), serde_json::Error> {
    let (xid, json) = match payload.split_once(' ') {
        Some((xid, json)) if !payload.starts_with('{') => (xid.parse().unwrap_or(0), json),
        _ => (0, payload),
    };
    Ok((xid, serde_json::from_str(json)?))
}

/// A notice's balances with their versions: none when the notice does not carry one for each
/// (a replica of an older version sent it), so that no balance takes another's version.
fn balances(b: Vec<(String, i64, u64)>, v: &[u64]) -> Vec<GrantBalance> {
    let versioned = v.len() == b.len();
    b.into_iter()
        .enumerate()
        .map(|(i, (account, grant_id, balance))| GrantBalance {
            account,
            grant_id,
            balance,
            version: v.get(i).copied().filter(|_| versioned),
        })
        .collect()
}

/// Sends `account` on [`ACCOUNTS_CHANNEL`] as part of `tx`.
pub(super) async fn announce_account(
    tx: &mut Transaction<'_, Postgres>,
    account: &str,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(ACCOUNTS_CHANNEL)
        .bind(account)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Follows every replica's changes: a task listens on both channels and sends what it hears,
/// skipping `replica`'s own ledger notices. On every (re)connection it first sends
/// [`Change::Resync`]: whatever was sent while nobody listened is read from the store instead.
pub(super) fn watch(
    pool: PgPool,
    replica: std::sync::Arc<str>,
) -> tokio::sync::mpsc::Receiver<Change> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let listener = async {
                let mut l = PgListener::connect_with(&pool).await?;
                l.listen_all([LEDGER_CHANNEL, ACCOUNTS_CHANNEL]).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = match listener.await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "change listener cannot connect; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Listening already: a change committed from here on is heard, one committed
            // before is in what the resync reads.
            if tx.send(Change::Resync).await.is_err() {
                return;
            }
            loop {
                let change = match listener.try_recv().await {
                    Ok(Some(n)) if n.channel() == ACCOUNTS_CHANNEL => {
                        Change::Account(n.payload().to_owned())
                    }
                    Ok(Some(n)) => match parse_ledger(n.payload()) {
                        Ok((_, notice)) if notice.r == *replica => continue,
                        Ok((xid, notice)) => Change::Ledger(LedgerChange {
                            balances: balances(notice.b, &notice.v),
                            used: notice.u,
                            refunded: notice.x,
                            sent_at: notice.t,
                            xid,
                        }),
                        Err(e) => {
                            tracing::warn!(error = %e, "unreadable ledger notification");
                            continue;
                        }
                    },
                    Ok(None) | Err(_) => {
                        tracing::warn!("change listener lost its connection; reconnecting");
                        break;
                    }
                };
                if tx.send(change).await.is_err() {
                    return; // the gateway stopped
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balances_travel_with_their_versions() {
        let notice = Notice {
            r: "a".into(),
            b: vec![("acct".into(), 7, 40), ("acct".into(), 8, 0)],
            v: vec![5, 2],
            ..Notice::default()
        };
        let payload = format!("42 {}", serde_json::to_string(&notice).expect("json"));
        let (xid, read) = parse_ledger(&payload).expect("parse");
        assert_eq!(xid, 42);
        let got = balances(read.b, &read.v);
        assert_eq!(
            got.iter()
                .map(|b| (b.grant_id, b.balance, b.version))
                .collect::<Vec<_>>(),
            [(7, 40, Some(5)), (8, 0, Some(2))]
        );
    }

    /// A replica of an older version sends no versions: its balances are taken as they come,
    /// and a notice whose versions do not match its balances gives none to any of them.
    #[test]
    fn a_notice_without_versions_gives_none() {
        let (_, read) = parse_ledger(r#"7 {"r":"old","b":[["acct",7,40]]}"#).expect("parse");
        assert_eq!(balances(read.b, &read.v)[0].version, None);
        let short = balances(vec![("a".into(), 1, 1), ("a".into(), 2, 2)], &[9]);
        assert!(short.iter().all(|b| b.version.is_none()));
    }
}
