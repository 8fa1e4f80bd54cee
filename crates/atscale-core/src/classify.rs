//! Classification: which [`Kind`] a failure is, and when to retry it.
//!
//! [`Kind::of`], [`Kind::find`], [`retry_after`] and ErrorEnrich all ask
//! [`classify`], which walks an error's `source()` chain, outermost first,
//! and stops at the first error it knows. For each error it asks, in order:
//!
//! 1. the atscale vocabulary ([`DeadlineExceeded`](crate::DeadlineExceeded), [`RateLimited`], …);
//! 2. the application's own mappings ([`register`], [`map`]);
//! 3. the foreign errors users meet next to atscale, each behind the feature
//!    of its crate (table below).
//!
//! | error | feature | kind |
//! | --- | --- | --- |
//! | `tower::timeout::error::Elapsed` | `tower` | `DeadlineExceeded` |
//! | `tower::load_shed::error::Overloaded` | `tower` | `Overloaded` |
//! | `std::io::Error`: connection refused, host or network unreachable, address not available, not connected | (always) | `Unreachable` |
//! | `std::io::Error`: timed out | (always) | `DeadlineExceeded` |
//! | `std::io::Error`: connection reset or aborted, broken pipe, unexpected end | (always) | `Upstream` |
//! | hyper-util legacy client error that [`is_connect`](https://docs.rs/hyper-util/latest/hyper_util/client/legacy/struct.Error.html#method.is_connect) (refused, DNS failure) | `hyper-util` | `Unreachable` |
//! | `hyper::Error`: canceled (the request was never sent), timeout | `hyper` | `Unreachable`, `DeadlineExceeded` |
//! | `h2::Error`: `REFUSED_STREAM`, or a `GOAWAY` from the peer (the stream was not processed) | `h2` | `Unreachable` |
//! | `tonic::Status` off the wire (no `source()`): `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED` (with `grpc-retry-pushback-ms`), `CANCELLED` | `tonic` | `DeadlineExceeded`, `RateLimited`, `Cancelled` (tonic's own "Timeout expired" `CANCELLED`: `DeadlineExceeded`) |
//!
//! A `tonic::Status` with a `source()` was made locally (tonic's transport
//! errors, atscale's remote failures): its source decides. A `std::io::Error`
//! that wraps another error is classified by what it wraps first (its own
//! `source()` skips the wrapped error).
//!
//! # Mapping your own errors
//!
//! An application maps its types once, at start-up; every layer and
//! ErrorEnrich then see them. Classification runs only on failures: a
//! registered mapping costs nothing on the success path.
//!
//! ```
//! use std::time::Duration;
//! use atscale_core::{BoxError, Kind, classify::{self, Classification}};
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("database timed out")]
//! struct DbTimeout;
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("quota exceeded")]
//! struct QuotaExceeded { reset_in: Duration }
//!
//! classify::map(|_: &DbTimeout| Classification::new(Kind::DeadlineExceeded));
//! classify::map(|q: &QuotaExceeded| {
//!     Classification::new(Kind::RateLimited).with_retry_after(q.reset_in)
//! });
//!
//! let err: BoxError = QuotaExceeded { reset_in: Duration::from_secs(3) }.into();
//! assert_eq!(Kind::of(&*err), Kind::RateLimited);
//! assert_eq!(atscale_core::retry_after(&*err), Some(Duration::from_secs(3)));
//! let err: BoxError = DbTimeout.into();
//! assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
//! ```

use std::error::Error;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{Kind, Overloaded, RateLimited, chain};

/// What classification found: a [`Kind`] and, where the failure says when
/// to come back, a retry-after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classification {
    kind: Kind,
    retry_after: Option<Duration>,
}

impl Classification {
    /// A failure of `kind`, with no retry-after.
    pub const fn new(kind: Kind) -> Self {
        Classification {
            kind,
            retry_after: None,
        }
    }

    /// The same, saying the request may be retried `after` from now
    /// (answered as `Retry-After` and `RetryInfo` for rate-limited and
    /// overloaded kinds).
    #[must_use]
    pub const fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The kind.
    pub const fn kind(&self) -> Kind {
        self.kind
    }

