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
    use std::time::Instant;

    use atscale_core::Kind;
    use atscale_core::metrics::{
        ERRORS, HTTP_SERVER_REQUEST_DURATION, PANICS, RPC_SERVER_DURATION, enabled, field,
    };
    use http::{HeaderValue, Method, Request, Response, StatusCode};
    use metrics::{Histogram, Label, SharedString};
    use tracing::field::Empty;

    use crate::error::{Enriched, Panicked, RequestMeta};
    use crate::trace::TraceId;

    /// Whether a subscriber may record the request span (it is at `INFO`).
    #[inline(always)]
    fn span_wanted() -> bool {
        use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
        tracing::Level::INFO <= STATIC_MAX_LEVEL && tracing::Level::INFO <= LevelFilter::current()
    }

    /// The request's arrival time (metrics enabled) and span (a subscriber
    /// wants it); nothing allocated unless the span is made.
    #[derive(Clone, Debug)]
    pub(crate) struct Observed {
        /// When the request arrived, if metrics are enabled.
        started: Option<Instant>,
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
            let started = enabled().then(Instant::now);
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

        fn started(&self) -> Option<Instant> {
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
    pub(crate) fn answered_ok<B>(meta: Option<&RequestMeta>, res: &Response<B>) {
        let Some(meta) = meta else { return };
        if let Some(span) = meta.obs.span() {
            span.record(field::STATUS, res.status().as_u16());
        }
        if let Some(started) = meta.obs.started() {
            duration(
                started,
                &meta.method,
                meta.route(),
                meta.grpc.is_some(),
                res,
                None,
            );
        }
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

    fn duration<B>(
        started: Instant,
        method: &Method,
        route: Option<&str>,
        grpc: bool,
        res: &Response<B>,
        kind: Option<Kind>,
    ) {
        let elapsed = started.elapsed();
        if grpc {
            let code = res
                .headers()
                .get("grpc-status")
                .and_then(|v| grpc_code_label(v.as_bytes()))
                .unwrap_or("0");
            let key = (true, "POST", Some(code), kind.map(Kind::as_str));
            let ms = elapsed.as_secs_f64() * 1000.0;
            kept(key, "", ms, || {
                let mut labels = vec![
                    Label::from_static_parts("rpc.system", "grpc"),
                    Label::from_static_parts("rpc.grpc.status_code", code),
                ];
                labels.extend(kind.map(|k| Label::from_static_parts("error.type", k.as_str())));
                metrics::histogram!(RPC_SERVER_DURATION, labels)
            });
        } else {
            let method = method_label(method);
            let status = res.status();
            let key = (
                false,
                method,
                static_status(status.as_u16()),
                kind.map(Kind::as_str),
            );
            kept(key, route.unwrap_or(""), elapsed.as_secs_f64(), || {
                let mut labels = vec![
                    Label::from_static_parts("http.request.method", method),
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

    /// A duration histogram's labels but the route: (gRPC, method, status
    /// when a common one, error type).
    type Labels = (
        bool,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    );

    /// Records `value` in the histogram for `labels` and `route`, kept per
    /// thread from its first use: a recorder's lookup (labels, a key, a
    /// registry) costs a few hundred ns, a kept handle one map lookup. The
    /// set is bounded by construction (methods, statuses, kinds, route
    /// templates).
    fn kept(labels: Labels, route: &str, value: f64, register: impl FnOnce() -> Histogram) {
        thread_local! {
            static KEPT: RefCell<HashMap<Labels, ByRoute, Fnv>> = RefCell::new(HashMap::default());
        }
        if labels.2.is_none() {
            // A rare status: looked up by the recorder every time.
            return register().record(value);
        }
        KEPT.with(|kept| {
            let mut kept = kept.borrow_mut();
            let by_route = kept.entry(labels).or_default();
            match by_route.get(route) {
                Some(h) => h.record(value),
                None => {
                    let h = register();
                    h.record(value);
                    by_route.insert(route.into(), h);
                }
            }
        });
    }

    /// The kept histograms of one set of labels, by route template.
    type ByRoute = HashMap<Box<str>, Histogram, Fnv>;

    /// FNV-1a: the keys are a few short strings of a bounded set, hashed on
    /// every answer; SipHash's resistance to chosen keys is not needed.
    type Fnv = std::hash::BuildHasherDefault<FnvHasher>;

    struct FnvHasher(u64);

    impl Default for FnvHasher {
        fn default() -> Self {
            FnvHasher(0xcbf2_9ce4_8422_2325)
        }
    }

    impl std::hash::Hasher for FnvHasher {
        fn finish(&self) -> u64 {
            self.0
        }

        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }

    /// OpenTelemetry's known methods, `_OTHER` for the rest (a bounded set).
    fn method_label(method: &Method) -> &'static str {
        match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::DELETE => "DELETE",
            Method::HEAD => "HEAD",
            Method::PATCH => "PATCH",
            Method::OPTIONS => "OPTIONS",
            Method::CONNECT => "CONNECT",
            Method::TRACE => "TRACE",
            _ => "_OTHER",
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

    /// A gRPC status code (0..=16) as a label; anything else is not one.
    fn grpc_code_label(code: &[u8]) -> Option<&'static str> {
        const CODES: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        CODES.iter().find(|c| c.as_bytes() == code).copied()
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
    pub(crate) fn answered_ok<B>(_: Option<&RequestMeta>, _: &Response<B>) {}

    #[inline(always)]
    pub(crate) fn answered_err<B>(_: &Enriched, _: &Response<B>) {}

    #[inline(always)]
    pub(crate) fn errored(_: &Enriched) {}
}

pub(crate) use imp::{Entered, Observed};

/// Enters the request's span (until the returned guard drops).
#[inline(always)]
#[must_use]
pub(crate) fn enter(meta: Option<&RequestMeta>) -> Entered {
    imp::enter(meta)
}

/// A server answered the request with the inner service's response.
#[inline(always)]
pub(crate) fn answered_ok<B>(meta: Option<&RequestMeta>, res: &Response<B>) {
    imp::answered_ok(meta, res);
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
