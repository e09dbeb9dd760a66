//! Which address of an upstream a request goes to: round-robin over the addresses accepting
//! connections. An address that refused a connection is left out for [`DOWN_FOR_MS`], then
//! tried again; when every address is out, they are all tried anyway (an outage of the whole
//! upstream is the upstream's answer to give, 502, not ours to guess).

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use http::uri::Authority;
use smallvec::SmallVec;

use crate::config::Upstream;
use crate::waterfall::Millis;

/// How long an address that refused a connection is left out.
pub const DOWN_FOR_MS: Millis = 5_000;

/// The addresses of every configured upstream, index-aligned with `Settings::upstreams`.
#[derive(Debug)]
pub struct Pools {
    pools: Vec<Pool>,
}

#[derive(Debug)]
struct Pool {
    addresses: Vec<Address>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Address {
    authority: Authority,
    label: String,
    /// Left out until this instant (ms since the epoch); 0: in.
    down_until: AtomicI64,
}

impl Pools {
    /// The pools of `upstreams`.
    pub fn new(upstreams: &[Upstream]) -> Pools {
        Pools {
            pools: upstreams
                .iter()
                .map(|u| Pool {
                    addresses: u
                        .addresses
                        .iter()
                        .map(|a| Address {
                            authority: a.clone(),
                            label: a.to_string(),
                            down_until: AtomicI64::new(0),
                        })
                        .collect(),
                    next: AtomicUsize::new(0),
                })
                .collect(),
        }
    }

    /// The addresses of upstream `upstream` to try, in order: the next in turn among those in
    /// service first, the ones left out last.
    pub fn order(&self, upstream: usize, now: Millis) -> SmallVec<[usize; 4]> {
        let mut order = SmallVec::new();
        let Some(pool) = self.pools.get(upstream) else {
            return order;
        };
        let n = pool.addresses.len();
        if n == 1 {
            order.push(0);
            return order;
        }
        let start = pool.next.fetch_add(1, Ordering::Relaxed);
        let in_service = |i: &usize| pool.addresses[*i].down_until.load(Ordering::Relaxed) <= now;
        let turn = (0..n).map(|i| (start + i) % n);
        order.extend(turn.clone().filter(in_service));
        order.extend(turn.filter(|i| !in_service(i)));
        order
    }

    /// The authority and metric label of an address.
    pub fn address(&self, upstream: usize, index: usize) -> Option<(&Authority, &str)> {
        let a = self.pools.get(upstream)?.addresses.get(index)?;
        Some((&a.authority, &a.label))
    }

    /// Leaves an address out after it refused a connection.
    pub fn refused(&self, upstream: usize, index: usize, now: Millis) {
        if let Some(a) = self
            .pools
            .get(upstream)
            .and_then(|p| p.addresses.get(index))
        {
            a.down_until.store(now + DOWN_FOR_MS, Ordering::Relaxed);
        }
    }

    /// Whether upstream `upstream` has more than one address (only then is a request retried).
    pub fn several(&self, upstream: usize) -> bool {
        self.pools
            .get(upstream)
            .is_some_and(|p| p.addresses.len() > 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(n: usize) -> Pools {
        Pools::new(&[Upstream {
            name: "api".into(),
            addresses: (0..n)
                .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
                .collect(),
        }])
    }

    #[test]
    fn addresses_take_turns_and_a_refusing_one_waits_its_time_out() {
        let p = pools(3);
        let firsts: Vec<usize> = (0..6).map(|_| p.order(0, 0)[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        p.refused(0, 1, 1_000);
        for _ in 0..4 {
            let order = p.order(0, 1_000);
            assert_eq!(
                order.last(),
                Some(&1),
                "the refusing address goes last: {order:?}"
            );
        }
        // Back in turn once its time is out.
        let back = (0..3).any(|_| p.order(0, 1_000 + DOWN_FOR_MS)[0] == 1);
        assert!(back);
    }
}
