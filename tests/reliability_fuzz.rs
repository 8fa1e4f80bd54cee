//! Reliability: every parser of input from the network, fuzzed without
//! cargo-fuzz (no nightly toolchain here): a committed corpus of nasty
//! inputs (`tests/fixtures/reliability/*.txt`) is replayed, then mutated by a
//! small seeded mutational fuzzer, and every input is checked against an
//! independent oracle written from the documented format, not from the code.
//!
//! Parsers covered: `grpc-timeout` and the millisecond deadline header (the
//! codec functions, and the whole `DeadlineLayer` on a request carrying the
//! value), error ids quoted back by users (`ErrorId: FromStr`), the trusted
//! proxy header of the rate limit's `PeerIp`, and the request content type
//! by which `ErrorEnrich` picks a gRPC status or a problem document.
//!
//! Rerun with more mutations: `RELIABILITY_FUZZ_ROUNDS=20000 cargo test --test reliability_fuzz`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use atscale::core::{BoxError, Context, Kind};
use atscale::deadline::DeadlineLayer;
use atscale::deadline::codec::{parse_grpc_timeout, parse_millis};
use atscale::error::{ErrorEnrichLayer, ErrorId};
use atscale::ratelimit::{PeerIp, RequestKey};
use http::{HeaderName, HeaderValue, Request};
use tower::{Layer, ServiceExt, service_fn};

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");

// ---------------------------------------------------------------- corpus

/// Decodes one corpus line: `\xNN` a byte, `\t` a tab, `\\` a backslash,
/// `<empty>` the empty input.
fn decode(line: &str) -> Vec<u8> {
    if line == "<empty>" {
        return Vec::new();
    }
    let bytes = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1)) {
            (b'\\', Some(b'x')) => {
                let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).expect("two hex digits");
                out.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
                i += 4;
            }
            (b'\\', Some(b't')) => {
                out.push(b'\t');
                i += 2;
            }
            (b'\\', Some(b'\\')) => {
                out.push(b'\\');
                i += 2;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let path = format!(
        "{}/tests/fixtures/reliability/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let inputs: Vec<Vec<u8>> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(decode)
        .collect();
    assert!(inputs.len() >= 10, "{path}: a corpus, not a stub");
    inputs
}

/// SplitMix64: a fixed, seeded stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes a mutation inserts: the formats' own alphabet first, then anything.
const ALPHABET: &[u8] = b"0123456789HMSmunabcdefABCDEF.,:;-+ \t[]%x\xff\xc2\xb5\x00";

/// One mutation of `input`, picked by `rng`, sometimes splicing `other` in.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(3) {
        let byte = if rng.below(4) == 0 {
            rng.next() as u8
        } else {
            ALPHABET[rng.below(ALPHABET.len())]
        };
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = byte;
            }
            1 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, byte);
            }
            2 if !v.is_empty() => {
                v.remove(rng.below(v.len()));
            }
            3 if !v.is_empty() => {
                let (a, b) = (rng.below(v.len()), rng.below(v.len()));
                let slice = v[a.min(b)..a.max(b)].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, slice);
            }
            4 => v.truncate(rng.below(v.len() + 1)),
            5 => {
                let cut = rng.below(other.len() + 1);
                v.extend_from_slice(&other[cut..]);
            }
            _ => {
                // a run of digits: lengths around the formats' limits
                let n = [1, 7, 8, 9, 19, 20, 21, 40][rng.below(8)];
                let at = rng.below(v.len() + 1);
                let digits: Vec<u8> = (0..n).map(|_| b'0' + rng.below(10) as u8).collect();
                v.splice(at..at, digits);
            }
        }
    }
    v
}

fn rounds() -> usize {
    std::env::var("RELIABILITY_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// The corpus, then `rounds()` mutations of each corpus entry.
fn inputs(name: &str, seed: u64) -> Vec<Vec<u8>> {
    let seeds = corpus(name);
    let mut rng = Rng(seed);
    let mut all = seeds.clone();
    for _ in 0..rounds() {
        for s in &seeds {
            let other = &seeds[rng.below(seeds.len())];
            all.push(mutate(&mut rng, s, other));
        }
    }
    all
}

// ---------------------------------------------------------------- oracles

/// `grpc-timeout` from the gRPC over HTTP/2 spec: `TimeoutValue TimeoutUnit`,
/// 1 to 8 ASCII digits and one of `H M S m u n`.
fn grpc_oracle(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u128 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let nanos_per: u128 = match unit {
        b'H' => 3_600_000_000_000,
        b'M' => 60_000_000_000,
        b'S' => 1_000_000_000,
        b'm' => 1_000_000,
        b'u' => 1_000,
        b'n' => 1,
        _ => return None,
    };
    let nanos = n * nanos_per;
    Some(Duration::new(
        u64::try_from(nanos / 1_000_000_000).ok()?,
        (nanos % 1_000_000_000) as u32,
    ))
}

/// The millisecond header, as documented: 1 to 20 ASCII digits fitting a u64.
fn millis_oracle(v: &[u8]) -> Option<Duration> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(v).ok()?.parse().ok()?;
    Some(Duration::from_millis(n))
}

/// An error id: exactly 32 hexadecimal digits, either case.
fn id_oracle(v: &[u8]) -> Option<u128> {
    if v.len() != 32 || !v.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(v).ok()?, 16).ok()
}

