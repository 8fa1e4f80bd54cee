//! Loom models of the buckets' shared state: the real `src/gcra.rs`,
//! compiled into this test with loom's atomics and mutex (see the `cfg`
//! at the top of that file), explored over every interleaving loom allows.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p atscale-ratelimit --release --test loom_gcra`
//!
//! - two single-bucket reservations race (CAS): exactly the burst is admitted;
//! - a reservation refunded while another is made: the other's slot is
//!   never given away, and the refund takes effect exactly when it is the tail;
//! - two refunds of a run of reservations race: the whole run is given back;
//! - a multi-bucket reservation (lock by exchange, in a global order) races
//!   a single-bucket one: all or none, never more than a burst;
//! - the no-wait path over several buckets races a single-bucket one: same;
//! - a refund races a multi-bucket lock holding the same bucket.
//!
//! Not modelled: two multi-bucket reservations contending for the same
//! bucket lock. loom never ends that execution, whatever the preemption
//! bound (tried: `LOOM_MAX_PREEMPTIONS` 1 and 2, `LOOM_MAX_BRANCHES`
//! 20 000): once the holder has released the bucket, the waiter's loads in
//! `Bucket::lock` keep returning `LOCKED` (its own exchange's value) and it
//! spins until loom gives up ("Model exceeded maximum number of
//! branches"). It is the execution itself that is endless, not the number
//! of interleavings, so no bound helps. Two overlapping sets are covered
//! by the threaded stress test in `src/gcra.rs`
//! (`overlapping_sets_on_many_threads_neither_deadlock_nor_overspend`) and
//! the proptest against the reference model.
#![cfg(loom)]
#![allow(dead_code, unreachable_pub, missing_docs)]

use loom::sync::Arc;
use loom::thread;
use loom_support::model;

mod loom_support;

/// What `gcra.rs` needs of `crate::limit::Limit`: the interval and burst.
mod limit {
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Limit {
        pub(crate) interval: u64,
        pub(crate) burst: u32,
    }

    impl Limit {
        pub(crate) const fn interval_nanos(&self) -> u64 {
            self.interval
        }
        pub(crate) const fn capacity_nanos(&self) -> u64 {
            self.interval * self.burst as u64
        }
        pub(crate) const fn max_burst(&self) -> u32 {
            self.burst
        }
    }
}

mod error {
    pub(crate) use atscale_ratelimit::InsufficientCapacity;
}

const MAX_LIMITS: usize = atscale_ratelimit::MAX_LIMITS;

#[path = "../src/gcra.rs"]
mod gcra;

use gcra::{Bucket, Refused, Taken, acquire_all, try_acquire_sorted};
use limit::Limit;

const T: u64 = 10; // interval
const NOW: u64 = 1_000;

fn bucket(burst: u32) -> Bucket {
    Bucket::new(&Limit { interval: T, burst })
}

#[test]
fn racing_reservations_admit_exactly_the_burst() {
    model("racing_reservations_admit_exactly_the_burst", || {
        let b = Arc::new(bucket(1));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || b.acquire(NOW, 1, 0).is_ok())
            })
            .collect();
        let admitted = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert_eq!(admitted, 1);
        assert_eq!(b.tat(), NOW + T);
    });
}

#[test]
fn racing_reservations_with_waits_queue_without_losing_a_slot() {
    model(
        "racing_reservations_with_waits_queue_without_losing_a_slot",
        || {
            let b = Arc::new(bucket(1));
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let b = b.clone();
                    thread::spawn(move || b.acquire(NOW, 1, u64::MAX).unwrap())
                })
                .collect();
            let mut waits: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap().0).collect();
            waits.sort_unstable();
            assert_eq!(waits, [0, T]);
            assert_eq!(b.tat(), NOW + 2 * T);
        },
    );
}

#[test]
fn a_refund_racing_a_reservation_never_gives_the_other_slot_away() {
    model(
        "a_refund_racing_a_reservation_never_gives_the_other_slot_away",
        || {
            let b = Arc::new(bucket(1));
            // A is reserved first (admitted now); B waits behind it.
            b.acquire(NOW, 1, 0).unwrap();
            let (_, taken_b) = b.acquire(NOW, 1, u64::MAX).unwrap();
            assert_eq!(taken_b.new, NOW + 2 * T);
            let b1 = b.clone();
            let refund = thread::spawn(move || b1.refund(taken_b, NOW));
            let b2 = b.clone();
            let racer = thread::spawn(move || b2.acquire(NOW, 1, u64::MAX).unwrap());
            refund.join().unwrap();
            let (wait, taken_c) = racer.join().unwrap();
            if taken_c.old == taken_b.new {
                // C reserved behind B: B's slot stays spent, C keeps its time.
                assert_eq!(wait, 2 * T);
                assert_eq!(b.tat(), NOW + 3 * T);
            } else {
                // C came after B's refund: it takes B's place.
                assert_eq!(taken_c.old, NOW + T);
                assert_eq!(wait, T);
                assert_eq!(b.tat(), NOW + 2 * T);
            }
            // C's reservation is never lost.
            assert_eq!(b.tat(), taken_c.new);
        },
    );
}

