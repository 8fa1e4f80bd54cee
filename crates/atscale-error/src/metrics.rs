//! ErrorEnrich's metrics and the per-request span (the `metrics` feature);
//! without the feature [`Observed`] is zero-sized and every function is an
//! empty inline no-op.
//!
//! The span (`request`, target `atscale`) is opened when the request
//! arrives and entered while the inner service is called and polled, so
//! every inner layer records its decision on it as it makes it
//! ([`atscale_core::metrics::field`]); ErrorEnrich records the status, the
//! error's kind and id, and the W3C trace id. Names:
//! [`atscale_core::metrics`].

use http::{HeaderValue, Request, Response};

use crate::error::{Enriched, RequestMeta};

#[cfg(feature = "metrics")]
mod imp {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::num::NonZeroU64;
    use std::sync::OnceLock;

    use atscale_core::Clock;
    use atscale_core::Kind;
    use atscale_core::grpc::status_code;
    use atscale_core::metrics::{
        ERRORS, HTTP_SERVER_REQUEST_DURATION, PANICS, RPC_SERVER_DURATION, enabled, field,
    };
    use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
    use metrics::{Histogram, Label, SharedString};
    use tracing::field::Empty;

    use crate::error::{Enriched, Panicked, RequestMeta};
    use crate::trace::TraceId;

    use atscale_core::metrics::span_wanted;

    /// The request's arrival time (metrics enabled) and span (a subscriber
    /// wants it); nothing allocated unless the span is made.
    #[derive(Clone, Debug)]
    pub(crate) struct Observed {
        /// When the request arrived on [`clock`], if metrics are enabled.
        started: Option<NonZeroU64>,
        /// The request span, if a subscriber wants it (boxed: rare).
        span: Option<Box<tracing::Span>>,
    }

    impl Observed {
        #[inline]
        pub(crate) fn start<B>(
            req: &Request<B>,
            route: Option<&str>,
            trace: Option<&HeaderValue>,
        ) -> Self {
            let started = enabled().then(now);
            if !span_wanted() {
                // No subscriber takes INFO: not even a disabled span is made
                // (with tracing's `log` feature that alone costs ~20 ns).
                return Observed {
                    started,
                    span: None,
                };
            }
            let span = tracing::info_span!(
                target: "atscale",
                "request",
                http.request.method = %req.method(),
                http.route = Empty,
                trace_id = Empty,
                deadline.origin = Empty,
                deadline.remaining_ms = Empty,
                ratelimit.outcome = Empty,
                ratelimit.wait_ms = Empty,
                hedge.sent = Empty,
                error.kind = Empty,
                error.id = Empty,
                http.response.status_code = Empty,
            );
            if span.is_disabled() {
                return Observed {
                    started,
                    span: None,
                };
            }
            if let Some(route) = route {
                span.record("http.route", route);
            }
            if let Some(id) = trace.and_then(TraceId::parse) {
                span.record(field::TRACE_ID, id.as_str());
            }
            Observed {
                started,
                span: Some(Box::new(span)),
            }
        }

        fn span(&self) -> Option<&tracing::Span> {
            self.span.as_deref()
        }

        fn started(&self) -> Option<NonZeroU64> {
            self.started
        }
    }

    /// The entered span of a request, exited when dropped.
    pub(crate) type Entered = Option<tracing::span::EnteredSpan>;

    #[inline]
    pub(crate) fn enter(meta: Option<&RequestMeta>) -> Entered {
        Some(meta?.obs.span()?.clone().entered())
    }

    #[inline]
    pub(crate) fn answered_ok<B>(meta: Option<&RequestMeta>, res: &Response<B>) -> Tail {
        let Some(meta) = meta else { return Tail::NONE };
        if let Some(span) = meta.obs.span() {
            span.record(field::STATUS, res.status().as_u16());
        }
        let Some(started) = meta.obs.started() else {
            return Tail::NONE;
        };
        if meta.grpc.is_none() {
            duration(started, &meta.method, meta.route(), false, res, None);
            return Tail::NONE;
        }
        match grpc_status_in_headers(res) {
            Some(code) => {
                grpc_duration(code, None, elapsed(started));
                Tail::NONE
            }
            // The status comes in the trailers (every successful call, and
            // a streaming call's error): timed when they do.
            None => Tail(Some(started)),
        }
    }

    /// A gRPC call answered with headers but no status yet: its duration
    /// is recorded when its body yields the trailers (with their
    /// `grpc-status`), ends without them (`UNKNOWN`, 2), or is dropped
    /// before its end (`CANCELLED`, 1: the client went away).
    #[derive(Debug)]
    pub(crate) struct Tail(Option<NonZeroU64>);

