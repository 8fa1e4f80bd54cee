//! Heartbeats on a real tonic server on loopback (tonic-health's generated
//! service: no protoc needed): a unary call is one request from start to
//! trailers; each message of a server stream is a progress pulse; a stream
//! that goes quiet is cut by the watchdog and the client gets `UNAVAILABLE`
//! with the stall's message.

mod loopback;

use std::net::SocketAddr;
use std::time::Duration;

use atscale::heartbeat::{Monitor, Outcome, Pulse, Pulses};
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

const STALL: Duration = Duration::from_secs(2);

async fn serve(monitor: &Monitor) -> (SocketAddr, HealthReporter) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("demo.Echo", ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .layer(monitor.layer())
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, reporter)
}

async fn client(addr: SocketAddr) -> HealthClient<Channel> {
    HealthClient::new(loopback::channel(addr).await)
}

fn request() -> HealthCheckRequest {
    HealthCheckRequest {
        service: "demo.Echo".into(),
    }
}

/// The next pulse about a request (interval beats are off).
async fn next(pulses: &mut Pulses) -> Pulse {
    pulses.next().await.expect("the monitor is alive")
}

#[tokio::test(start_paused = true)]
async fn a_unary_call_ends_with_its_trailers() {
    let monitor = Monitor::builder().stall(STALL).build();
    let mut pulses = monitor.subscribe();
    let (addr, _reporter) = serve(&monitor).await;
    let mut client = client(addr).await;

    let status = client.check(request()).await.unwrap().into_inner().status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let Pulse::Started { id } = next(&mut pulses).await else {
        panic!("a start first")
    };
    // one message frame, one trailers frame, then the end
    assert_eq!(next(&mut pulses).await, Pulse::Progress { id, units: 1 });
    assert_eq!(next(&mut pulses).await, Pulse::Progress { id, units: 2 });
    assert!(matches!(
        next(&mut pulses).await,
        Pulse::Finished {
            outcome: Outcome::Ok,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_server_stream_beats_per_message_and_is_cut_when_it_goes_quiet() {
    let monitor = Monitor::builder().stall(STALL).build();
    let mut pulses = monitor.subscribe();
    let (addr, reporter) = serve(&monitor).await;
    let mut client = client(addr).await;

    let start = Instant::now();
    let mut watch = client.watch(request()).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(
        first.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // a change 1.5 s later is the next message, and progress
    tokio::time::sleep(Duration::from_millis(1500)).await;
    reporter
        .set_service_status("demo.Echo", ServingStatus::NotServing)
        .await;
    let second = watch.message().await.unwrap().unwrap();
    assert_eq!(
        second.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    // then nothing changes: the stream is cut 2 s after its last message
    let err = watch.message().await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(3500));
    // a proper status, the stall's kind and text, not a broken stream
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "stalled: no progress for 2s");

    let Pulse::Started { id } = next(&mut pulses).await else {
        panic!("a start first")
    };
    assert_eq!(next(&mut pulses).await, Pulse::Progress { id, units: 1 });
    assert_eq!(next(&mut pulses).await, Pulse::Progress { id, units: 2 });
    assert_eq!(
        next(&mut pulses).await,
        Pulse::Finished {
            id,
            outcome: Outcome::Stalled,
            elapsed: Duration::from_millis(3500)
        }
    );
}
