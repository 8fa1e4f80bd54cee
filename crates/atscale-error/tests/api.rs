//! The public API's promises: thread-safety, cloning, and clear errors for bad configuration.

use std::future::Ready;

use atscale_core::BoxError;
use atscale_error::body::ResponseBody;
use atscale_error::future::{ClientResponseFuture, ResponseFuture};
use atscale_error::mode::{Client, Server};
use atscale_error::{Enriched, ErrorEnrich, ErrorEnrichBuilder, ErrorEnrichLayer, ErrorId};
use bytes::Bytes;
use http::Response;
use http_body_util::Full;

fn send_sync_clone<T: Send + Sync + Clone>() {}
fn send_sync<T: Send + Sync>() {}

#[test]
fn layers_services_futures_and_bodies_are_send_sync_and_clone_as_promised() {
    type Inner = tower::util::BoxCloneSyncService<
        http::Request<Full<Bytes>>,
        Response<Full<Bytes>>,
        BoxError,
    >;
    send_sync_clone::<ErrorEnrichLayer>();
    send_sync_clone::<ErrorEnrichLayer<Client>>();
    send_sync_clone::<ErrorEnrich<Inner, Server>>();
    send_sync_clone::<ErrorEnrich<Inner, Client>>();
    type Fut = Ready<Result<Response<Full<Bytes>>, BoxError>>;
    send_sync::<ResponseFuture<Fut>>();
    send_sync::<ClientResponseFuture<Fut>>();
    send_sync::<ResponseBody<Full<Bytes>>>();
    send_sync::<Enriched>();
    send_sync::<ErrorEnrichBuilder>();
    send_sync_clone::<ErrorId>();
    #[cfg(feature = "axum")]
    {
        use atscale_error::future::AxumResponseFuture;
        use atscale_error::mode::Axum;
        send_sync_clone::<ErrorEnrichLayer<Axum>>();
        send_sync_clone::<ErrorEnrich<Inner, Axum>>();
        send_sync::<AxumResponseFuture<Fut>>();
    }
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let err = ErrorEnrichLayer::builder("").build().unwrap_err();
    assert_eq!(err.to_string(), r#"invalid service name "": it is empty"#);
    let err = ErrorEnrichLayer::builder("checkout")
        .help_link("https://docs.example.com/errors/{kind}")
        .build_client()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"invalid help link template "https://docs.example.com/errors/{kind}": only the `{code}` and `{id}` placeholders are known"#
    );
    assert_eq!(err.value(), "https://docs.example.com/errors/{kind}");
    let layer = ErrorEnrichLayer::builder("checkout")
        .help_link("https://docs.example.com/errors/{code}")
        .build()
        .unwrap();
    assert_eq!(layer.service(), "checkout");
}

#[test]
#[should_panic(
    expected = "invalid service name \"check out\": it contains whitespace or control characters"
)]
fn new_panics_with_the_reason() {
    let _ = ErrorEnrichLayer::new("check out");
}

#[test]
fn clones_share_the_configuration() {
    let layer = ErrorEnrichLayer::new("checkout");
    let svc = tower::Layer::layer(
        &layer,
        tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }),
    );
    let clone = svc.clone();
    assert!(format!("{clone:?}").contains("checkout"));
    assert!(format!("{layer:?}").contains("Server"));
}
