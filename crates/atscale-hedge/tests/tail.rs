//! The adaptive delay whose percentile follows the budget, on a paused
//! clock: the derived percentile, every hedge of a straggler sent at once,
//! and a slowdown for everyone where each block of requests stays within the
//! budget while the budget still reaches the slowest requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::{Carrier, Context};
use atscale_hedge::{Budget, Clock, Delay, HedgeLayer, HedgeStats, Replay};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

#[derive(Clone, Debug)]
struct Req {
    id: u64,
    cx: Option<Context>,
}

impl Carrier for Req {
    fn context(&self) -> Option<&Context> {
        self.cx.as_ref()
    }
    fn set_context(&mut self, cx: Context) {
        self.cx = Some(cx);
    }
}

impl Replay for Req {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

fn req(id: u64) -> Req {
    Req { id, cx: None }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The latency of call `call` (0: the first attempt) for request `id`.
type Latency = dyn Fn(u64, u32) -> Duration + Send + Sync;

/// A backend that sleeps; it counts the calls per request id and notes when
/// each was made.
#[derive(Clone)]
struct Backend {
    latency: Arc<Latency>,
    calls: Arc<Mutex<Vec<(u64, Instant)>>>,
}

impl Backend {
    fn new(latency: impl Fn(u64, u32) -> Duration + Send + Sync + 'static) -> Self {
        Backend {
            latency: Arc::new(latency),
            calls: Arc::default(),
        }
    }

    /// When each call for `id` was made.
    fn calls_for(&self, id: u64) -> Vec<Instant> {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|c| c.0 == id).map(|c| c.1).collect()
    }
}

impl Service<Req> for Backend {
    type Response = u64;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<u64, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.iter().filter(|c| c.0 == req.id).count();
            calls.push((req.id, Instant::now()));
            n as u32
        };
        let latency = (self.latency)(req.id, call);
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            Ok(req.id)
        })
    }
}

/// An adaptive delay over a long window (nothing rolls off in these tests).
fn adaptive() -> atscale_hedge::Adaptive {
    Delay::adaptive()
        .min_samples(20)
        .window(Duration::from_secs(600))
}

// ---------------------------------------------------------------- the percentile

#[tokio::test(start_paused = true)]
async fn the_percentile_follows_the_budget() {
    // Latencies 1..=256 ms; one attempt each, so nothing but the first
    // attempts feeds the window (recomputed every 128 samples).
    for (ratio, expected) in [(0.05, 250), (0.2, 231), (0.5, 192)] {
        let layer = HedgeLayer::builder()
            .delay(adaptive())
            .budget(Budget::ratio(ratio))
            .max_attempts(1)
            .clock(Clock::tokio())
            .build()
            .unwrap();
        let svc = layer.layer(Backend::new(|id, _| ms(id + 1)));
        for id in 0..256 {
            svc.clone().oneshot(req(id)).await.unwrap();
        }
        // The 1 - ratio / 2 percentile (µs buckets round up, within 3%).
        let d = layer.stats().current_delay().unwrap();
        let want = ms(expected);
        assert!(
            d >= want && d <= want + want / 32,
            "ratio {ratio}: {d:?}, want {want:?}"
        );
    }
}

// ---------------------------------------------------------------- all at once

