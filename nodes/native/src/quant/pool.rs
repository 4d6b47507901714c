//! A small pool of persistent compute threads for splitting one matmul by output rows.
//!
//! The caller always does part 0 itself; `threads - 1` workers do the others. Between jobs
//! a worker spins for a short, bounded time (default 20 µs, enough to catch the next
//! matmul of a decode step) and then *blocks* on a condvar. It never spins longer: on a
//! 2-core box shared with anything else, two threads spinning against each other collapse
//! throughput (see the engine spike anchor). `threads == 1` has no workers at all and runs
//! inline on the caller.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The work of one call: `f(part, parts)` for every `part` in `0..parts`.
type JobFn<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// Persistent worker threads that run one job at a time, split in `threads` parts.
pub struct ComputePool {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes `run` calls: one job in flight per pool.
    call: Mutex<()>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    done: Condvar,
    /// Mirror of `state.generation`, read while spinning without the lock.
    generation: AtomicU64,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    spin: Duration,
}

struct State {
    generation: u64,
    job: Option<JobPtr>,
    shutdown: bool,
}

/// A job pointer with its lifetime erased. Sound because `run` does not return (or
/// unwind) before every worker has finished with it.
#[derive(Clone, Copy)]
struct JobPtr(*const JobFn<'static>);
// SAFETY: the pointee is `Sync`, and it outlives every use (see `JobPtr`).
unsafe impl Send for JobPtr {}

impl ComputePool {
    /// A pool of `threads` (at least 1) compute threads, the caller included.
    pub fn new(threads: usize) -> ComputePool {
        ComputePool::with_spin(threads, Duration::from_micros(20))
    }

    /// Like [`ComputePool::new`], with the bounded spin before a thread blocks.
    pub fn with_spin(threads: usize, spin: Duration) -> ComputePool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generation: 0,
                job: None,
                shutdown: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            generation: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            spin,
        });
        let workers = (1..threads)
            .map(|part| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("dynamo-compute-{part}"))
                    .spawn(move || worker(&shared, part, threads))
                    // Failing to start a thread at engine start-up is not recoverable.
                    .expect("spawn compute thread")
            })
            .collect();
        ComputePool {
            threads,
            shared,
            workers,
            call: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(part, parts)` for every part in `0..threads()`, part 0 on the caller, and
    /// returns when all are done. A panic in any part is re-raised here.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.threads == 1 {
            f(0, 1);
            return;
        }
        let _call = lock(&self.call);
        let sh = &*self.shared;
        // SAFETY: only the lifetime is erased; we wait below until no worker uses it.
        let job = JobPtr(unsafe {
            std::mem::transmute::<*const JobFn<'_>, *const JobFn<'static>>(f as *const JobFn<'_>)
        });
        {
            let mut st = lock(&sh.state);
            sh.pending.store(self.threads - 1, Ordering::SeqCst);
            st.job = Some(job);
            st.generation += 1;
            sh.generation.store(st.generation, Ordering::SeqCst);
            sh.work.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, self.threads)));
        self.wait_workers();
        lock(&sh.state).job = None;
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if sh.panicked.swap(false, Ordering::SeqCst) {
            panic!("a compute pool worker panicked");
        }
    }

    fn wait_workers(&self) {
        let sh = &*self.shared;
        let start = Instant::now();
        while sh.pending.load(Ordering::Acquire) != 0 {
            if start.elapsed() > sh.spin {
                let mut st = lock(&sh.state);
                while sh.pending.load(Ordering::Acquire) != 0 {
                    st = sh.done.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                return;
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePool")
            .field("threads", &self.threads)
            .finish()
    }
}

/// A poisoned lock only means another part panicked; the state itself stays consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker(sh: &Shared, part: usize, parts: usize) {
    let mut seen = 0u64;
    loop {
        // Bounded spin for the next job, then block.
        let start = Instant::now();
        while sh.generation.load(Ordering::Acquire) == seen && start.elapsed() < sh.spin {
            std::hint::spin_loop();
        }
        let job = {
            let mut st = lock(&sh.state);
            while st.generation == seen && !st.shutdown {
                st = sh.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            st.job
        };
        if let Some(JobPtr(f)) = job {
            // SAFETY: `run` keeps the closure alive until `pending` reaches zero.
            let f = unsafe { &*f };
            if catch_unwind(AssertUnwindSafe(|| f(part, parts))).is_err() {
                sh.panicked.store(true, Ordering::SeqCst);
            }
        }
        if sh.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Take the lock so the notify cannot fall between the caller's check and wait.
            let _st = lock(&sh.state);
            sh.done.notify_all();
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
