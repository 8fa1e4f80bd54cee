//! Each limit algorithm's response to a change of latency, on tokio's paused
//! clock: the limit goes down while the backend queues, back up after.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use atscale_core::Clock;
use atscale_overload::OverloadLayer;
use atscale_overload::limit::{Aimd, Algorithm, Gradient2, Sample, Vegas};
use tokio::sync::Semaphore;
use tower::{Layer, ServiceExt, service_fn};

const MS: Duration = Duration::from_millis(1);

/// A layer running `algorithm` on tokio's clock, its limit in 1..=200 from 20.
fn layer_with(algorithm: impl Algorithm) -> OverloadLayer {
    OverloadLayer::builder()
        .algorithm(algorithm)
        .min_limit(1)
        .max_limit(200)
        .initial_limit(20)
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

/// `n` closed-loop clients of `svc`, each sending its next request when
/// the last one answers, until [`Clients::stop`].
struct Clients {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    fn start<S>(svc: S, n: usize) -> Self
    where
        S: tower::Service<http::Request<()>> + Clone + Send + 'static,
        S::Future: Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|_| {
                let (svc, stop) = (svc.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = svc.clone().oneshot(http::Request::new(())).await;
                    }
                })
            })
            .collect();
        Clients { stop, tasks }
    }

    /// Stops them and waits (bounded) until each has.
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("clients stop")
                .unwrap();
        }
    }
}