/// `PeerIp::trusting_header`, as documented: the rightmost address of the
/// header (the last entry of its last line), or the connection's peer when
/// the header is missing or that entry is unparsable. Entries further left
/// were written by the client and must never be used.
fn forwarded_oracle(lines: &[HeaderValue], peer: IpAddr) -> IpAddr {
    lines
        .last()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|ip| ip.trim().parse().ok())
        .unwrap_or(peer)
}

/// gRPC by content type, as `ErrorEnrich` documents it: `application/grpc`
/// (any case), alone or followed by `+`, `-` or `;` (a suffix, gRPC-Web,
/// parameters).
fn grpc_oracle_ct(v: &[u8]) -> bool {
    v.len() >= 16
        && v[..16].eq_ignore_ascii_case(b"application/grpc")
        && matches!(v.get(16), None | Some(b'+' | b'-' | b';'))
}

// ---------------------------------------------------------------- tests

#[test]
fn grpc_timeout_parser_agrees_with_the_spec() {
    let inputs = inputs("grpc-timeout.txt", 1);
    let mut accepted = 0;
    for v in &inputs {
        let got = parse_grpc_timeout(v);
        assert_eq!(
            got.as_ref().ok(),
            grpc_oracle(v).as_ref(),
            "{:?}",
            v.escape_ascii().to_string()
        );
        if let Err(e) = got {
            assert_eq!(e.header(), "grpc-timeout");
            // The reason is ours, never the caller's bytes echoed back.
            assert!(e.reason().is_ascii() && e.reason().len() < 64);
            assert_eq!(Kind::of(&e), Kind::BadRequest);
        } else {
            accepted += 1;
        }
    }
    // The fuzzer reaches both sides of the format.
    assert!(
        accepted > inputs.len() / 50,
        "{accepted} of {}",
        inputs.len()
    );
    assert!(
        accepted < inputs.len() / 2,
        "{accepted} of {}",
        inputs.len()
    );
}

#[test]
fn millisecond_header_parser_agrees_with_its_docs() {
    let inputs = inputs("millis.txt", 2);
    let mut accepted = 0;
    for v in &inputs {
        let got = parse_millis(&X_DEADLINE, v);
        assert_eq!(
            got.as_ref().ok(),
            millis_oracle(v).as_ref(),
            "{:?}",
            v.escape_ascii().to_string()
        );
        match got {
            Ok(_) => accepted += 1,
            Err(e) => assert_eq!(e.header(), "x-deadline-ms"),
        }
    }
    assert!(accepted > inputs.len() / 50 && accepted < inputs.len() / 2);
}

#[test]
fn error_id_parser_agrees_with_its_docs() {
    let inputs = inputs("error-id.txt", 3);
    let mut accepted = 0;
    for v in &inputs {
        let Ok(text) = std::str::from_utf8(v) else {
            assert_eq!(id_oracle(v), None);
            continue;
        };
        let got = text.parse::<ErrorId>();
        assert_eq!(
            got.as_ref().ok().map(|id| id.as_u128()),
            id_oracle(v),
            "{text:?}"
        );
        if let Ok(id) = got {
            accepted += 1;
            assert_eq!(id.to_string(), text.to_ascii_lowercase(), "round trip");
        }
    }
    assert!(accepted > 10, "{accepted}");
}