/// Warms a hedge up with 40 requests of 10 ms (one at a time), then sends
/// request 1000, whose first attempt takes 500 ms and whose copies 20 ms.
async fn one_straggler(delay: atscale_hedge::Adaptive) -> (Backend, HedgeStats, Duration) {
    let backend = Backend::new(|id, call| match (id, call) {
        (1000, 0) => ms(500),
        (1000, _) => ms(20),
        _ => ms(10),
    });
    let layer = HedgeLayer::builder()
        .delay(delay)
        .budget(Budget::ratio(0.5))
        .max_attempts(3)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let svc = layer.layer(backend.clone());
    for id in 0..40 {
        svc.clone().oneshot(req(id)).await.unwrap();
    }
    let d = layer.stats().current_delay().unwrap();
    assert!(d >= ms(10) && d <= ms(10) + ms(10) / 32, "{d:?}");
    let start = Instant::now();
    svc.oneshot(req(1000)).await.unwrap();
    (backend, layer.stats(), start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_straggler_sends_all_its_hedges_at_once() {
    let (backend, stats, took) = one_straggler(adaptive()).await;
    let calls = backend.calls_for(1000);
    assert_eq!(calls.len(), 3);
    // Both copies at the delay (the timer's next millisecond tick), together.
    assert_eq!(calls[1] - calls[0], ms(11));
    assert_eq!(calls[2], calls[1], "the second copy with the first");
    assert_eq!(took, ms(31));
    assert_eq!((stats.hedges_sent(), stats.hedges_won()), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_percentile_set_by_hand_sends_one_hedge_per_delay() {
    // The same percentile (1 - 0.5 / 2), set by hand.
    let (backend, stats, took) = one_straggler(adaptive().percentile(0.75)).await;
    let calls = backend.calls_for(1000);
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[1] - calls[0], ms(11));
    assert_eq!(calls[2] - calls[1], ms(11), "one delay later");
    assert_eq!(took, ms(31));
    assert_eq!((stats.hedges_sent(), stats.hedges_won()), (2, 1));
}

// ---------------------------------------------------------------- a slowdown

const REQUESTS: u64 = 8_000;
/// From this request on, every call is 10 times slower.
const SHIFT: u64 = 4_000;
const BLOCK: u64 = 1_000;
const SLOW: Duration = Duration::from_millis(500);

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) for (request, call, stream).
fn unit(id: u64, call: u32, stream: u64) -> f64 {
    let h = splitmix64(id ^ splitmix64(u64::from(call) ^ (stream << 40)));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// 5-15 ms, 1% of calls 500 ms; everything 10x slower from `SHIFT` on.
fn slowdown(id: u64, call: u32) -> Duration {
    let base = if unit(id, call, 0) < 0.01 {
        SLOW
    } else {
        Duration::from_micros(5_000 + (unit(id, call, 1) * 10_000.0) as u64)
    };
    if id >= SHIFT { base * 10 } else { base }
}

struct Outcome {
    /// Latency per request id.
    latency: Vec<Duration>,
    /// Backend calls per request id.
    calls: Vec<u32>,
}

/// 16 clients in a closed loop, each taking the next request id. Warm-up
/// requests (ids from `REQUESTS` on, as fast as before the shift) run first.
async fn run(delay: atscale_hedge::Adaptive) -> Outcome {
    let backend = Backend::new(|id, call| slowdown(id.min(SHIFT - 1), call));
    let measured = Backend::new(slowdown);
    let layer = HedgeLayer::builder()
        .delay(delay.min_samples(100).window(Duration::from_secs(2)))
        .budget(Budget::ratio(0.05))
        .max_attempts(3)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    // Warm up on another backend (fast, as before the shift).
    let warm = layer.layer(backend);
    for id in REQUESTS..REQUESTS + 1_000 {
        warm.clone().oneshot(req(id)).await.unwrap();
    }
    let svc = layer.layer(measured.clone());
    let next = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(vec![Duration::ZERO; REQUESTS as usize]));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (svc, next, latency) = (svc.clone(), next.clone(), latency.clone());
            tokio::spawn(async move {
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    if id >= REQUESTS {
                        return;
                    }
                    let start = Instant::now();
                    svc.clone().oneshot(req(id)).await.unwrap();
                    latency.lock().unwrap()[id as usize] = start.elapsed();
                }
            })
        })
        .collect();
    for c in clients {
        tokio::time::timeout(Duration::from_secs(3_600), c)
            .await
            .expect("the run ends")
            .unwrap();
    }
    let calls = measured.calls.lock().unwrap();
    let mut per_id = vec![0u32; REQUESTS as usize];
    for (id, _) in calls.iter() {
        per_id[*id as usize] += 1;
    }
    let latency = latency.lock().unwrap().clone();
    Outcome {
        latency,
        calls: per_id,
    }
}

impl Outcome {
    /// Extra load per block of `BLOCK` request ids.
    fn extra_per_block(&self) -> Vec<f64> {
        self.calls
            .chunks(BLOCK as usize)
            .map(|b| b.iter().map(|&c| f64::from(c)).sum::<f64>() / b.len() as f64 - 1.0)
            .collect()
    }

    /// How many requests after the shift took longer than `limit`.
    fn slower_than(&self, limit: Duration) -> usize {
        self.latency[SHIFT as usize..]
            .iter()
            .filter(|&&l| l > limit)
            .count()
    }
}

#[tokio::test(start_paused = true)]
async fn in_a_slowdown_the_budget_reaches_the_slowest() {
    // The slow first attempts after the shift (5 s each).
    let stragglers = (SHIFT..REQUESTS)
        .filter(|&id| slowdown(id, 0) > ms(2_000))
        .count();
    assert!((30..=50).contains(&stragglers), "{stragglers}");

    let derived = run(adaptive()).await;
    let by_hand = run(adaptive().percentile(0.9)).await;

    for (name, run) in [("derived", &derived), ("p90", &by_hand)] {
        let blocks = run.extra_per_block();
        assert!(
            blocks.iter().all(|&e| e <= 0.05 + 1e-9),
            "{name}: extra per block {blocks:?}"
        );
    }
    // At 0.9, more requests ask than the budget allows after the shift, the
    // first to ask take it, and most stragglers wait out their 5 s.
    eprintln!(
        "stragglers {stragglers}; derived: {} over 2 s, {} over 330 ms, {} over 300 ms, blocks {:?}; p90: {} over 2 s, blocks {:?}",
        derived.slower_than(ms(2_000)),
        derived.slower_than(ms(330)),
        derived.slower_than(ms(300)),
        derived.extra_per_block(),
        by_hand.slower_than(ms(2_000)),
        by_hand.extra_per_block()
    );
    assert!(
        by_hand.slower_than(ms(2_000)) >= stragglers / 3,
        "p90: {} of {stragglers} stragglers unhedged",
        by_hand.slower_than(ms(2_000))
    );
    // Following the budget, nearly every straggler gets its hedges (a few
    // right at the shift may not), both at once: a copy ends by the delay
    // (about 150 ms) + 150 ms.
    let unhedged = derived.slower_than(ms(2_000));
    assert!(unhedged <= 3, "derived: {unhedged} stragglers unhedged");
    assert!(
        derived.slower_than(ms(330)) <= 4,
        "derived: {} requests over 330 ms",
        derived.slower_than(ms(330))
    );
}
