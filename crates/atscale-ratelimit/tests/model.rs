//! The layer against a reference model, on tokio's paused clock: random
//! calls (wait or reject mode, on one limiter or both at once), waiters
//! dropped mid-wait, and the clock moving. Every admission time, refusal
//! and retry-after must be the model's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use atscale_core::{BoxError, RateLimited, find};
use atscale_ratelimit::{Clock, InsufficientCapacity, Limit, Limiter, RateLimitLayer};
use proptest::prelude::*;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn, util::BoxCloneSyncService};

type Req = http::Request<(usize, u32)>; // (call id, cost)
type Svc = BoxCloneSyncService<Req, (), BoxError>;

const MS: u64 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Status {
    Waiting,
    Admitted,
    Cancelled,
}

/// Per bucket, the reservations in the order made; a bucket's state is the
/// replay of those not forgotten; a cancelled one is forgotten once all
/// after it in that bucket are forgotten.
struct Model {
    limits: Vec<(u64, u32)>, // (interval in ms, burst)
    lists: Vec<Vec<(usize, u64, u32)>>,
    status: Vec<Status>,
    at: Vec<u64>,
}

impl Model {
    fn tat(&self, b: usize) -> u64 {
        let t = self.limits[b].0;
        self.lists[b]
            .iter()
            .fold(0, |tat, &(_, a, c)| tat.max(a) + u64::from(c) * t)
    }

    /// The earliest admission for `cost` in `buckets` at `now`, if it fits.
    fn admission(&self, buckets: &[usize], cost: u32, now: u64) -> Option<u64> {
        let mut at = now;
        for &b in buckets {
            let (t, burst) = self.limits[b];
            if cost > burst {
                return None;
            }
            at = at.max(self.tat(b).saturating_sub(u64::from(burst - cost) * t));
        }
        Some(at)
    }

    fn forget(&mut self) {
        for list in &mut self.lists {
            while list
                .last()
                .is_some_and(|&(id, _, _)| self.status[id] == Status::Cancelled)
            {
                list.pop();
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Call { set: usize, reject: bool, cost: u32 },
    Drop(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0usize..3, any::<bool>(), 1u32..4).prop_map(|(set, reject, cost)| Op::Call { set, reject, cost }),
        2 => any::<usize>().prop_map(Op::Drop),
        3 => (0u64..25).prop_map(Op::Advance),
    ]
}

const SETS: [&[usize]; 3] = [&[0], &[1], &[0, 1]];

async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

async fn run(limits: Vec<(u64, u32)>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let clock = Clock::tokio();
    let start = Instant::now();
    let limiters: Vec<Limiter> = limits
        .iter()
        .map(|&(t, b)| {
            let limit = Limit::new(1, Duration::from_millis(t))
                .unwrap()
                .burst(b)
                .unwrap();
            Limiter::with_clock(limit, clock.clone())
        })
        .collect();
    let called: Arc<Mutex<Vec<(usize, u64)>>> = Arc::default();
    let inner = {
        let called = called.clone();
        service_fn(move |req: Req| {
            let at = start.elapsed().as_nanos() as u64;
            called.lock().unwrap().push((req.body().0, at));
            async { Ok::<_, BoxError>(()) }
        })
    };
    // wait and reject services for each set
    let mut services: Vec<[Svc; 2]> = Vec::new();
    for set in SETS {
        let make = |reject: bool| {
            let mut b = RateLimitLayer::builder().max_waiters(10_000);
            for &i in set {
                b = b.limiter(limiters[i].clone());
            }
            let b = b.cost_fn(|r: &Req| r.body().1);
            let b = if reject { b.reject() } else { b };
            BoxCloneSyncService::new(b.build().unwrap().layer(inner.clone()))
        };
        services.push([make(false), make(true)]);
    }

    let mut model = Model {
        lists: vec![Vec::new(); limits.len()],
        limits,
        status: Vec::new(),
        at: Vec::new(),
    };
    let mut tasks: Vec<Option<JoinHandle<Result<(), BoxError>>>> = Vec::new();
    let mut now = 0u64;

    for op in ops {
        match op {
            Op::Call { set, reject, cost } => {
                let id = model.status.len();
                let expect = model.admission(SETS[set], cost, now);
                let svc = &mut services[set][usize::from(reject)];
                let fut = svc
                    .ready()
                    .await
                    .unwrap()
                    .call(http::Request::new((id, cost)));
                model.status.push(Status::Cancelled);
                model.at.push(0);
                tasks.push(None);
                let Some(at) = expect else {
                    let err = fut.await.unwrap_err();
                    prop_assert!(find::<InsufficientCapacity>(&*err).is_some(), "{err}");
                    continue;
                };
                if reject && at > now {
                    let err = fut.await.unwrap_err();
                    let retry = find::<RateLimited>(&*err).map(RateLimited::retry_after);
                    prop_assert_eq!(retry, Some(Duration::from_nanos((at - now) * MS)));
                    continue;
                }
                for &b in SETS[set] {
                    model.lists[b].push((id, at, cost));
                }
                model.at[id] = at;
                model.status[id] = if at == now {
                    Status::Admitted
                } else {
                    Status::Waiting
                };
                tasks[id] = Some(tokio::spawn(fut));
                settle().await;
            }
            Op::Drop(i) => {
                let waiting: Vec<usize> = (0..model.status.len())
                    .filter(|&id| model.status[id] == Status::Waiting && model.at[id] > now)
                    .collect();
                if waiting.is_empty() {
                    continue;
                }
                let id = waiting[i % waiting.len()];
                let task = tasks[id].take().unwrap();
                task.abort();
                prop_assert!(task.await.unwrap_err().is_cancelled());
                model.status[id] = Status::Cancelled;
                model.forget();
            }
            Op::Advance(ms) => {
                // a millisecond at a time, so that every waiter runs at its instant
                for _ in 0..ms {
                    tokio::time::advance(Duration::from_millis(1)).await;
                    now += 1;
                    settle().await;
                }
                for id in 0..model.status.len() {
                    if model.status[id] == Status::Waiting && model.at[id] <= now {
                        model.status[id] = Status::Admitted;
                    }
                }
            }
        }
    }
    // Let every waiter through, then compare every admission.
    let last = model.at.iter().copied().max().unwrap_or(0);
    while now < last {
        tokio::time::advance(Duration::from_millis(1)).await;
        now += 1;
        settle().await;
    }
    for task in tasks.into_iter().flatten() {
        task.await.unwrap().unwrap();
    }
    let mut got = called.lock().unwrap().clone();
    got.sort_unstable();
    let want: Vec<(usize, u64)> = (0..model.status.len())
        .filter(|&id| matches!(model.status[id], Status::Waiting | Status::Admitted))
        .map(|id| (id, model.at[id] * MS))
        .collect();
    prop_assert_eq!(got, want);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_layer_agrees_with_the_model(
        limits in prop::collection::vec((1u64..8, 1u32..4), 2),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(limits, ops))?;
    }
}
