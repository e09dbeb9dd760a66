//! Which serving thread serves a new client connection: the one with the fewest open.
//!
//! Every serving thread accepts from the one listening socket, and the thread that wakes first
//! takes every connection waiting. Connections opened at once (a load balancer's pool, a load
//! generator's) thus all landed on one thread while the others idled: in `benches/proxy.sh`
//! one `flowgate-http` thread of two served every connection in some rounds. A thread that
//! accepts a connection while another serves fewer hands it over; the connection then stays on
//! that thread for its life, as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::{IntGauge, IntGaugeVec};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// A connection accepted by one thread for another to serve, with its place under
/// `connections_max`.
pub struct Handed {
    /// The client's socket, out of the accepting thread's event loop.
    pub tcp: std::net::TcpStream,
    /// Its permit: one of `connections_max`.
    pub permit: OwnedSemaphorePermit,
}

/// The serving threads' open connections, and a way to hand each thread a connection.
pub struct Spread {
    open: Box<[AtomicUsize]>,
    inboxes: Box<[UnboundedSender<Handed>]>,
    gauges: Box<[IntGauge]>,
}

impl Spread {
    /// A spread over `threads` threads, and each thread's inbox of handed connections.
    pub fn new(
        threads: usize,
        gauge: &IntGaugeVec,
    ) -> (Arc<Spread>, Vec<UnboundedReceiver<Handed>>) {
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..threads).map(|_| unbounded_channel()).unzip();
        let spread = Spread {
            open: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
            inboxes: inboxes.into(),
            gauges: (0..threads)
                .map(|i| gauge.with_label_values(&[&i.to_string()]))
                .collect(),
        };
        (Arc::new(spread), receivers)
    }

    /// The thread to serve a connection that thread `me` accepted: `me`, unless another has
    /// fewer open. The connection is counted there at once, so a burst spreads as it arrives.
    /// A thread whose inbox is closed (it is stopping, or never started) is not picked: having
    /// no connections, it would otherwise be picked for every one, each handed back.
    pub fn pick(&self, me: usize) -> usize {
        let mine = self.open[me].load(Ordering::Relaxed);
        let target = self
            .open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .enumerate()
            .filter(|&(i, _)| !self.inboxes[i].is_closed())
            .min_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n < mine)
            .map_or(me, |(least, _)| least);
        self.opened(target);
        target
    }

    /// Hands `handed` to thread `to`; gives it back if that thread has stopped.
    pub fn hand(&self, to: usize, handed: Handed) -> Result<(), Handed> {
        self.inboxes[to].send(handed).map_err(|e| e.0)
    }

    /// Counts a connection open on `thread`.
    pub fn opened(&self, thread: usize) {
        self.open[thread].fetch_add(1, Ordering::Relaxed);
        self.gauges[thread].inc();
    }

    /// Counts a connection of `thread` closed.
    pub fn closed(&self, thread: usize) {
        self.open[thread].fetch_sub(1, Ordering::Relaxed);
        self.gauges[thread].dec();
    }
}

/// A connection open on a thread; counted closed when dropped.
pub struct Open {
    spread: Arc<Spread>,
    thread: usize,
}

impl Open {
    /// The connection just counted on `thread` (by [`Spread::pick`] or [`Spread::opened`]).
    pub fn new(spread: Arc<Spread>, thread: usize) -> Open {
        Open { spread, thread }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.spread.closed(self.thread);
    }
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn a_burst_spreads_evenly_whichever_thread_accepts_it() {
        let gauge =
            prometheus::IntGaugeVec::new(prometheus::Opts::new("g", "g"), &["thread"]).unwrap();
        let (spread, _inboxes) = Spread::new(3, &gauge);
        let picked: Vec<usize> = (0..9).map(|_| spread.pick(0)).collect();
        let count = |t| picked.iter().filter(|&&p| p == t).count();
        assert_eq!((count(0), count(1), count(2)), (3, 3, 3), "{picked:?}");
        assert_eq!(gauge.with_label_values(&["1"]).get(), 3);
        // A thread that closes connections gets the next ones.
        spread.closed(2);
        spread.closed(2);
        assert_eq!(spread.pick(0), 2);
        assert_eq!(spread.pick(1), 2);
        assert_eq!(spread.pick(1), 1);
    }

    #[test]
    fn a_thread_whose_inbox_closed_is_never_picked() {
        let gauge =
            prometheus::IntGaugeVec::new(prometheus::Opts::new("g", "g"), &["thread"]).unwrap();
        let (spread, mut inboxes) = Spread::new(3, &gauge);
        // Thread 1 never started (its inbox dropped); thread 2 is stopping (inbox closed).
        drop(inboxes.remove(1));
        inboxes[1].close();
        let picked: Vec<usize> = (0..6).map(|_| spread.pick(0)).collect();
        assert_eq!(picked, vec![0; 6], "only the accepting thread serves");
        assert_eq!(gauge.with_label_values(&["1"]).get(), 0);
        assert_eq!(gauge.with_label_values(&["2"]).get(), 0);
    }
}
