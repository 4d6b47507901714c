//! A small pool of persistent compute threads for splitting one matmul by output rows.
//!
//! A job is `chunks` independent pieces of work. The caller and the workers *claim* chunks
//! from one atomic cursor until none are left, so a worker that the OS has not scheduled
//! (the box is shared) simply gets nothing: the caller does its chunks and returns, and
//! two threads degrade to about one thread's speed instead of waiting on a wake-up.
//!
//! Between jobs a worker spins for a short, bounded time (default 20 µs, enough to catch
//! the next matmul of a decode step) and then *blocks* on a condvar. It never spins longer:
//! on a 2-core box shared with anything else, two threads spinning against each other
//! collapse throughput (see the engine spike anchor). `threads == 1` has no workers at all
//! and runs inline on the caller.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The work of one call: `f(chunk)` for every chunk.
type JobFn<'a> = dyn Fn(usize) + Sync + 'a;

/// Persistent worker threads that share one job at a time with the caller.
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
    /// `generation << 32 | next chunk to hand out`: claiming a chunk and checking that it
    /// belongs to the job one holds is a single compare-and-swap.
    cursor: AtomicU64,
    /// Chunks of the current job that have finished (or panicked).
    finished: AtomicUsize,
    panicked: AtomicBool,
    spin: Duration,
}

struct State {
    generation: u32,
    job: Option<Job>,
    shutdown: bool,
}

#[derive(Clone, Copy)]
struct Job {
    f: JobPtr,
    chunks: usize,
}

/// A job pointer with its lifetime erased. Sound because a thread calls it only after
/// claiming a chunk of the job's generation, and `run` returns only after every claimed
/// chunk has finished.
#[derive(Clone, Copy)]
struct JobPtr(*const JobFn<'static>);
// SAFETY: the pointee is `Sync`, and it outlives every use (see `JobPtr`).
unsafe impl Send for JobPtr {}

impl ComputePool {
    /// A pool of `threads` (at least 1) compute threads, the caller included.
    pub fn new(threads: usize) -> ComputePool {
        ComputePool::with_spin(threads, Duration::from_micros(20))
    }

    /// Like [`ComputePool::new`], with the bounded spin before an idle thread blocks.
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
            cursor: AtomicU64::new(0),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            spin,
        });
        let workers = (1..threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("dynamo-compute-{i}"))
                    .spawn(move || worker(&shared))
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

    /// Runs `f(chunk)` for every chunk in `0..chunks`, spread over the caller and the
    /// workers, and returns when all are done. A panic in any chunk is re-raised here.
    pub fn run(&self, chunks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 || chunks <= 1 {
            (0..chunks).for_each(f);
            return;
        }
        assert!(chunks < u32::MAX as usize, "too many chunks: {chunks}");
        let _call = lock(&self.call);
        let sh = &*self.shared;
        // SAFETY: only the lifetime is erased; see `JobPtr`.
        let f_static = JobPtr(unsafe {
            std::mem::transmute::<*const JobFn<'_>, *const JobFn<'static>>(f as *const JobFn<'_>)
        });
        let generation = {
            let mut st = lock(&sh.state);
            st.generation = st.generation.wrapping_add(1);
            st.job = Some(Job {
                f: f_static,
                chunks,
            });
            sh.finished.store(0, Ordering::SeqCst);
            sh.cursor
                .store(u64::from(st.generation) << 32, Ordering::SeqCst);
            sh.work.notify_all();
            st.generation
        };
        let mut mine = Ok(());
        while let Some(c) = claim(sh, generation, chunks) {
            if mine.is_ok() {
                mine = catch_unwind(AssertUnwindSafe(|| f(c)));
            }
            sh.finished.fetch_add(1, Ordering::AcqRel);
        }
        self.wait_finished(chunks);
        lock(&sh.state).job = None;
        if let Err(payload) = mine {
            sh.panicked.store(false, Ordering::SeqCst);
            resume_unwind(payload);
        }
        if sh.panicked.swap(false, Ordering::SeqCst) {
            panic!("a compute pool worker panicked");
        }
    }

    fn wait_finished(&self, chunks: usize) {
        let sh = &*self.shared;
        let start = Instant::now();
        while sh.finished.load(Ordering::Acquire) != chunks {
            if start.elapsed() > sh.spin {
                let mut st = lock(&sh.state);
                while sh.finished.load(Ordering::Acquire) != chunks {
                    st = sh.done.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                return;
            }
            std::hint::spin_loop();
        }
    }
}

/// Claims the next chunk of job `generation`, or `None` when it has none left (or a newer
/// job has replaced it).
fn claim(sh: &Shared, generation: u32, chunks: usize) -> Option<usize> {
    let mut cur = sh.cursor.load(Ordering::Acquire);
    loop {
        let next = (cur & u64::from(u32::MAX)) as usize;
        if (cur >> 32) as u32 != generation || next >= chunks {
            return None;
        }
        match sh
            .cursor
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(next),
            Err(now) => cur = now,
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

/// A poisoned lock only means another chunk panicked; the state itself stays consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker(sh: &Shared) {
    let mut seen = 0u32;
    loop {
        // Bounded spin for the next job, then block.
        let start = Instant::now();
        while (sh.cursor.load(Ordering::Acquire) >> 32) as u32 == seen && start.elapsed() < sh.spin
        {
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
        let Some(Job { f, chunks }) = job else {
            continue;
        };
        while let Some(c) = claim(sh, seen, chunks) {
            // SAFETY: chunk `c` of this generation is claimed, so `run` is still waiting
            // for it and the closure is alive.
            let f = unsafe { &*f.0 };
            if catch_unwind(AssertUnwindSafe(|| f(c))).is_err() {
                sh.panicked.store(true, Ordering::SeqCst);
            }
            if sh.finished.fetch_add(1, Ordering::AcqRel) + 1 == chunks {
                // Take the lock so the notify cannot fall between the caller's check and
                // its wait.
                let _st = lock(&sh.state);
                sh.done.notify_all();
            }
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
