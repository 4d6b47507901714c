use super::*;
use std::sync::atomic::AtomicUsize;

#[test]
fn every_part_runs_once_per_call() {
    for threads in [1, 2, 3] {
        let pool = ComputePool::new(threads);
        let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..200 {
            pool.run(&|part, parts| {
                assert_eq!(parts, threads);
                hits[part].fetch_add(1, Ordering::SeqCst);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::SeqCst), 200);
        }
    }
}

#[test]
fn blocks_after_spin_and_wakes_again() {
    let pool = ComputePool::with_spin(2, Duration::from_micros(1));
    let count = AtomicUsize::new(0);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(5));
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::SeqCst);
        });
    }
    assert_eq!(count.load(Ordering::SeqCst), 10);
}

#[test]
fn worker_panic_reaches_the_caller_and_pool_survives() {
    let pool = ComputePool::new(2);
    let r = catch_unwind(AssertUnwindSafe(|| {
        pool.run(&|part, _| {
            if part == 1 {
                panic!("boom");
            }
        })
    }));
    assert!(r.is_err());
    let count = AtomicUsize::new(0);
    pool.run(&|_, _| {
        count.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(count.load(Ordering::SeqCst), 2);
}