#[test]
fn trusted_forwarded_header_is_read_rightmost_only() {
    let name = HeaderName::from_static("x-forwarded-for");
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let key = PeerIp::trusting_header(name.clone());
    let mut rng = Rng(4);
    let seeds = corpus("forwarded.txt");
    let mut cases: Vec<Vec<u8>> = seeds.clone();
    for _ in 0..rounds() {
        for s in &seeds {
            let other = &seeds[rng.below(seeds.len())];
            cases.push(mutate(&mut rng, s, other));
        }
    }
    let mut forwarded = 0;
    for case in &cases {
        // " | " separates header lines; values HTTP cannot carry are skipped
        let text = case.split(|&b| b == b'|').map(|l| l.trim_ascii().to_vec());
        let Ok(lines) = text
            .map(|l| HeaderValue::from_bytes(&l))
            .collect::<Result<Vec<_>, _>>()
        else {
            continue;
        };
        let mut req = Request::new(());
        req.extensions_mut().insert(SocketAddr::new(peer, 4242));
        if !case.is_empty() {
            for line in &lines {
                req.headers_mut().append(name.clone(), line.clone());
            }
        }
        let lines = if case.is_empty() { Vec::new() } else { lines };
        let want = forwarded_oracle(&lines, peer);
        let got = key.key(&req);
        assert_eq!(got, Some(want), "{:?}", case.escape_ascii().to_string());
        forwarded += usize::from(want != peer);
    }
    assert!(forwarded > 100, "{forwarded}");
}

/// The parsers as the deadline layer uses them: a request carrying each
/// (valid as an HTTP header value) fuzzed value in `grpc-timeout` and in the
/// millisecond header, through `DeadlineLayer::server(10 s)`, on the paused
/// clock. Either it is a bad request, or the handler runs with exactly
/// min(10 s, the value) left, or (a zero budget) the deadline has passed.
#[tokio::test(start_paused = true)]
async fn deadline_layer_on_fuzzed_headers() -> Result<(), BoxError> {
    let budget = Duration::from_secs(10);
    let svc = DeadlineLayer::server(budget)
        .with_header(X_DEADLINE)
        .layer(service_fn(|_req: Request<()>| async {
            let cx = Context::current().expect("set by the layer");
            Ok::<_, BoxError>(cx.remaining().expect("a deadline"))
        }));
    let mut checked = 0;
    for (name, file, seed) in [
        ("grpc-timeout", "grpc-timeout.txt", 5),
        ("x-deadline-ms", "millis.txt", 6),
    ] {
        for v in inputs(file, seed).into_iter().take(20_000) {
            let Ok(value) = HeaderValue::from_bytes(&v) else {
                continue;
            };
            let want = if name == "grpc-timeout" {
                grpc_oracle(&v)
            } else {
                millis_oracle(&v)
            };
            let req = Request::builder().header(name, value).body(())?;
            let got = svc.clone().oneshot(req).await;
            let what = v.escape_ascii().to_string();
            match (want, got) {
                (None, Err(e)) => assert_eq!(Kind::of(&*e), Kind::BadRequest, "{what}"),
                (Some(d), Err(e)) if d.is_zero() => {
                    assert_eq!(Kind::of(&*e), Kind::DeadlineExceeded, "{what}");
                }
                (Some(d), Ok(left)) => assert_eq!(left, d.min(budget), "{what}"),
                (want, got) => panic!("{name}: {what}: want {want:?}, got {got:?}"),
            }
            checked += 1;
        }
    }
    assert!(checked > 10_000, "{checked}");
    Ok(())
}

/// Failing requests with fuzzed content types through a server-mode
/// `ErrorEnrich`: a gRPC one gets a trailers-only answer (HTTP 200, its own
/// content type back, `grpc-status`), anything else a problem document; a
/// content type never makes the answer anything else.
#[tokio::test]
async fn error_enrich_picks_grpc_or_problem_by_content_type() -> Result<(), BoxError> {
    let svc = ErrorEnrichLayer::new("fuzz").layer(service_fn(|_req: Request<()>| async {
        Err::<http::Response<http_body_util::Empty<bytes::Bytes>>, _>(BoxError::from("failed"))
    }));
    let (mut grpc, mut problems) = (0, 0);
    for v in inputs("content-type.txt", 7).into_iter().take(30_000) {
        let Ok(value) = HeaderValue::from_bytes(&v) else {
            continue;
        };
        let req = Request::builder()
            .header("content-type", value.clone())
            .body(())?;
        let res = svc.clone().oneshot(req).await?;
        let what = v.escape_ascii().to_string();
        if grpc_oracle_ct(&v) {
            assert_eq!(res.status(), http::StatusCode::OK, "{what}");
            assert_eq!(res.headers()["content-type"], value, "{what}");
            assert_eq!(res.headers()["grpc-status"], "13", "{what}");
            grpc += 1;
        } else {
            assert_eq!(
                res.status(),
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "{what}"
            );
            assert_eq!(
                res.headers()["content-type"],
                "application/problem+json",
                "{what}"
            );
            assert!(res.headers().get("grpc-status").is_none(), "{what}");
            problems += 1;
        }
    }
    println!("content types: {grpc} answered as gRPC, {problems} as problem documents");
    assert!(
        grpc > 1_000 && problems > 1_000,
        "{grpc} gRPC, {problems} problems"
    );
    Ok(())
}
