//! Client-side adaptive throttling (Google SRE book, "Handling Overload"):
//! [`ThrottleLayer`] counts, per backend, the requests the application made
//! and the ones the backend accepted over a window, and refuses new requests
//! locally with probability `max(0, (requests − K·accepts) / (requests + 1))`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use atscale_core::{BoxError, Clock, Kind};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{ConfigError, Throttled};

/// An answer the throttle can judge: did the backend refuse the work?
///
/// A refusal is what a backend says when it has no capacity: HTTP 429 or
/// 503, gRPC `RESOURCE_EXHAUSTED`, or gRPC `UNAVAILABLE` whose
/// `grpc-status-details-bin` carries the reason `OVERLOADED` (what
/// atscale's ErrorEnrich sends for an overloaded server). Errors are judged
/// by [`Kind::find`]: `Overloaded` and `RateLimited` are refusals.
///
/// Implemented for `http::Response` (tonic `Channel`s and hyper clients).
/// A gRPC status sent in trailers after a body is not seen (refusals are
/// trailers-only responses, so this is rarely a loss).
pub trait Answer {
    /// Whether this answer is the backend refusing work.
    fn is_refusal(&self) -> bool;
}

impl<B> Answer for http::Response<B> {
    fn is_refusal(&self) -> bool {
        let status = self.status().as_u16();
        if status == 429 || status == 503 {
            return true;
        }
        let headers = self.headers();
        match headers.get("grpc-status").map(|v| v.as_bytes()) {
            Some(b"8") => true,
            Some(b"14") => headers
                .get("grpc-status-details-bin")
                .and_then(|v| base64_decode(v.as_bytes()))
                .is_some_and(|details| contains(&details, b"OVERLOADED")),
            _ => false,
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Standard base64, padding optional (gRPC's `-bin` metadata omits it).
fn base64_decode(input: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let input: Vec<u8> = input.iter().copied().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    for chunk in input.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Client-side adaptive throttling for one backend: see the [module docs](self).
///
/// Clones share the counts; use one layer per backend.
///
/// ```
/// use std::time::Duration;
/// use atscale_overload::throttle::ThrottleLayer;
///
/// let throttle = ThrottleLayer::builder()
///     .window(Duration::from_secs(120))
///     .k(2.0)
///     .build()?;
/// assert_eq!(throttle.probability(), 0.0); // nothing refused yet
/// # Ok::<(), atscale_overload::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct ThrottleLayer {
    shared: Arc<Window>,
}

impl fmt::Debug for ThrottleLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (requests, accepts) = self.counts();
        f.debug_struct("ThrottleLayer")
            .field("requests", &requests)
            .field("accepts", &accepts)
            .field("k", &self.shared.k)
            .finish()
    }
}

impl Default for ThrottleLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ThrottleLayer {
    /// K = 2, a 2-minute window.
    pub fn new() -> Self {
        Self::builder().build().expect("the defaults are valid")
    }

    /// Every setting.
    pub fn builder() -> ThrottleBuilder {
        ThrottleBuilder::default()
    }

    /// The requests and accepts counted over the window now.
    pub fn counts(&self) -> (u64, u64) {
        self.shared.counts(self.shared.clock.now_nanos())
    }

    /// The probability a new request is refused locally now.
    pub fn probability(&self) -> f64 {
        let (requests, accepts) = self.counts();
        probability(requests, accepts, self.shared.k)
    }
}

/// `max(0, (requests − k·accepts) / (requests + 1))`.
pub fn probability(requests: u64, accepts: u64, k: f64) -> f64 {
    let requests = requests as f64;
    ((requests - k * accepts as f64) / (requests + 1.0)).max(0.0)
}

impl<S> Layer<S> for ThrottleLayer {
    type Service = Throttle<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Throttle {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Builds a [`ThrottleLayer`].
#[must_use]
#[derive(Debug)]
pub struct ThrottleBuilder {
    window: Duration,
    buckets: u32,
    k: f64,
    clock: Clock,
    seed: Option<u64>,
}

impl Default for ThrottleBuilder {
    fn default() -> Self {
        ThrottleBuilder {
            window: Duration::from_secs(120),
            buckets: 120,
            k: 2.0,
            clock: Clock::default(),
            seed: None,
        }
    }
}

impl ThrottleBuilder {
    /// How far back requests and accepts count (default 2 minutes).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The window's resolution: it slides by `window / buckets` (default 120).
    pub fn buckets(mut self, buckets: u32) -> Self {
        self.buckets = buckets;
        self
    }

    /// K: how many requests per accept are allowed before throttling starts
    /// (default 2; lower is more aggressive; at least 1).
    pub fn k(mut self, k: f64) -> Self {
        self.k = k;
        self
    }

    /// The clock of the window (default [`Clock::quanta`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Seeds the random draws, for reproducible simulations.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks the settings and builds the layer.
    pub fn build(self) -> Result<ThrottleLayer, ConfigError> {
        if !(self.k >= 1.0 && self.k.is_finite()) {
            return Err(ConfigError::new(
                "throttle.k",
                "must be a number at least 1",
            ));
        }
        if self.buckets == 0 {
            return Err(ConfigError::new("throttle.buckets", "must be at least 1"));
        }
        let width = self.window.as_nanos() / u128::from(self.buckets);
        if width == 0 || width > u128::from(u64::MAX) {
            return Err(ConfigError::new(
                "throttle.window",
                "must be positive and split into buckets of at least 1 ns",
            ));
        }
        let seed = self
            .seed
            .unwrap_or_else(|| self.clock.now_nanos() ^ (&self as *const _ as u64));
        Ok(ThrottleLayer {
            shared: Arc::new(Window {
                counts: Mutex::new(Ring {
                    buckets: vec![Bucket::default(); self.buckets as usize],
                    requests: 0,
                    accepts: 0,
                }),
                width: width as u64,
                k: self.k,
                clock: self.clock,
                rng: AtomicU64::new(seed),
            }),
        })
    }
}

#[derive(Debug)]
struct Window {
    counts: Mutex<Ring>,
    width: u64,
    k: f64,
    clock: Clock,
    rng: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    slot: u64,
    requests: u64,
    accepts: u64,
}

/// The window's buckets and their running totals.
#[derive(Debug)]
struct Ring {
    buckets: Vec<Bucket>,
    requests: u64,
    accepts: u64,
}

impl Ring {
    /// The bucket of `slot`, recycling it (and dropping its counts from the
    /// totals) if it held an older slot; also expires every stale bucket.
    fn bucket(&mut self, slot: u64) -> &mut Bucket {
        let n = self.buckets.len() as u64;
        for b in &mut self.buckets {
            if b.slot + n <= slot && (b.requests | b.accepts) != 0 {
                self.requests -= b.requests;
                self.accepts -= b.accepts;
                *b = Bucket::default();
            }
        }
        let b = &mut self.buckets[(slot % n) as usize];
        if b.slot != slot {
            self.requests -= b.requests;
            self.accepts -= b.accepts;
            *b = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        b
    }
}

impl Window {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn counts(&self, now: u64) -> (u64, u64) {
        let mut ring = self.lock();
        ring.bucket(now / self.width);
        (ring.requests, ring.accepts)
    }

    /// Counts a request; returns the probability it must be refused with.
    fn request(&self, now: u64) -> f64 {
        let mut ring = self.lock();
        let (requests, accepts) = (ring.requests, ring.accepts);
        ring.bucket(now / self.width).requests += 1;
        ring.requests += 1;
        probability(requests, accepts, self.k)
    }

    fn accept(&self, now: u64) {
        let mut ring = self.lock();
        ring.bucket(now / self.width).accepts += 1;
        ring.accepts += 1;
    }

    /// A uniform draw in [0, 1) (SplitMix64).
    fn draw(&self) -> f64 {
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The service of [`ThrottleLayer`].
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service; a throttled request fails in
/// `call` with [`Throttled`] without reaching it.
#[derive(Clone, Debug)]
pub struct Throttle<S> {
    inner: S,
    shared: Arc<Window>,
}

impl<S> Throttle<S> {
    atscale_core::inner_accessors!();
}

impl<S, Req> Service<Req> for Throttle<S>
where
    S: Service<Req>,
    S::Response: Answer,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ThrottleFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let p = self.shared.request(self.shared.clock.now_nanos());
        if p > 0.0 && self.shared.draw() < p {
            return ThrottleFuture {
                inner: None,
                throttled: Some(Throttled::new(p)),
                shared: self.shared.clone(),
            };
        }
        ThrottleFuture {
            inner: Some(self.inner.call(req)),
            throttled: None,
            shared: self.shared.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`Throttle`]: counts the backend's accepts.
    pub struct ThrottleFuture<F> {
        #[pin]
        inner: Option<F>,
        throttled: Option<Throttled>,
        shared: Arc<Window>,
    }
}

impl<F> fmt::Debug for ThrottleFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottleFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ThrottleFuture<F>
where
    F: Future<Output = Result<T, E>>,
    T: Answer,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let err = this.throttled.take().expect("polled after completion");
            return Poll::Ready(Err(err.into()));
        };
        let out = ready!(inner.poll(cx)).map_err(Into::into);
        let accepted = match &out {
            Ok(answer) => !answer.is_refusal(),
            // Only refusals count against the backend: other failures (a
            // bug, a dependency, a connection) say nothing about its load.
            Err(e) => !matches!(Kind::find(&**e), Some(Kind::Overloaded | Kind::RateLimited)),
        };
        if accepted {
            this.shared.accept(this.shared.clock.now_nanos());
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        assert_eq!(base64_decode(b"T1ZFUkxPQURFRA").unwrap(), b"OVERLOADED");
        assert_eq!(base64_decode(b"T1ZFUkxPQURFRA==").unwrap(), b"OVERLOADED");
        assert!(base64_decode(b"*").is_none());
    }
}
