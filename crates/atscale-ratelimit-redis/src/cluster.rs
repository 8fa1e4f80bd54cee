//! Redis Cluster: hash slots, and running a script where its keys live.
//!
//! The cluster client is redis's `cluster_async::ClusterConnection` (one
//! multiplexed connection per node, the slot map refreshed when a node
//! answers `MOVED` or cannot be reached), built with *no* retries of its own:
//! it would resend a command after a dropped connection or a response
//! timeout, when the script may already have run, and count an admission
//! twice. The store resends here instead, and only on the answers that
//! prove that the script did not run:
//!
//! | answer | why the script did not run | what the store does |
//! | --- | --- | --- |
//! | `MOVED slot host:port` | the node does not serve the slot: it checks before running anything | sends it to `host:port` (the client refreshes its slot map meanwhile) |
//! | `ASK slot host:port` | the slot is migrating and a key is already gone: checked before running | sends `ASKING` + the script, in one pipeline, to `host:port` |
//! | `TRYAGAIN` | the keys are split between the two ends of a migration | waits a little and sends it again |
//! | `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`, `READONLY` | refused before running (a write on a replica fails at its first write, before which the scripts write nothing) | waits a little and sends it again |
//! | `NOSCRIPT` | the node does not know the script | sends the whole script (`EVAL`) |
//! | no connection to the slot's node | nothing was sent | waits a little and sends it again |
//! | anything else: I/O error, dropped connection, timeout | the script may have run | never resent: a fault, decided by the [`FaultPolicy`](crate::FaultPolicy) |
//!
//! Resending stops as soon as the caller is gone, and after
//! [`MAX_ATTEMPTS`] tries.

use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};

use crate::script::Lua;

/// Number of hash slots in a Redis Cluster.
pub(crate) const SLOTS: u16 = 16384;

/// The most times one script is sent (the first try and the resends).
pub(crate) const MAX_ATTEMPTS: u32 = 16;

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part between
/// the first `{` and the next `}`, when not empty), or of the whole key.
pub(crate) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    crc16(hashed) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Where the next try goes.
enum Target {
    /// The master of the slot, as the client's slot map says.
    Slot,
    /// A node named by `MOVED`.
    Moved(String, u16),
    /// A node named by `ASK`: `ASKING` first.
    Ask(String, u16),
}

/// What became of one try.
enum Next {
    Done(RedisResult<Value>),
    Again { target: Target, pause: bool },
}

/// Runs `lua` with `keys` (all in one slot) and `args` on the cluster,
/// resending only when the script provably did not run (see the module
/// docs). `alive` says whether the caller still waits; `resent` is called
/// once per resend.
pub(crate) async fn eval(
    conn: &ClusterConnection,
    lua: &Lua,
    keys: &[&str],
    args: &[i64],
    alive: impl Fn() -> bool,
    mut resent: impl FnMut(),
) -> RedisResult<Value> {
    let slot = slot(keys.first().copied().unwrap_or_default());
    let mut conn = conn.clone();
    let mut target = Target::Slot;
    let mut whole = false;
    let mut backoff = Duration::from_millis(5);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut cmd = if whole {
            redis::cmd("EVAL").arg(lua.code).to_owned()
        } else {
            redis::cmd("EVALSHA").arg(lua.script.get_hash()).to_owned()
        };
        cmd.arg(keys.len()).arg(keys).arg(args);
        let result = match &target {
            Target::Slot => {
                let route = Route::new(slot, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                conn.route_command(cmd, routing).await
            }
            Target::Moved(host, port) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                conn.route_command(cmd, routing).await
            }
            Target::Ask(host, port) => {
                let mut pipe = redis::pipe();
                pipe.cmd("ASKING").add_command(cmd);
                let route = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                conn.route_pipeline(pipe, 0, 2, route)
                    .await
                    .and_then(|mut values| values.pop().ok_or_else(no_reply))
            }
        };
        let next = match result.and_then(Value::extract_error) {
            Ok(value) => Next::Done(Ok(value)),
            Err(e) => judge(e, &mut whole, target),
        };
        match next {
            Next::Done(result) => return result,
            Next::Again { .. } if attempt >= MAX_ATTEMPTS || !alive() => {
                return Err(RedisError::from((
                    ErrorKind::Io,
                    "the cluster kept redirecting the rate-limit script",
                    format!("gave up after {attempt} tries"),
                )));
            }
            Next::Again {
                target: next,
                pause,
            } => {
                resent();
                target = next;
                if pause {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        }
    }
}

/// Whether an error proves that the script did not run, and where to send
/// it next if so (`target` is where it went this time).
fn judge(e: RedisError, whole: &mut bool, target: Target) -> Next {
    let node = || {
        e.redirect_node().and_then(|(addr, _slot)| {
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse::<u16>().ok()?))
        })
    };
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::Moved) => match node() {
            Some((host, port)) => Next::Again {
                target: Target::Moved(host, port),
                pause: false,
            },
            None => Next::Again {
                target: Target::Slot,
                pause: true,
            },
        },
        ErrorKind::Server(ServerErrorKind::Ask) => match node() {
            Some((host, port)) => Next::Again {
                target: Target::Ask(host, port),
                pause: false,
            },
            None => Next::Done(Err(e)),
        },
        // the same node again, with the script's source
        ErrorKind::Server(ServerErrorKind::NoScript) if !*whole => {
            *whole = true;
            Next::Again {
                target,
                pause: false,
            }
        }
        ErrorKind::Server(
            ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly,
        )
        // raised before anything is sent: no connection to the node
        | ErrorKind::ClusterConnectionNotFound => Next::Again {
            target: Target::Slot,
            pause: true,
        },
        _ => Next::Done(Err(e)),
    }
}

fn no_reply() -> RedisError {
    RedisError::from((ErrorKind::Client, "no reply to the rate-limit script"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_spec() {
        // the reference value of CRC16/XMODEM, and keys from the spec
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_ne!(
            slot("foo{}{bar}"),
            slot("bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
        assert_eq!(slot("foo{bar}{zap}"), slot("bar"));
    }
}