    /// When the request may be retried, if the failure said.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

type Hook = Box<dyn Fn(&(dyn Error + 'static)) -> Option<Classification> + Send + Sync>;

static HOOKS: RwLock<Vec<Hook>> = RwLock::new(Vec::new());
/// Set once a hook is registered, so that classification without hooks
/// never touches the lock.
static ANY_HOOK: AtomicBool = AtomicBool::new(false);

/// Registers a mapping for errors atscale does not know, for the whole
/// process: `hook` sees each error of a chain on its own (not its sources)
/// and returns a classification for the ones it knows.
///
/// Mappings are asked in the order they were registered, after atscale's
/// own vocabulary and before the foreign errors of the module table (so an
/// application can override those). Register at start-up: the mappings
/// are process-wide and cannot be removed.
pub fn register<F>(hook: F)
where
    F: Fn(&(dyn Error + 'static)) -> Option<Classification> + Send + Sync + 'static,
{
    let mut hooks = HOOKS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    hooks.push(Box::new(hook));
    ANY_HOOK.store(true, Ordering::Release);
}

/// Registers a mapping for one error type `E`: the typed form of [`register`].
pub fn map<E, F>(to: F)
where
    E: Error + 'static,
    F: Fn(&E) -> Classification + Send + Sync + 'static,
{
    register(move |err| err.downcast_ref::<E>().map(&to));
}

/// Classifies `err`: the first error in its `source()` chain (outermost
/// first) that is known, as the [module docs](self) list; `None` when
/// nothing in the chain is.
pub fn classify(err: &(dyn Error + 'static)) -> Option<Classification> {
    chain(err).find_map(one)
}

/// When the failure says the request may be retried: the retry-after of
/// the classification of `err` ([`RateLimited::retry_after`],
/// [`Overloaded::retry_after`], or a mapping's).
pub fn retry_after(err: &(dyn Error + 'static)) -> Option<Duration> {
    classify(err).and_then(|c| c.retry_after)
}

fn one(err: &(dyn Error + 'static)) -> Option<Classification> {
    if let Some(kind) = Kind::of_one(err) {
        let retry_after = if let Some(limited) = err.downcast_ref::<RateLimited>() {
            Some(limited.retry_after())
        } else {
            err.downcast_ref::<Overloaded>()
                .and_then(Overloaded::retry_after)
        };
        return Some(Classification { kind, retry_after });
    }
    hooked(err).or_else(|| foreign(err))
}

fn hooked(err: &(dyn Error + 'static)) -> Option<Classification> {
    if !ANY_HOOK.load(Ordering::Acquire) {
        return None;
    }
    let hooks = HOOKS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    hooks.iter().find_map(|hook| hook(err))
}

fn foreign(err: &(dyn Error + 'static)) -> Option<Classification> {
    let kind = |kind| Some(Classification::new(kind));
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        // io::Error::source() skips the error it wraps: look at it first.
        if let Some(inner) = io.get_ref()
            && let Some(found) = classify(inner)
        {
            return Some(found);
        }
        return io_kind(io.kind()).map(Classification::new);
    }
    #[cfg(feature = "tower")]
    {
        if err.is::<tower::timeout::error::Elapsed>() {
            return kind(Kind::DeadlineExceeded);
        }
        if err.is::<tower::load_shed::error::Overloaded>() {
            return kind(Kind::Overloaded);
        }
    }
    #[cfg(feature = "hyper-util")]
    if let Some(e) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
        // Anything else is classified by its source (hyper, io).
        if e.is_connect() {
            return kind(Kind::Unreachable);
        }
    }
    #[cfg(feature = "hyper")]
    if let Some(e) = err.downcast_ref::<hyper::Error>() {
        if e.is_canceled() {
            return kind(Kind::Unreachable);
        }
        if e.is_timeout() {
            return kind(Kind::DeadlineExceeded);
        }
    }
    #[cfg(feature = "h2")]
    if let Some(e) = err.downcast_ref::<h2::Error>() {
        let refused = e.reason() == Some(h2::Reason::REFUSED_STREAM);
        if refused || (e.is_go_away() && e.is_remote()) {
            return kind(Kind::Unreachable);
        }
    }
    #[cfg(feature = "tonic")]
    if let Some(status) = err.downcast_ref::<tonic::Status>() {
        return grpc_status(status);
    }
    let _ = kind;
    None
}

fn io_kind(kind: std::io::ErrorKind) -> Option<Kind> {
    use std::io::ErrorKind as Io;
    Some(match kind {
        Io::ConnectionRefused
        | Io::HostUnreachable
        | Io::NetworkUnreachable
        | Io::AddrNotAvailable
        | Io::NotConnected => Kind::Unreachable,
        Io::TimedOut => Kind::DeadlineExceeded,
        Io::ConnectionReset | Io::ConnectionAborted | Io::BrokenPipe | Io::UnexpectedEof => {
            Kind::Upstream
        }
        _ => return None,
    })
}

/// A status that came off the wire; one with a source was made locally,
/// and its source decides.
#[cfg(feature = "tonic")]
fn grpc_status(status: &tonic::Status) -> Option<Classification> {
    use tonic::Code;
    if status.source().is_some() {
        return None;
    }
    Some(Classification::new(match status.code() {
        Code::DeadlineExceeded => Kind::DeadlineExceeded,
        // tonic's client enforces `grpc-timeout` itself and reports its
        // own expiry this way: the deadline passed.
        Code::Cancelled if status.message() == "Timeout expired" => Kind::DeadlineExceeded,
        Code::Cancelled => Kind::Cancelled,
        Code::ResourceExhausted => {
            let limited = Classification::new(Kind::RateLimited);
            return Some(match pushback(status.metadata()) {
                Some(after) => limited.with_retry_after(after),
                None => limited,
            });
        }
        _ => return None,
    }))
}

/// `grpc-retry-pushback-ms`, when it holds a non-negative whole number.
#[cfg(feature = "tonic")]
fn pushback(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-retry-pushback-ms")?.to_str().ok()?;
    value.parse::<u64>().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadline::Origin;
    use crate::error::{BoxError, DeadlineExceeded, Unreachable};

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapped(#[source] BoxError);

    #[derive(Debug, thiserror::Error)]
    #[error("test quota")]
    struct TestQuota(Duration);

    #[derive(Debug, thiserror::Error)]
    #[error("never mapped")]
    struct NeverMapped;

    #[test]
    fn io_errors_say_whether_the_request_got_through() {
        let cases = [
            (
                std::io::ErrorKind::ConnectionRefused,
                Some(Kind::Unreachable),
            ),
            (std::io::ErrorKind::TimedOut, Some(Kind::DeadlineExceeded)),
            (std::io::ErrorKind::ConnectionReset, Some(Kind::Upstream)),
            (std::io::ErrorKind::BrokenPipe, Some(Kind::Upstream)),
            (std::io::ErrorKind::PermissionDenied, None),
        ];
        for (io, want) in cases {
            let err: BoxError = Wrapped(std::io::Error::from(io).into()).into();
            assert_eq!(Kind::find(&*err), want, "{io:?}");
        }
    }

    #[test]
    fn an_io_error_wrapping_a_vocabulary_error_is_that_error() {
        let inner = DeadlineExceeded::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            Origin::Local,
        );
        let err: BoxError = std::io::Error::other(inner).into();
        assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
        let err: BoxError =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, Unreachable::new("x"))
                .into();
        assert_eq!(Kind::of(&*err), Kind::Unreachable);
    }

    #[test]
    fn retry_after_comes_from_the_classified_error() {
        let err: BoxError = Wrapped(Box::new(Overloaded::with_retry_after(Duration::from_secs(
            2,
        ))))
        .into();
        assert_eq!(Kind::of(&*err), Kind::Overloaded);
        assert_eq!(retry_after(&*err), Some(Duration::from_secs(2)));
        let err: BoxError = Wrapped(Box::new(RateLimited::new(Duration::from_millis(300)))).into();
        assert_eq!(retry_after(&*err), Some(Duration::from_millis(300)));
        let err: BoxError = Overloaded::new().into();
        assert_eq!(retry_after(&*err), None);
    }

    #[test]
    fn a_mapped_type_is_classified_through_the_chain() {
        map(|q: &TestQuota| Classification::new(Kind::RateLimited).with_retry_after(q.0));
        let err: BoxError = Wrapped(Box::new(TestQuota(Duration::from_secs(4)))).into();
        assert_eq!(Kind::of(&*err), Kind::RateLimited);
        assert_eq!(retry_after(&*err), Some(Duration::from_secs(4)));
        // A mapping sees only its own type.
        let err: BoxError = NeverMapped.into();
        assert_eq!(Kind::find(&*err), None);
    }

    #[test]
    fn the_vocabulary_wins_over_a_mapping_of_the_same_error() {
        register(|err| {
            err.is::<Unreachable>()
                .then(|| Classification::new(Kind::Internal))
        });
        let err: BoxError = Unreachable::new("billing").into();
        assert_eq!(Kind::of(&*err), Kind::Unreachable);
    }

    #[cfg(feature = "tower")]
    #[test]
    fn tower_errors() {
        let err: BoxError = tower::timeout::error::Elapsed::new().into();
        assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
        let err: BoxError = Wrapped(tower::load_shed::error::Overloaded::new().into()).into();
        assert_eq!(Kind::of(&*err), Kind::Overloaded);
    }

    #[cfg(feature = "h2")]
    #[test]
    fn h2_refused_stream_never_reached_the_server() {
        let err: BoxError = h2::Error::from(h2::Reason::REFUSED_STREAM).into();
        assert_eq!(Kind::find(&*err), Some(Kind::Unreachable));
        let err: BoxError = h2::Error::from(h2::Reason::INTERNAL_ERROR).into();
        assert_eq!(Kind::find(&*err), None);
    }

    #[cfg(feature = "tonic")]
    #[test]
    fn statuses_off_the_wire() {
        let mut status = tonic::Status::resource_exhausted("slow down");
        status
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", "1500".parse().unwrap());
        let err: BoxError = Wrapped(Box::new(status)).into();
        assert_eq!(Kind::of(&*err), Kind::RateLimited);
        assert_eq!(retry_after(&*err), Some(Duration::from_millis(1500)));

        let err: BoxError = tonic::Status::deadline_exceeded("late").into();
        assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
        let err: BoxError = tonic::Status::cancelled("Timeout expired").into();
        assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
        let err: BoxError = tonic::Status::unavailable("down").into();
        assert_eq!(Kind::find(&*err), None);

        // Made locally: the source decides.
        let mut status = tonic::Status::resource_exhausted("x");
        status.set_source(std::sync::Arc::new(Overloaded::new()));
        let err: BoxError = status.into();
        assert_eq!(Kind::of(&*err), Kind::Overloaded);
    }
}