    /// `UNKNOWN`: an answer without a status.
    const UNKNOWN: u8 = 2;

    impl Tail {
        /// Nothing left to record.
        pub(crate) const NONE: Tail = Tail(None);

        /// Whether the duration waits for the trailers.
        #[inline]
        pub(crate) fn is_pending(&self) -> bool {
            self.0.is_some()
        }

        /// The body yielded its trailers.
        pub(crate) fn trailers(&mut self, trailers: &HeaderMap) {
            if let Some(started) = self.0.take() {
                let code = trailers
                    .get("grpc-status")
                    .map_or(UNKNOWN, |v| status_code(v.as_bytes()).unwrap_or(UNKNOWN));
                grpc_duration(code, None, elapsed(started));
            }
        }

        /// The body ended (or failed) without trailers.
        pub(crate) fn ended(&mut self) {
            if let Some(started) = self.0.take() {
                grpc_duration(UNKNOWN, None, elapsed(started));
            }
        }
    }

    impl Drop for Tail {
        fn drop(&mut self) {
            if let Some(started) = self.0.take() {
                grpc_duration(1, None, elapsed(started));
            }
        }
    }

    /// Nanoseconds since `started` on [`clock`].
    #[inline]
    fn elapsed(started: NonZeroU64) -> u64 {
        clock().now_nanos().saturating_sub(started.get())
    }

    /// The gRPC status of an answer whose headers tell: its `grpc-status`
    /// (`UNKNOWN` if not a code), or for an HTTP status other than 200
    /// without one, the code the gRPC spec maps it to
    /// (`doc/http-grpc-status-mapping.md`); `None` if the trailers will.
    fn grpc_status_in_headers<B>(res: &Response<B>) -> Option<u8> {
        if let Some(v) = res.headers().get("grpc-status") {
            return Some(status_code(v.as_bytes()).unwrap_or(UNKNOWN));
        }
        Some(match res.status().as_u16() {
            200 => return None,
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502..=504 => 14,
            _ => UNKNOWN,
        })
    }

    pub(crate) fn answered_err<B>(err: &Enriched, res: &Response<B>) {
        let obs = err.observed();
        if let Some(span) = obs.span() {
            span.record(field::STATUS, res.status().as_u16());
            span.record(field::ERROR_KIND, err.kind().as_str());
            span.record(field::ERROR_ID, tracing::field::display(err.id()));
        }
        errored(err);
        if let Some(started) = obs.started() {
            duration(
                started,
                err.method(),
                err.matched_route(),
                err.is_grpc(),
                res,
                Some(err.kind()),
            );
        }
    }

    pub(crate) fn errored(err: &Enriched) {
        if let (true, Some(span)) = (err.is_outgoing(), err.observed().span()) {
            span.record(field::ERROR_KIND, err.kind().as_str());
            span.record(field::ERROR_ID, tracing::field::display(err.id()));
        }
        if !enabled() {
            return;
        }
        let service = SharedString::from(err.service_arc());
        let side = if err.is_outgoing() {
            "client"
        } else {
            "server"
        };
        let labels = vec![
            Label::new("service", service.clone()),
            Label::from_static_parts("side", side),
            Label::from_static_parts("kind", err.kind().as_str()),
            Label::new("http.response.status_code", status_label(err.status())),
        ];
        metrics::counter!(ERRORS, labels).increment(1);
        if err.kind() == Kind::Internal && atscale_core::find::<Panicked>(err.inner()).is_some() {
            metrics::counter!(PANICS, vec![Label::new("service", service)]).increment(1);
        }
    }

