//! h2 mode's data-path threads: one single-threaded tokio runtime per thread, each client
//! connection handed to one of them (in turn) and served there to its end, with the
//! backend connections its calls use opened on the same thread. A call's frames then never
//! cross threads: no work stealing, no cross-core wake-ups, no contention on an HTTP/2
//! connection's lock — what a shared work-stealing runtime costs on every call (measured in
//! bench/README.md). Balancing state (calls in flight, health) stays shared through the
//! backend set's atomics. Admin, health checks and the supervisor keep the main runtime.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's index among the data-path threads (0 elsewhere).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the data-path thread this runs on; 0 on any other thread.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// The data-path threads; they stop when this is dropped, once their tasks are done or
/// dropped.
#[derive(Debug)]
pub struct DataThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
    joins: Vec<JoinHandle<()>>,
}

impl DataThreads {
    /// Starts `count` threads (at least one), each running its own runtime.
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut joins = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let join = std::thread::Builder::new()
                .name(format!("portshare-h2-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    runtime.block_on(stop.cancelled());
                })?;
            joins.push(join);
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            stop,
            joins,
        })
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never: [`DataThreads::start`] starts one at least).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime the next connection goes to, in turn.
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}

impl Drop for DataThreads {
    fn drop(&mut self) {
        self.stop.cancel();
        for join in self.joins.drain(..) {
            // A thread that panicked has nothing left to stop.
            let _ = join.join();
        }
    }
}
