use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use tower_layer::Layer;

use crate::config::{Config, HelpTemplate};
use crate::error::ConfigError;
#[cfg(feature = "axum")]
use crate::mode::Axum;
use crate::mode::{Client, Server};
use crate::service::ErrorEnrich;

/// Applies [`ErrorEnrich`] to a service: every error that leaves it says
/// what happened, when, where, what to tell the user, and how to learn more.
///
/// `M` is the mode: [`Server`] (from [`ErrorEnrichLayer::new`]) answers
/// errors as responses; [`Client`] (from [`ErrorEnrichLayer::client`])
/// turns the errors of outgoing calls into [`Enriched`](crate::Enriched)
/// errors; `Axum` (from `ErrorEnrichLayer::for_axum`, the `axum` feature)
/// serves as [`Server`] inside an axum `Router`. More options:
/// [`ErrorEnrichLayer::builder`].
pub struct ErrorEnrichLayer<M = Server> {
    config: Arc<Config>,
    _mode: PhantomData<fn() -> M>,
}

impl ErrorEnrichLayer<Server> {
    /// A server-mode layer for the service named `service`, with no help link
    /// and internal details hidden.
    ///
    /// # Panics
    ///
    /// When `service` is empty, longer than 128 bytes, or holds whitespace or
    /// control characters; [`ErrorEnrichLayer::builder`] returns the error instead.
    pub fn new(service: impl Into<Arc<str>>) -> Self {
        match ErrorEnrichLayer::builder(service).build() {
            Ok(layer) => layer,
            Err(err) => panic!("{err}"),
        }
    }

    /// A builder for a layer for the service named `service`.
    pub fn builder(service: impl Into<Arc<str>>) -> ErrorEnrichBuilder {
        ErrorEnrichBuilder {
            service: service.into(),
            help: None,
            internal_details: false,
        }
    }

    /// The same layer for use inside an axum `Router` (`Router::layer`):
    /// its responses have axum's `Body`, so the router does not box the
    /// body of every response (the `axum` feature; [`Axum`]).
    ///
    /// # Example
    ///
    /// ```
    /// use atscale_error::ErrorEnrichLayer;
    /// use axum::Router;
    /// use axum::routing::get;
    ///
    /// let app: Router = Router::new()
    ///     .route("/orders/{id}", get(|| async { "order" }))
    ///     .layer(ErrorEnrichLayer::new("orders").for_axum());
    /// ```
    #[cfg(feature = "axum")]
    pub fn for_axum(self) -> ErrorEnrichLayer<Axum> {
        ErrorEnrichLayer {
            config: self.config,
            _mode: PhantomData,
        }
    }
}

impl ErrorEnrichLayer<Client> {
    /// A client-mode layer for outgoing calls made by the service named `service`.
    ///
    /// # Example
    ///
    /// ```
    /// use atscale_core::{BoxError, Kind};
    /// use atscale_error::ErrorEnrichLayer;
    /// use tower::{ServiceBuilder, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), BoxError> {
    /// let transport = service_fn(|_req: http::Request<()>| async {
    ///     Err::<http::Response<()>, BoxError>("connection reset by peer".into())
    /// });
    /// let billing = ServiceBuilder::new()
    ///     .layer(ErrorEnrichLayer::client("checkout"))
    ///     .service(transport);
    ///
    /// let req = http::Request::post("http://billing:8080/charge").body(())?;
    /// let err = billing.oneshot(req).await.unwrap_err();
    /// assert_eq!(err.kind(), Kind::Upstream);
    /// assert_eq!(err.target(), Some("billing:8080"));
    /// assert!(err.to_string().starts_with("upstream failure calling billing:8080 (POST /charge)"));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// Like [`ErrorEnrichLayer::new`]; [`ErrorEnrichBuilder::build_client`]
    /// returns the error instead.
    pub fn client(service: impl Into<Arc<str>>) -> Self {
        match ErrorEnrichLayer::builder(service).build_client() {
            Ok(layer) => layer,
            Err(err) => panic!("{err}"),
        }
    }
}

impl<M> ErrorEnrichLayer<M> {
    /// The name of the service, as errors will show it.
    pub fn service(&self) -> &str {
        &self.config.service
    }
}

impl<M> Clone for ErrorEnrichLayer<M> {
    fn clone(&self) -> Self {
        ErrorEnrichLayer {
            config: self.config.clone(),
            _mode: PhantomData,
        }
    }
}

impl<M> fmt::Debug for ErrorEnrichLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorEnrichLayer")
            .field("mode", &std::any::type_name::<M>())
            .field("config", &self.config)
            .finish()
    }
}

impl<S, M> Layer<S> for ErrorEnrichLayer<M> {
    type Service = ErrorEnrich<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorEnrich::from_config(inner, self.config.clone())
    }
}

/// Builds an [`ErrorEnrichLayer`]; the values are checked by
/// [`build`](ErrorEnrichBuilder::build) or
/// [`build_client`](ErrorEnrichBuilder::build_client).
#[derive(Debug)]
#[must_use = "a builder does nothing until built"]
pub struct ErrorEnrichBuilder {
    service: Arc<str>,
    help: Option<String>,
    internal_details: bool,
}

impl ErrorEnrichBuilder {
    /// The help link template, such as `https://docs.example.com/errors/{code}`:
    /// `{code}` becomes the kind's stable name ([`Kind::as_str`](atscale_core::Kind::as_str),
    /// such as `rate_limited`) and `{id}` the error id. The result must be an
    /// absolute `http` or `https` URI.
    ///
    /// The link is the problem+json `type` and a gRPC `Help` detail.
    pub fn help_link(mut self, template: impl Into<String>) -> Self {
        self.help = Some(template.into());
        self
    }

    /// Whether responses carry internal details: the `source()` chain of
    /// each error (a `chain` member in problem+json, `DebugInfo` in gRPC).
    /// Off by default: inner error messages can hold secrets, so turn it on
    /// only where every client is trusted (tests, internal tools).
    pub fn internal_details(mut self, exposed: bool) -> Self {
        self.internal_details = exposed;
        self
    }

    /// A server-mode layer.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the service name is empty, longer than 128 bytes
    /// or holds whitespace or control characters, or when the help link
    /// template has unknown placeholders, unbalanced braces, or does not make
    /// an absolute `http(s)` URI.
    pub fn build(self) -> Result<ErrorEnrichLayer<Server>, ConfigError> {
        self.build_mode()
    }

    /// A client-mode layer.
    ///
    /// # Errors
    ///
    /// As [`ErrorEnrichBuilder::build`].
    pub fn build_client(self) -> Result<ErrorEnrichLayer<Client>, ConfigError> {
        self.build_mode()
    }

    fn build_mode<M>(self) -> Result<ErrorEnrichLayer<M>, ConfigError> {
        let help = self.help.as_deref().map(HelpTemplate::parse).transpose()?;
        Ok(ErrorEnrichLayer {
            config: Arc::new(Config::new(self.service, help, self.internal_details)?),
            _mode: PhantomData,
        })
    }
}