#[test]
fn racing_refunds_of_a_run_give_the_whole_run_back() {
    model("racing_refunds_of_a_run_give_the_whole_run_back", || {
        let b = Arc::new(bucket(1));
        let (_, first) = b.acquire(NOW, 1, 0).unwrap();
        let (_, second) = b.acquire(NOW, 1, u64::MAX).unwrap();
        let (_, third) = b.acquire(NOW, 1, u64::MAX).unwrap();
        let handles: Vec<_> = [second, third]
            .into_iter()
            .map(|t| {
                let b = b.clone();
                thread::spawn(move || b.refund(t, NOW))
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(b.tat(), first.new, "both waiters left: both slots back");
    });
}

/// Reserves 1 in each of `set` (indices into `buckets`), all or none, with
/// the layer's locking order (ascending index).
fn reserve_all(buckets: &[Bucket; 2], set: &[usize], max_wait: u64) -> Result<u64, Refused> {
    let refs: Vec<&Bucket> = set.iter().map(|&i| &buckets[i]).collect();
    let mut order: Vec<usize> = (0..set.len()).collect();
    order.sort_by_key(|&i| set[i]);
    let costs = vec![1; set.len()];
    let mut taken = vec![Taken { old: 0, new: 0 }; set.len()];
    acquire_all(&refs, &costs, &order, NOW, max_wait, &mut taken)
}

#[test]
fn a_multi_bucket_reservation_refused_takes_nothing() {
    model("a_multi_bucket_reservation_refused_takes_nothing", || {
        let buckets = Arc::new([bucket(1), bucket(1)]);
        let both = {
            let b = buckets.clone();
            thread::spawn(move || reserve_all(&b, &[0, 1], 0).is_ok())
        };
        let single = {
            let b = buckets.clone();
            thread::spawn(move || b[1].acquire(NOW, 1, 0).is_ok())
        };
        let (both, single) = (both.join().unwrap(), single.join().unwrap());
        // Bucket 1 holds one token: exactly one of the two got it, and the
        // set, if refused, took nothing from bucket 0 either.
        assert!(both ^ single);
        assert_eq!(buckets[0].tat(), if both { NOW + T } else { 0 });
        assert_eq!(buckets[1].tat(), NOW + T);
    });
}

#[test]
fn the_lean_no_wait_path_is_all_or_nothing_too() {
    model("the_lean_no_wait_path_is_all_or_nothing_too", || {
        let buckets = Arc::new([bucket(1), bucket(2)]);
        let lean = {
            let b = buckets.clone();
            thread::spawn(move || try_acquire_sorted(&b[..], |x| x, 1, NOW).is_ok())
        };
        let other = {
            let b = buckets.clone();
            thread::spawn(move || b[0].acquire(NOW, 1, 0).is_ok())
        };
        let (lean, other) = (lean.join().unwrap(), other.join().unwrap());
        assert!(lean ^ other, "bucket 0 has one token: exactly one of them");
        assert_eq!(buckets[0].tat(), NOW + T);
        assert_eq!(buckets[1].tat(), if lean { NOW + T } else { 0 });
    });
}

#[test]
fn a_refund_waits_out_a_multi_bucket_lock() {
    model("a_refund_waits_out_a_multi_bucket_lock", || {
        let buckets = Arc::new([bucket(1), bucket(1)]);
        // A waiter holds a reservation in bucket 0 only.
        buckets[0].acquire(NOW, 1, 0).unwrap();
        let (_, waiter) = buckets[0].acquire(NOW, 1, u64::MAX).unwrap();
        let refund = {
            let b = buckets.clone();
            thread::spawn(move || b[0].refund(waiter, NOW))
        };
        let multi = {
            let b = buckets.clone();
            thread::spawn(move || reserve_all(&b, &[0, 1], u64::MAX).unwrap())
        };
        refund.join().unwrap();
        let wait = multi.join().unwrap();
        // Either the refund came first (the set takes the waiter's place) or
        // the set reserved behind the waiter (whose slot then stays spent).
        match wait {
            w if w == T => assert_eq!(buckets[0].tat(), NOW + 2 * T),
            w if w == 2 * T => assert_eq!(buckets[0].tat(), NOW + 3 * T),
            w => panic!("wait {w}"),
        }
        // Bucket 1 was fresh: it records the set at the common admission time.
        assert_eq!(buckets[1].tat(), NOW + wait + T);
    });
}
