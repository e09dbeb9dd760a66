//! Where log lines go: gathered in memory and written out by one thread in large writes.
//!
//! `tracing_appender::non_blocking`, used before, hands each line to its thread through a
//! channel. Under load that thread was woken for every line: a futex wake on the request's
//! worker, two `sched_yield`s while its channel spun, and a `write(2)` per line — about 7 µs of
//! CPU per proxied request (`STRACE=… bash benches/proxy.sh`, docs/BENCHMARKS.md). Here a line
//! is appended to a shared buffer under a lock held only for the copy; the thread wakes every
//! [`FLUSH_INTERVAL`] (sooner once [`FLUSH_BYTES`] wait) and writes whatever has gathered in
//! one call. A line therefore reaches stderr within about [`FLUSH_INTERVAL`]. Nothing is
//! dropped: past [`BUFFER_BYTES_MAX`] (a stuck stderr) writers wait for room, as the old
//! writer's full queue made them. Dropping the [`LogGuard`] writes what is left.

use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing_subscriber::fmt::MakeWriter;

/// Longest a line waits in memory before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// Gathered bytes past which the thread is woken at once.
pub const FLUSH_BYTES: usize = 256 * 1024;
/// Gathered bytes past which writers wait for the thread to catch up.
pub const BUFFER_BYTES_MAX: usize = 16 * 1024 * 1024;

struct Shared {
    state: Mutex<State>,
    /// The thread's wake-up: enough bytes gathered, or stopping.
    full: Condvar,
    /// Writers' wake-up: the buffer was taken.
    room: Condvar,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    stopping: bool,
}

/// The `MakeWriter` of the log subscriber: each formatted event is appended whole.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Writes what is still gathered and stops the thread when dropped.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer of gathered lines to `out`, and the guard that ends it.
pub fn buffered<W: Write + Send + 'static>(out: W) -> (LogWriter, LogGuard) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        full: Condvar::new(),
        room: Condvar::new(),
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("flowgate-logs".into())
            .spawn(move || write_out(&shared, out))
            .ok()
    };
    let guard = LogGuard {
        shared: shared.clone(),
        thread,
    };
    (LogWriter { shared }, guard)
}

/// The thread: every interval (or when woken), takes the buffer and writes it in one call.
fn write_out<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::new();
    loop {
        let stopping = {
            let mut state = shared.state.lock();
            if state.buffer.len() < FLUSH_BYTES && !state.stopping {
                shared.full.wait_for(&mut state, FLUSH_INTERVAL);
            }
            std::mem::swap(&mut state.buffer, &mut spare);
            state.stopping
        };
        shared.room.notify_all();
        if !spare.is_empty() {
            // Nowhere to report a failed write to stderr; the lines are lost, not the process.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
        }
        if stopping {
            return;
        }
    }
}

impl LogWriter {
    fn append(&self, line: &[u8]) {
        let mut state = self.shared.state.lock();
        while state.buffer.len() >= BUFFER_BYTES_MAX && !state.stopping {
            self.shared.room.wait(&mut state);
        }
        let before = state.buffer.len();
        state.buffer.extend_from_slice(line);
        if before < FLUSH_BYTES && state.buffer.len() >= FLUSH_BYTES {
            self.shared.full.notify_one();
        }
    }
}

/// One event's writer, handed out per event by [`LogWriter`].
pub struct Line<'a>(&'a LogWriter);

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.append(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(()) // the thread flushes on its own schedule
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self)
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.state.lock().stopping = true;
        self.shared.full.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read after the guard is dropped.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_arrives_whole_by_the_guards_drop() {
        let sink = Sink::default();
        let (writer, guard) = buffered(sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        let line = format!("thread {t} line {i} {}\n", "x".repeat(i % 97));
                        writer.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .map(|l| {
                    let fields: Vec<&str> = l.split(' ').collect();
                    assert_eq!(fields[4].len(), fields[3].parse::<usize>().unwrap() % 97);
                    fields[3].parse().unwrap()
                })
                .collect();
            assert_eq!(
                mine,
                (0..5_000).collect::<Vec<_>>(),
                "thread {t}'s lines in order"
            );
        }
    }

    #[test]
    fn a_line_is_written_within_the_flush_interval_without_a_drop() {
        let sink = Sink::default();
        let (writer, _guard) = buffered(sink.clone());
        writer.make_writer().write_all(b"hello\n").unwrap();
        let waited = crate::clock::Stopwatch::start();
        while sink.0.lock().is_empty() {
            assert!(waited.elapsed() < FLUSH_INTERVAL * 50, "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(&*sink.0.lock(), b"hello\n");
    }
}
