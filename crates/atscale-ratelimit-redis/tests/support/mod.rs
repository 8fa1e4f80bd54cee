//! A `redis-server` of the test's own, on a free loopback port, stopped when
//! the guard is dropped. The one place the tests (and the benchmark) start
//! Redis.
//!
//! A missing `redis-server` fails the test with a message saying how to
//! install it; under `CI=true` the message says that CI must install it.
//! Set `REDIS_SERVER` to use a binary outside `PATH`.

#![allow(dead_code, unreachable_pub)]

pub mod cluster;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `redis-server`, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

fn binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

fn missing(err: &std::io::Error) -> ! {
    let bin = binary();
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "`{bin}` cannot be started ({err}), and CI=true: the Redis store tests need a real \
             redis-server; .ci/run must install it first (`apt-get install -y redis-server`)"
        );
    }
    panic!(
        "`{bin}` cannot be started ({err}): these tests run a real Redis. Install it with \
         `apt-get install -y redis-server` (or point REDIS_SERVER at a redis-server binary)"
    );
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        // A port found free can be taken before the server binds it: retry.
        for _ in 0..5 {
            let mut server = RedisServer {
                child: None,
                port: free_port(),
            };
            if server.launch().await {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// The URL of the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// Kills the server and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (with empty state: nothing
    /// is persisted) and waits until it answers PING.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..20 {
            if self.launch().await {
                return;
            }
            // the old socket may linger for a moment
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// Suspends the server (SIGSTOP): it keeps its connections but answers
    /// nothing, like a Redis stuck on a slow command.
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    /// Resumes a suspended server (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Starts the process; `false` if it exited (the port was taken).
    async fn launch(&mut self) -> bool {
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => missing(&e),
        };
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Polls PING every 10 ms, at most 500 times (5 s).
    async fn wait_ready(&mut self) -> bool {
        let client = redis::Client::open(self.url()).expect("a valid URL");
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..500 {
            tick.tick().await;
            let child = self.child.as_mut().expect("launched");
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return false;
            }
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                if pong.as_deref() == Ok("PONG") {
                    return true;
                }
            }
        }
        panic!(
            "redis-server on port {} did not answer PING within 5 s",
            self.port
        );
    }

    /// A plain connection to the server, for inspecting it.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("a valid URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis-server")
    }

    /// How many times Redis ran each command so far (`INFO commandstats`):
    /// `calls` summed over every command whose name is in `names`.
    pub async fn calls(&self, names: &[&str]) -> u64 {
        let mut conn = self.connection().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .expect("INFO commandstats");
        commandstats_calls(&info, names)
    }
}

/// The `calls` of `INFO commandstats` output, summed over every command
/// whose name is in `names` (lines like `cmdstat_evalsha:calls=12,usec=...`).
pub fn commandstats_calls(info: &str, names: &[&str]) -> u64 {
    info.lines()
        .filter_map(|line| line.strip_prefix("cmdstat_"))
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| names.contains(name))
        .filter_map(|(_, stats)| stats.strip_prefix("calls="))
        .filter_map(|stats| stats.split(',').next()?.parse::<u64>().ok())
        .sum()
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // a suspended server must be resumed to die of SIGKILL promptly
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}
