//! Loom models of the hedge budget shared by every clone of a hedged
//! service: the real `atscale-hedge/src/budget.rs`, compiled into this test
//! with loom's atomics and mutex (see the `cfg` at the top of that file),
//! explored over every interleaving loom allows. It lives here because the
//! hedge crate's dev-dependencies (tonic, hyper-util) do not build under
//! `--cfg loom` (tokio hides `tokio::net` then); the budget needs nothing
//! but `std`.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p atscale-ratelimit --release --test loom_hedge_budget -- --nocapture`
//!
//! The hedge's choice of a winner needs no model: every attempt of one
//! request is polled by that request's own future, on one task, so the
//! first attempt to answer wins without any shared state.
#![cfg(loom)]
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashSet;
use std::sync::Mutex as StdMutex;

use loom::sync::Arc;
use loom::thread;
use loom_support::model;

mod loom_support;

#[path = "../../atscale-hedge/src/budget.rs"]
mod budget;

use budget::HedgeBudget;

/// A budget of 10 % over windows of 10 requests (one hedge per window), no
/// per-second floor, with `n` requests already arrived.
fn budget(n: u64) -> HedgeBudget {
    let b = HedgeBudget::new(0.1, 0, 10);
    for _ in 0..n {
        b.arrive(|| 0);
    }
    b
}

#[test]
fn racing_hedges_take_at_most_the_window_share() {
    model("racing_hedges_take_at_most_the_window_share", || {
        let b = Arc::new(budget(10));
        let handles: Vec<_> = [8, 9]
            .into_iter()
            .map(|position| {
                let b = b.clone();
                thread::spawn(move || b.try_acquire(position, 0))
            })
            .collect();
        let granted = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&g| g)
            .count();
        assert_eq!(granted, 1, "one hedge per 10 requests");
    });
}

#[test]
fn a_hedge_racing_an_arrival_cannot_borrow_from_requests_to_come() {
    // Nine requests allow no hedge yet (10 % of 9 rounds down); the tenth,
    // arriving while a hedge is asked for, allows one. Whichever comes
    // first, once both are done exactly one hedge has been or can be taken.
    let seen: &'static StdMutex<HashSet<bool>> = Box::leak(Box::default());
    model(
        "a_hedge_racing_an_arrival_cannot_borrow_from_requests_to_come",
        move || {
            let b = Arc::new(budget(9));
            let arriving = {
                let b = b.clone();
                thread::spawn(move || b.arrive(|| 0))
            };
            let hedging = {
                let b = b.clone();
                thread::spawn(move || b.try_acquire(8, 0))
            };
            assert_eq!(arriving.join().unwrap(), 9, "the tenth request's position");
            let in_race = hedging.join().unwrap();
            let after = b.try_acquire(9, 0);
            assert_eq!(
                usize::from(in_race) + usize::from(after),
                1,
                "in the race {in_race}, after it {after}"
            );
            seen.lock().unwrap().insert(in_race);
        },
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "both orders explored: {seen:?}");
}

#[test]
fn racing_arrivals_get_distinct_positions() {
    model("racing_arrivals_get_distinct_positions", || {
        let b = Arc::new(budget(0));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || b.arrive(|| 0))
            })
            .collect();
        let mut positions: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        positions.sort_unstable();
        assert_eq!(positions, [0, 1]);
        assert_eq!(b.arrivals(), 2);
    });
}

#[test]
fn hedges_charged_to_one_window_never_exceed_it_from_three_threads() {
    model(
        "hedges_charged_to_one_window_never_exceed_it_from_three_threads",
        || {
            // 20 requests: windows of 10 positions; two hedges for the first
            // window's requests and one for the second's, asked at once.
            let b = Arc::new(budget(20));
            let handles: Vec<_> = [3, 7, 15]
                .into_iter()
                .map(|position| {
                    let b = b.clone();
                    thread::spawn(move || (position, b.try_acquire(position, 0)))
                })
                .collect();
            let granted: Vec<u64> = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&(_, g)| g)
                .map(|(p, _)| p)
                .collect();
            // Any 10 consecutive positions hold at most one hedge.
            for start in 0..20 {
                let n = granted
                    .iter()
                    .filter(|&&p| p >= start && p < start + 10)
                    .count();
                assert!(n <= 1, "positions {start}..{}: {granted:?}", start + 10);
            }
            assert!(!granted.is_empty());
        },
    );
}
