//! The rate limit in a real axum server on loopback: clients are told apart
//! by the peer address of their connection (axum's `ConnectInfo`), never by
//! a header they could forge, and a refusal is a 429 with `Retry-After`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use atscale::core::{BoxError, Kind, RateLimited, find};
use atscale::ratelimit::{KeyedLimiter, Limit, PeerIp, RateLimitLayer};
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tower::ServiceBuilder;

async fn to_response(err: BoxError) -> Response {
    let mut resp = (Kind::of(&*err).http_status(), err.to_string()).into_response();
    if let Some(limited) = find::<RateLimited>(&*err) {
        let secs = limited.retry_after().as_secs_f64().ceil() as u64;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// One HTTP/1.1 request on a fresh connection from `from`; the raw answer.
async fn get_from(from: IpAddr, server: SocketAddr, forwarded: &str) -> Result<String, BoxError> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut stream = socket.connect(server).await?;
    let req = format!(
        "GET / HTTP/1.1\r\nhost: test\r\nx-forwarded-for: {forwarded}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

#[tokio::test]
async fn clients_are_limited_by_peer_address_over_real_connections() -> Result<(), BoxError> {
    let per_ip = KeyedLimiter::<IpAddr>::new(Limit::per_minute(2)?);
    let router = Router::new().route("/", get(|| async { "hi" })).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(to_response))
            .layer(
                RateLimitLayer::builder()
                    .keyed(PeerIp::new(), per_ip.clone())
                    .reject()
                    .build()?,
            ),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    let a: IpAddr = "127.0.0.1".parse()?;
    let b: IpAddr = "127.0.0.2".parse()?;
    // Three connections from a (three source ports), each claiming another
    // address in a header: the third is refused all the same.
    assert!(
        get_from(a, server, "1.1.1.1")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        get_from(a, server, "2.2.2.2")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    let refused = get_from(a, server, "3.3.3.3").await?;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    let retry_after = refused
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .expect("a Retry-After header")
        .trim()
        .parse::<u64>()?;
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert!(Duration::from_secs(retry_after) <= Duration::from_secs(30));
    // Another client has its own bucket.
    assert!(
        get_from(b, server, "3.3.3.3")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    assert_eq!(per_ip.len(), 2);
    Ok(())
}

/// The recommended server stack's monitor tells a service that fails from
/// one whose rate limit refuses: 429s are counted as refused and leave its
/// health alone; a handler's 500s make it "not serving".
#[tokio::test]
async fn a_rate_limit_refusing_leaves_the_stacks_health_alone_a_failing_handler_does_not()
-> Result<(), BoxError> {
    use atscale::ratelimit::Limiter;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let limited = atscale::stack::server("health", Duration::from_secs(5))
        .with_rate_limit(RateLimitLayer::reject(Limiter::new(Limit::per_minute(2)?)));
    let monitor = limited.monitor().clone();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(limited);
    for expected in [200, 200, 429, 429, 429, 429] {
        let res = app
            .clone()
            .oneshot(Request::get("/").body(String::new())?)
            .await?;
        assert_eq!(res.status(), expected);
        res.into_body().collect().await?;
    }
    let counts = monitor.counts();
    assert_eq!((counts.ok(), counts.refused(), counts.error()), (2, 4, 0));
    assert!(monitor.health().is_serving(), "{}", monitor.health());

    let plain = atscale::stack::server("health", Duration::from_secs(5));
    let monitor = plain.monitor().clone();
    let app = Router::new()
        .route("/boom", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
        .layer(plain);
    for _ in 0..3 {
        let res = app
            .clone()
            .oneshot(Request::get("/boom").body(String::new())?)
            .await?;
        assert_eq!(res.status(), 500);
        res.into_body().collect().await?;
    }
    assert_eq!(monitor.counts().error(), 3);
    assert_eq!(
        monitor.health().to_string(),
        "not serving: 3 failures in a row"
    );
    Ok(())
}