/// Runs 300 closed-loop clients (more than the maximum limit, 200) for three 3-second phases: a backend that
/// takes 10 ms whatever the concurrency, then one with 4 workers (so every
/// request beyond 4 queues inside it), then the first again. Returns the
/// mean limit over the last 1.5 s of each phase.
async fn phases(algorithm: impl Algorithm) -> [f64; 3] {
    let layer = layer_with(algorithm);
    let adm = layer.admission();
    let narrow = Arc::new(AtomicBool::new(false));
    let workers = Arc::new(Semaphore::new(4));
    let backend = {
        let narrow = narrow.clone();
        service_fn(move |_req: http::Request<()>| {
            let narrow = narrow.load(Ordering::Relaxed);
            let workers = workers.clone();
            async move {
                let _worker = if narrow {
                    Some(workers.acquire_owned().await.unwrap())
                } else {
                    None
                };
                tokio::time::sleep(10 * MS).await;
                Ok::<_, std::convert::Infallible>(())
            }
        })
    };
    let clients = Clients::start(layer.layer(backend), 300);
    let mut means = [0.0; 3];
    for (phase, mean) in means.iter_mut().enumerate() {
        narrow.store(phase == 1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut sum = 0usize;
        for _ in 0..150 {
            tokio::time::sleep(10 * MS).await;
            sum += adm.limit();
        }
        *mean = sum as f64 / 150.0;
    }
    clients.stop().await;
    assert_eq!((adm.in_flight(), adm.queue_depth()), (0, 0));
    means
}

fn assert_down_then_up(name: &str, [fast, queueing, recovered]: [f64; 3]) {
    println!("{name}: {fast:.1} -> {queueing:.1} -> {recovered:.1}");
    assert!(
        queueing < fast / 2.0,
        "{name}: the limit did not go down under queueing: {fast:.1} -> {queueing:.1}"
    );
    assert!(
        recovered > queueing * 2.0,
        "{name}: the limit did not come back: {queueing:.1} -> {recovered:.1}"
    );
}

#[tokio::test(start_paused = true)]
async fn gradient2_goes_down_under_queueing_and_back_up_after() {
    assert_down_then_up("gradient2", phases(Gradient2::new()).await);
}

#[tokio::test(start_paused = true)]
async fn vegas_goes_down_under_queueing_and_back_up_after() {
    assert_down_then_up("vegas", phases(Vegas::new()).await);
}

#[tokio::test(start_paused = true)]
async fn aimd_goes_down_under_queueing_and_back_up_after() {
    assert_down_then_up("aimd", phases(Aimd::new().latency(50 * MS)).await);
}

#[test]
fn gradient2_on_exact_samples() {
    let mut g = Gradient2::new();
    // Same latency: gradient 1, the limit grows by the queue allowance × smoothing.
    let steady = Sample::new(10 * MS, 20, false);
    let limit = g.update(20.0, &steady);
    assert!((limit - 20.8).abs() < 1e-9, "{limit}");
    // App-limited (fewer than half in use): unchanged.
    assert_eq!(g.update(20.0, &Sample::new(10 * MS, 5, false)), 20.0);
    // Four times slower than the long average: gradient 0.5.
    let mut g = Gradient2::new();
    for _ in 0..10 {
        g.update(20.0, &steady);
    }
    let slow = g.update(20.0, &Sample::new(40 * MS, 20, false));
    // long ≈ (10×10 + 40)/11 = 12.7 ms; 1.5 × 12.7 / 40 < 0.5 → 0.5:
    // 20 × 0.8 + (20 × 0.5 + 4) × 0.2 = 18.8
    assert!((slow - 18.8).abs() < 1e-9, "{slow}");
}

#[test]
fn aimd_on_exact_samples() {
    let mut a = Aimd::new().latency(50 * MS);
    assert_eq!(a.update(10.0, &Sample::new(10 * MS, 10, false)), 11.0);
    assert_eq!(a.update(10.0, &Sample::new(10 * MS, 2, false)), 10.0);
    assert_eq!(a.update(10.0, &Sample::new(60 * MS, 10, false)), 9.0);
    assert_eq!(a.update(10.0, &Sample::new(10 * MS, 10, true)), 9.0);
}

#[test]
fn vegas_probes_its_minimum_at_half_the_limit_then_restores_it() {
    let mut v = Vegas::new().probe(1);
    let at = |ms: u32, n: usize| Sample::new(ms * MS, n, false);
    // The first sample sets the minimum (10 ms) and leaves the limit alone.
    assert_eq!(v.update(10.0, &at(10, 10)), 10.0);
    // Samples at 10 ms: no queue, the limit grows (to the layer's maximum,
    // 20), until `probe × limit` samples have been seen: then a probe starts
    // at half the limit.
    let (mut limit, mut seen, mut probing) = (10.0, 1, None);
    for _ in 0..1_000 {
        let next = v.update(limit, &at(10, limit as usize));
        seen += 1;
        if next < limit {
            probing = Some(next);
            break;
        }
        limit = next.min(20.0); // the layer's maximum
    }
    let probing = probing.expect("a probe starts");
    assert!(limit > 10.0 && seen as f64 > limit, "{limit} after {seen}");
    assert_eq!(probing, (limit / 2.0).floor());
    // Samples admitted above the probed limit do not count, nor end it.
    assert_eq!(v.update(probing, &at(40, limit as usize)), probing);
    // Samples admitted at or under it measure the new minimum (20 ms); after
    // `probing` of them the limit comes back.
    for _ in 0..probing as usize - 1 {
        assert_eq!(v.update(probing, &at(20, probing as usize)), probing);
    }
    assert_eq!(v.update(probing, &at(20, probing as usize)), limit);
    // 20 ms is now no queue at all: the limit grows again.
    assert!(v.update(limit, &at(20, limit as usize)) > limit);
}

#[test]
fn vegas_grows_only_on_requests_admitted_under_the_current_limit() {
    let mut v = Vegas::new();
    let at = |ms: u32, under: usize| Sample::new(ms * MS, 20, false).with_limit(under);
    // The first sample sets the minimum (10 ms) and leaves the limit alone.
    assert_eq!(v.update(20.0, &at(10, 20)), 20.0);
    // No queue: + beta (6 × log10(20)).
    let grown = v.update(20.0, &at(10, 20));
    assert!(
        (grown - (20.0 + 6.0 * 20f64.log10())).abs() < 1e-9,
        "{grown}"
    );
    // Another answer admitted under 20 says nothing about 27: unchanged.
    assert_eq!(v.update(grown, &at(10, 20)), grown);
    // One admitted under the new limit grows it again.
    assert!(v.update(grown, &at(10, grown as usize)) > grown);
    // A stale one that shows queueing still shrinks it (by log10(limit)).
    let shrunk = v.update(grown, &at(40, 20));
    assert!((shrunk - (grown - grown.log10())).abs() < 1e-9, "{shrunk}");
    // A sample whose limit is unknown (`Sample::new` alone) may grow it.
    assert!(v.update(grown, &Sample::new(10 * MS, 20, false)) > grown);
}

#[test]
fn vegas_does_not_count_latency_under_its_tolerance_as_queueing() {
    let at = |ms: u32| Sample::new(ms * MS, 20, false).with_limit(20);
    // Minimum 1 ms, then 4 ms: four times the minimum, under 5 ms.
    let mut v = Vegas::new();
    assert_eq!(v.update(20.0, &at(1)), 20.0);
    assert!(v.update(20.0, &at(4)) > 20.0, "no queue: grows");
    // Without the tolerance (Netflix's): a queue of 15 of 20, it shrinks.
    let mut v = Vegas::new().tolerance(Duration::ZERO);
    assert_eq!(v.update(20.0, &at(1)), 20.0);
    assert!(v.update(20.0, &at(4)) < 20.0, "a queue: shrinks");
    // Over the tolerance, queueing counts: 20 ms against 5 ms.
    let mut v = Vegas::new();
    assert_eq!(v.update(20.0, &at(1)), 20.0);
    assert!(v.update(20.0, &at(20)) < 20.0);
}

#[test]
fn vegas_decays_a_limit_far_above_the_use_toward_twice_the_use() {
    let at = |n: usize| Sample::new(10 * MS, n, false).with_limit(40);
    // Minimum 10 ms; then answers at 10 ms with one request in flight: the
    // limit of 40 was never used, it decays to twice the use plus beta.
    let mut v = Vegas::new();
    assert_eq!(v.update(40.0, &at(1)), 40.0);
    let mut limit = 40.0;
    for _ in 0..200 {
        limit = v.update(limit, &at(1));
    }
    let floor = 2.0 + 6.0 * limit.log10().max(1.0);
    assert!(
        (limit - floor).abs() < 1.0,
        "{limit} (twice the use + beta: {floor})"
    );
    // Half of it in use: not app-limited, no queue, it grows.
    let mut v = Vegas::new();
    assert_eq!(v.update(40.0, &at(20)), 40.0);
    assert!(v.update(40.0, &at(20)) > 40.0);
    // A round that used 30 keeps the limit while fewer are in flight.
    let mut v = Vegas::new();
    assert_eq!(v.update(40.0, &at(30)), 40.0);
    assert_eq!(v.update(40.0, &at(30)).min(40.0), 40.0);
    for _ in 0..10 {
        assert_eq!(v.update(40.0, &at(5)), 40.0);
    }
}

#[test]
fn a_much_lower_minimum_latency_forgets_what_the_queued_answers_had_in_flight() {
    let at = |ms: u32, n: usize| Sample::new(ms * MS, n, false).with_limit(27);
    let mut v = Vegas::new();
    // A cold start: the first answers were already queued (90 ms, 20 in flight).
    assert_eq!(v.update(27.0, &at(90, 20)), 27.0);
    v.update(27.0, &at(95, 20));
    // Then one alone takes 5 ms: a new minimum, far lower.
    assert_eq!(v.update(27.0, &at(5, 1)), 27.0);
    // The 20 in flight before were a queue, not a use of the limit: the
    // next answer alone in flight already brings the limit down.
    assert!(v.update(27.0, &at(5, 1)) < 27.0);
}

#[test]
fn vegas_halves_at_most_on_the_answers_of_one_round_of_admissions() {
    // Minimum 10 ms at a limit of 100; then the whole process stalls for
    // 200 ms: the 60 requests in flight, all admitted under 100, answer late
    // together. Each would cut by log10(100) = 2: to the minimum. They halve
    // the limit at most.
    let at = |ms: u32, under: usize| Sample::new(ms * MS, 60, false).with_limit(under);
    let mut v = Vegas::new().probe(1000);
    let mut limit = 100.0;
    assert_eq!(v.update(limit, &at(10, 100)), 100.0);
    for _ in 0..60 {
        limit = v.update(limit, &at(210, 100));
    }
    assert_eq!(limit, 50.0);
    // Answers admitted after the cut that still show queueing cut again,
    // as far as half of their own admission limit.
    for _ in 0..60 {
        limit = v.update(limit, &at(210, 50));
    }
    assert_eq!(limit, 25.0);
    // Dropped answers are held to the same bound.
    let dropped = Sample::new(210 * MS, 20, true).with_limit(25);
    for _ in 0..20 {
        limit = v.update(limit, &dropped);
    }
    assert_eq!(limit, 12.5);
    // Without a known admission limit every answer cuts.
    let unknown = Sample::new(210 * MS, 60, false);
    assert_eq!(v.update(40.0, &unknown), 40.0 - 40f64.log10());
}

/// 30 closed-loop clients on a backend that answers in 10 ms whatever the
/// concurrency; after 3 s the whole process stalls for 200 ms (every
/// request in flight answers 200 ms late), then runs as before. Returns the
/// limit before the stall, the lowest limit and the deepest queue in the
/// second after it.
async fn stall(algorithm: impl Algorithm) -> (usize, usize, usize) {
    let layer = layer_with(algorithm);
    let adm = layer.admission();
    let stalled = Arc::new(tokio::sync::RwLock::new(()));
    let backend = {
        let stalled = stalled.clone();
        service_fn(move |_req: http::Request<()>| {
            let stalled = stalled.clone();
            async move {
                tokio::time::sleep(10 * MS).await;
                // Held while the process "stalls".
                drop(stalled.read().await);
                Ok::<_, std::convert::Infallible>(())
            }
        })
    };
    let clients = Clients::start(layer.layer(backend), 30);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = adm.limit();
    let guard = stalled.write().await;
    tokio::time::sleep(200 * MS).await;
    drop(guard);
    let (mut lowest, mut deepest) = (usize::MAX, 0);
    for _ in 0..1000 {
        tokio::task::yield_now().await;
        lowest = lowest.min(adm.limit());
        deepest = deepest.max(adm.queue_depth());
        tokio::time::sleep(MS).await;
    }
    clients.stop().await;
    (before, lowest, deepest)
}

#[tokio::test(start_paused = true)]
async fn vegas_keeps_room_for_the_load_after_a_stall_of_the_whole_process() {
    // No probe of the minimum latency in this window (it halves the limit
    // on purpose).
    let (before, lowest, deepest) = stall(Vegas::new().probe(1000)).await;
    println!(
        "vegas: limit {before} before the stall, lowest {lowest} after, deepest queue {deepest}"
    );
    assert!(
        before >= 60,
        "the limit had room for 30 in flight: {before}"
    );
    assert!(
        lowest >= 30,
        "the limit fell under the load after a stall: {lowest}"
    );
    assert_eq!(
        deepest, 0,
        "requests waited after a stall where nothing queued"
    );
}