    /// The clock of the durations: the core's (TSC through quanta by
    /// default), a few ns a reading where `Instant::now` is a system call's
    /// worth (the vDSO's `clock_gettime`, ~20 ns).
    fn clock() -> &'static Clock {
        static CLOCK: OnceLock<Clock> = OnceLock::new();
        CLOCK.get_or_init(Clock::quanta)
    }

    /// Now on [`clock`], never zero (zero means "not timed").
    #[inline]
    fn now() -> NonZeroU64 {
        NonZeroU64::new(clock().now_nanos()).unwrap_or(NonZeroU64::MIN)
    }

    fn duration<B>(
        started: NonZeroU64,
        method: &Method,
        route: Option<&str>,
        grpc: bool,
        res: &Response<B>,
        kind: Option<Kind>,
    ) {
        let nanos = elapsed(started);
        if grpc {
            let code = grpc_status_in_headers(res).unwrap_or(UNKNOWN);
            grpc_duration(code, kind, nanos);
        } else {
            let method = method_index(method);
            let status = res.status();
            let key = Labels {
                // A rare status is looked up by the recorder every time.
                packed: if static_status(status.as_u16()).is_some() {
                    u32::from(method) << 16 | u32::from(status.as_u16())
                } else {
                    UNKEPT
                },
                kind,
            };
            let seconds = nanos as f64 * 1e-9;
            kept(key, route.unwrap_or(""), seconds, || {
                let mut labels = vec![
                    Label::from_static_parts("http.request.method", METHODS[usize::from(method)]),
                    Label::new("http.response.status_code", status_label(status)),
                ];
                if let Some(route) = route {
                    labels.push(Label::new("http.route", route.to_owned()));
                }
                labels.extend(kind.map(|k| Label::from_static_parts("error.type", k.as_str())));
                metrics::histogram!(HTTP_SERVER_REQUEST_DURATION, labels)
            });
        }
    }

    /// [`duration`] of an answer with `status` (the HTTP status, or for a
    /// gRPC call the `grpc-status`), started now.
    #[cfg(test)]
    pub(super) fn duration_for_test(
        method: &str,
        route: Option<&str>,
        status: u16,
        kind: Option<Kind>,
        grpc: bool,
    ) {
        let mut res = Response::new(());
        if grpc {
            res.headers_mut()
                .insert("grpc-status", HeaderValue::from(status));
        } else {
            *res.status_mut() = StatusCode::from_u16(status).expect("a status");
        }
        let method = Method::from_bytes(method.as_bytes()).expect("a method");
        duration(now(), &method, route, grpc, &res, kind);
    }

    /// Records a gRPC call's duration, `code` its status (0..=16).
    pub(super) fn grpc_duration(code: u8, kind: Option<Kind>, nanos: u64) {
        let key = Labels {
            packed: GRPC | u32::from(code),
            kind,
        };
        let ms = nanos as f64 * 1e-6;
        kept(key, "", ms, || {
            let mut labels = vec![
                Label::from_static_parts("rpc.system", "grpc"),
                Label::from_static_parts("rpc.grpc.status_code", GRPC_CODES[usize::from(code)]),
            ];
            labels.extend(kind.map(|k| Label::from_static_parts("error.type", k.as_str())));
            metrics::histogram!(RPC_SERVER_DURATION, labels)
        });
    }

    /// A duration histogram's labels but the route, packed: [`GRPC`] and
    /// the status code, or the method's index (16..24) and the HTTP status
    /// (0..16); and the error type.
    #[derive(Clone, Copy, PartialEq, Eq)]
    struct Labels {
        packed: u32,
        kind: Option<Kind>,
    }

    /// The bit of a gRPC call in [`Labels::packed`].
    const GRPC: u32 = 1 << 31;

    /// [`Labels::packed`] of labels that are not kept (a rare status).
    const UNKEPT: u32 = u32::MAX;

    /// Records `value` in the histogram for `labels` and `route`, kept per
    /// thread from its first use: a recorder's lookup (labels, a key, a
    /// registry) costs a few hundred ns, a kept handle a hash of a few words
    /// and one probe. The set is bounded by construction (methods, common
    /// statuses, kinds, route templates).
    fn kept(labels: Labels, route: &str, value: f64, register: impl FnOnce() -> Histogram) {
        thread_local! {
            static KEPT: RefCell<HashMap<u64, Kept, Prehashed>> =
                RefCell::new(HashMap::default());
        }
        if labels.packed == UNKEPT {
            return register().record(value);
        }
        let hash = hash(labels, route);
        let mut register = Some(register);
        let recorded = KEPT.with(|kept| {
            let mut kept = kept.borrow_mut();
            match kept.get(&hash) {
                Some(k) if k.labels == labels && same(&k.route, route) => {
                    k.histogram.record(value);
                    true
                }
                // Two keys of one hash (never seen): the recorder's lookup.
                Some(_) => false,
                None => {
                    let histogram = register.take().expect("not called yet")();
                    histogram.record(value);
                    kept.insert(
                        hash,
                        Kept {
                            labels,
                            route: route.into(),
                            histogram,
                        },
                    );
                    true
                }
            }
        });
        if !recorded {
            register.take().expect("not called yet")().record(value);
        }
    }

    /// `a == b`, without a call to `memcmp` for the empty route (no
    /// router said which).
    #[inline]
    fn same(a: &str, b: &str) -> bool {
        a.len() == b.len() && (a.is_empty() || a == b)
    }

    /// A kept histogram and what it was kept for.
    struct Kept {
        labels: Labels,
        route: Box<str>,
        histogram: Histogram,
    }

    /// A word-at-a-time hash (FxHash's multiply-rotate) of the labels and
    /// route: the set is bounded and not chosen by clients (route
    /// templates), so no resistance to chosen keys is needed.
    #[inline]
    fn hash(labels: Labels, route: &str) -> u64 {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mix = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
        let kind = labels.kind.map_or(0, |k| k.as_str().as_ptr() as u64);
        let mut h = mix(mix(u64::from(labels.packed), kind), route.len() as u64);
        let mut chunks = route.as_bytes().chunks_exact(8);
        for c in &mut chunks {
            h = mix(h, u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        mix(h, u64::from_le_bytes(tail))
    }

    /// The map's keys are already hashed.
    type Prehashed = std::hash::BuildHasherDefault<Identity>;

    #[derive(Default)]
    struct Identity(u64);

    impl std::hash::Hasher for Identity {
        fn finish(&self) -> u64 {
            self.0
        }

        fn write(&mut self, _: &[u8]) {
            unreachable!("only u64 keys")
        }

        fn write_u64(&mut self, n: u64) {
            self.0 = n;
        }
    }

    /// OpenTelemetry's known methods, `_OTHER` for the rest (a bounded set).
    const METHODS: [&str; 10] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT", "TRACE", "_OTHER",
    ];

    /// The index of `method`'s label in [`METHODS`].
    fn method_index(method: &Method) -> u8 {
        // On the constants, not `as_str()`: a match on strings compares
        // them with `memcmp`.
        match *method {
            Method::GET => 0,
            Method::POST => 1,
            Method::PUT => 2,
            Method::DELETE => 3,
            Method::HEAD => 4,
            Method::PATCH => 5,
            Method::OPTIONS => 6,
            Method::CONNECT => 7,
            Method::TRACE => 8,
            _ => 9,
        }
    }

    /// The common statuses without allocating; others as their digits.
    fn status_label(status: StatusCode) -> SharedString {
        match static_status(status.as_u16()) {
            Some(s) => SharedString::const_str(s),
            None => SharedString::from(status.as_u16().to_string()),
        }
    }

    /// The statuses answers commonly have, as static strings.
    fn static_status(code: u16) -> Option<&'static str> {
        Some(match code {
            200 => "200",
            201 => "201",
            202 => "202",
            204 => "204",
            206 => "206",
            301 => "301",
            302 => "302",
            303 => "303",
            304 => "304",
            307 => "307",
            308 => "308",
            400 => "400",
            401 => "401",
            403 => "403",
            404 => "404",
            405 => "405",
            408 => "408",
            409 => "409",
            410 => "410",
            413 => "413",
            415 => "415",
            422 => "422",
            429 => "429",
            499 => "499",
            500 => "500",
            501 => "501",
            502 => "502",
            503 => "503",
            504 => "504",
            _ => return None,
        })
    }

    /// The gRPC status codes' labels.
    const GRPC_CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use std::sync::{Arc, Mutex};

    use metrics::{
        Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString,
        Unit,
    };

    use super::imp::duration_for_test;

    /// Every histogram registration and every value recorded, by key
    /// (name and labels, sorted).
    #[derive(Clone, Default)]
    struct Log {
        registered: Arc<Mutex<Vec<String>>>,
        values: Arc<Mutex<Vec<(String, f64)>>>,
    }

    struct Values(String, Log);

    impl HistogramFn for Values {
        fn record(&self, value: f64) {
            self.1.values.lock().unwrap().push((self.0.clone(), value));
        }
    }

    impl Recorder for Log {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            self.registered.lock().unwrap().push(name.clone());
            Histogram::from_arc(Arc::new(Values(name, self.clone())))
        }
    }

    fn count(log: &Log, key: &str) -> usize {
        log.values
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == key)
            .count()
    }

    #[test]
    fn each_answer_goes_to_the_histogram_of_its_own_labels_and_route() {
        let log = Log::default();
        metrics::with_local_recorder(&log, || {
            // Twice each: the second time from the kept handle.
            for _ in 0..2 {
                duration_for_test("GET", Some("/a/{id}"), 200, None, false);
                duration_for_test("GET", Some("/a/{id}"), 404, None, false);
                duration_for_test("GET", Some("/b/{id}"), 200, None, false);
                duration_for_test("POST", Some("/a/{id}"), 200, None, false);
                duration_for_test("GET", None, 200, None, false);
                duration_for_test(
                    "GET",
                    Some("/a/{id}"),
                    429,
                    Some(atscale_core::Kind::RateLimited),
                    false,
                );
                // A rare status: not kept, looked up every time.
                duration_for_test("GET", Some("/a/{id}"), 418, None, false);
                duration_for_test("POST", None, 0, None, true);
            }
        });
        let http = "http.server.request.duration";
        let keys = [
            format!(
                "{http}{{http.request.method=GET,http.response.status_code=200,http.route=/a/{{id}}}}"
            ),
            format!(
                "{http}{{http.request.method=GET,http.response.status_code=404,http.route=/a/{{id}}}}"
            ),
            format!(
                "{http}{{http.request.method=GET,http.response.status_code=200,http.route=/b/{{id}}}}"
            ),
            format!(
                "{http}{{http.request.method=POST,http.response.status_code=200,http.route=/a/{{id}}}}"
            ),
            format!("{http}{{http.request.method=GET,http.response.status_code=200}}"),
            format!(
                "{http}{{error.type=rate_limited,http.request.method=GET,http.response.status_code=429,http.route=/a/{{id}}}}"
            ),
            format!(
                "{http}{{http.request.method=GET,http.response.status_code=418,http.route=/a/{{id}}}}"
            ),
            "rpc.server.duration{rpc.grpc.status_code=0,rpc.system=grpc}".to_owned(),
        ];
        for key in &keys {
            assert_eq!(
                count(&log, key),
                2,
                "{key}: {:?}",
                log.values.lock().unwrap()
            );
        }
        assert_eq!(log.values.lock().unwrap().len(), 16);
        // Kept from the first use; the rare status registered every time.
        let registered = log.registered.lock().unwrap();
        assert_eq!(registered.len(), 9, "{registered:?}");
        assert_eq!(registered.iter().filter(|k| **k == keys[6]).count(), 2);
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use http::{HeaderValue, Request, Response};

    use crate::error::{Enriched, RequestMeta};

    /// Zero-sized without the `metrics` feature.
    #[derive(Clone, Debug)]
    pub(crate) struct Observed;

    impl Observed {
        #[inline(always)]
        pub(crate) fn start<B>(_: &Request<B>, _: Option<&str>, _: Option<&HeaderValue>) -> Self {
            Observed
        }
    }

    /// Zero-sized without the `metrics` feature.
    pub(crate) struct Entered;

    #[inline(always)]
    pub(crate) fn enter(_: Option<&RequestMeta>) -> Entered {
        Entered
    }

    #[inline(always)]
    pub(crate) fn answered_ok<B>(_: Option<&RequestMeta>, _: &Response<B>) -> Tail {
        Tail::NONE
    }

    /// Zero-sized without the `metrics` feature: never pending.
    #[derive(Debug)]
    pub(crate) struct Tail;

    impl Tail {
        pub(crate) const NONE: Tail = Tail;

        #[inline(always)]
        pub(crate) fn is_pending(&self) -> bool {
            false
        }

        #[inline(always)]
        pub(crate) fn trailers(&mut self, _: &http::HeaderMap) {}

        #[inline(always)]
        pub(crate) fn ended(&mut self) {}
    }

    #[inline(always)]
    pub(crate) fn answered_err<B>(_: &Enriched, _: &Response<B>) {}

    #[inline(always)]
    pub(crate) fn errored(_: &Enriched) {}
}

pub(crate) use imp::{Entered, Observed, Tail};

/// Enters the request's span (until the returned guard drops).
#[inline(always)]
#[must_use]
pub(crate) fn enter(meta: Option<&RequestMeta>) -> Entered {
    imp::enter(meta)
}

/// A server answered the request with the inner service's response; for a
/// gRPC call whose status comes in the trailers, what the body records.
#[inline(always)]
pub(crate) fn answered_ok<B>(meta: Option<&RequestMeta>, res: &Response<B>) -> Tail {
    imp::answered_ok(meta, res)
}

/// A server answered the request with `err`, as `res`.
#[inline(always)]
pub(crate) fn answered_err<B>(err: &Enriched, res: &Response<B>) {
    imp::answered_err(err, res);
}

/// A client-mode layer failed with `err`.
#[inline(always)]
pub(crate) fn errored(err: &Enriched) {
    imp::errored(err);
}

/// Starts observing a request: its span, and its arrival time when
/// durations are on.
#[inline(always)]
pub(crate) fn start<B>(
    req: &Request<B>,
    route: Option<&str>,
    trace: Option<&HeaderValue>,
) -> Observed {
    Observed::start(req, route, trace)
}
