use super::*;
use std::sync::atomic::AtomicUsize;

#[test]
fn every_chunk_runs_exactly_once() {
    for threads in [1, 2, 3] {
        let pool = ComputePool::new(threads);
        for chunks in [0, 1, 2, 7, 64] {
            let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..100 {
                pool.run(chunks, &|c| {
                    hits[c].fetch_add(1, Ordering::SeqCst);
                });
            }
            for h in &hits {
                assert_eq!(
                    h.load(Ordering::SeqCst),
                    100,
                    "threads={threads} chunks={chunks}"
                );
            }
        }
    }
}

#[test]
fn workers_take_part() {
    let pool = ComputePool::new(2);
    let callers = std::thread::current().id();
    let elsewhere = AtomicUsize::new(0);
    for _ in 0..200 {
        pool.run(16, &|_| {
            std::thread::sleep(Duration::from_micros(50));
            if std::thread::current().id() != callers {
                elsewhere.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    assert!(
        elsewhere.load(Ordering::SeqCst) > 0,
        "the worker never ran a chunk"
    );
}

#[test]
fn blocks_after_spin_and_wakes_again() {
    let pool = ComputePool::with_spin(2, Duration::from_micros(1));
    let count = AtomicUsize::new(0);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(5));
        pool.run(4, &|_| {
            count.fetch_add(1, Ordering::SeqCst);
        });
    }
    assert_eq!(count.load(Ordering::SeqCst), 20);
}

#[test]
fn a_panicking_chunk_reaches_the_caller_and_pool_survives() {
    let pool = ComputePool::new(2);
    for bad in [0, 5] {
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|c| {
                if c == bad {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(8, &|_| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(count.load(Ordering::SeqCst), 8);
    }
}
