//! A Redis Cluster of the test's own: 3 masters and 3 replicas, each a
//! `redis-server --cluster-enabled yes` on free loopback ports (client and
//! bus port both chosen free, `--cluster-port`), joined by `redis-cli
//! --cluster create … --cluster-replicas 1 --cluster-yes`, in a temporary
//! directory; every process killed and the directory removed on drop.
//!
//! A missing `redis-server` or `redis-cli` fails the test (never skips):
//! Debian's `redis-server` and `redis-tools` packages bring them. Set
//! `REDIS_SERVER` / `REDIS_CLI` to use binaries outside `PATH`.
//!
//! The node timeout is 1 s, so that a killed master's replica is promoted
//! within a few seconds.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;

/// The cluster's node timeout (`cluster-node-timeout`).
pub const NODE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Every wait on the cluster (start, promotion) is bounded by this.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// A running cluster of six nodes.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

struct Node {
    port: u16,
    bus: u16,
    child: Option<Child>,
}

fn server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

fn cli_binary() -> String {
    std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned())
}

fn missing(bin: &str, package: &str, err: &std::io::Error) -> ! {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "`{bin}` cannot be started ({err}), and CI=true: the Redis Cluster tests need it; \
             .ci/run must install it first (`apt-get install -y {package}`)"
        );
    }
    panic!(
        "`{bin}` cannot be started ({err}): the Redis Cluster tests run a real cluster. Install \
         it with `apt-get install -y {package}` (or point REDIS_SERVER / REDIS_CLI at the binary)"
    );
}

/// `n` distinct free loopback ports (held together while found, so no two
/// are the same).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}/")
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(READY_WITHIN, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {READY_WITHIN:?}"))
}

impl RedisCluster {
    /// Starts six nodes, makes them a cluster of 3 masters with a replica
    /// each, and waits until every node reports `cluster_state:ok`, agrees
    /// on the 16384 slots, and every replica is in sync.
    pub async fn start() -> RedisCluster {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "atscale-redis-cluster-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster's temporary directory");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        // A port found free can be taken before its node binds it (the node
        // exits): start again on other ports.
        let mut tries = 0;
        loop {
            tries += 1;
            cluster.nodes = free_ports(12)
                .chunks_exact(2)
                .map(|p| Node {
                    port: p[0],
                    bus: p[1],
                    child: None,
                })
                .collect();
            for i in 0..cluster.nodes.len() {
                cluster.launch(i);
            }
            let up = bounded("the cluster nodes answer PING", async {
                for node in &mut cluster.nodes {
                    if !wait_ping(node).await {
                        return false;
                    }
                }
                true
            })
            .await;
            if up {
                break;
            }
            assert!(
                tries < 5,
                "the cluster's nodes did not start on 5 sets of free ports"
            );
            cluster.stop_all();
            for entry in std::fs::read_dir(&cluster.dir)
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let mut create = Command::new(cli_binary());
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = match create.stdin(Stdio::null()).output() {
            Ok(out) => out,
            Err(e) => missing(&cli_binary(), "redis-tools", &e),
        };
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        bounded("the cluster is ready", cluster.wait_ready(&HashSet::new())).await;
        cluster
    }

    fn launch(&mut self, i: usize) {
        let node = &self.nodes[i];
        let conf = self.dir.join(format!("nodes-{}.conf", node.port));
        let child = Command::new(server_binary())
            .args(["--port", &node.port.to_string()])
            .args(["--cluster-port", &node.bus.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(&conf)
            .args([
                "--cluster-node-timeout",
                &NODE_TIMEOUT.as_millis().to_string(),
            ])
            // a replica is promoted however long it was cut off
            .args(["--cluster-replica-validity-factor", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => self.nodes[i].child = Some(child),
            Err(e) => missing(&server_binary(), "redis-server", &e),
        }
    }

    /// Waits until every live node but those in `dead` says
    /// `cluster_state:ok` with all slots served by live masters, and every
    /// live replica's link to its master is up.
    async fn wait_ready(&self, dead: &HashSet<u16>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        'again: loop {
            tick.tick().await;
            for node in self.nodes.iter().filter(|n| !dead.contains(&n.port)) {
                let Ok(mut conn) = try_connect(node.port).await else {
                    continue 'again;
                };
                let info: String = match redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                {
                    Ok(info) => info,
                    Err(_) => continue 'again,
                };
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    continue 'again;
                }
                let Ok(slots) = slot_owners(&mut conn).await else {
                    continue 'again;
                };
                if slots.iter().any(|p| *p == 0 || dead.contains(p)) {
                    continue 'again;
                }
                let repl: String = match redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await
                {
                    Ok(repl) => repl,
                    Err(_) => continue 'again,
                };
                if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                    continue 'again;
                }
            }
            return;
        }
    }

    /// One URL per node (give the store any of them).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| url(n.port)).collect()
    }

    /// The ports of the nodes.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// A live node's port (for asking the cluster).
    fn live(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node")
            .port
    }

    /// The port of the master that serves `slot` now.
    pub async fn master_of(&self, slot: u16) -> u16 {
        let mut conn = connect(self.live()).await;
        let owners = slot_owners(&mut conn).await.expect("CLUSTER SLOTS");
        owners[usize::from(slot)]
    }

    /// The ports of the masters now.
    pub async fn masters(&self) -> Vec<u16> {
        let mut conn = connect(self.live()).await;
        let owners = slot_owners(&mut conn).await.expect("CLUSTER SLOTS");
        let mut masters: Vec<u16> = owners.into_iter().filter(|p| *p != 0).collect();
        masters.sort_unstable();
        masters.dedup();
        masters
    }

    /// The node id of the node on `port`.
    pub async fn id_of(&self, port: u16) -> String {
        let mut conn = connect(port).await;
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER MYID")
    }

    /// The slot of `key`, as the server computes it.
    pub async fn keyslot(&self, key: &str) -> u16 {
        let mut conn = connect(self.live()).await;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("CLUSTER KEYSLOT")
    }

    /// Kills the node on `port` (SIGKILL, as a crash), and waits for it.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of the cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the cluster serves every slot again from live masters
    /// (a replica promoted in place of each dead one), as every live node
    /// sees it. Bounded by [`READY_WITHIN`].
    pub async fn wait_promoted(&self) {
        let dead: HashSet<u16> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_none())
            .map(|n| n.port)
            .collect();
        bounded("a replica is promoted", async {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let mut ok = true;
                for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                    let Ok(mut conn) = try_connect(node.port).await else {
                        ok = false;
                        break;
                    };
                    let info: RedisResultString = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await;
                    let owners = slot_owners(&mut conn).await;
                    match (info, owners) {
                        (Ok(info), Ok(owners))
                            if info.contains("cluster_state:ok")
                                && owners.iter().all(|p| *p != 0 && !dead.contains(p)) => {}
                        _ => {
                            ok = false;
                            break;
                        }
                    }
                }
                if ok {
                    return;
                }
            }
        })
        .await;
    }

    /// `INFO commandstats` `calls` summed over `names` and over every live
    /// node.
    pub async fn calls(&self, names: &[&str]) -> u64 {
        let mut total = 0;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            total += calls_on(node.port, names).await;
        }
        total
    }

    /// Moves `slot` from the master on `from` to the master on `to`, the
    /// way `redis-cli --cluster reshard` does, one step at a time:
    /// [`Migration::begin`] marks it importing / migrating, then the keys
    /// move with `MIGRATE`, then [`Migration::finish`] assigns it.
    pub async fn migration(&self, slot: u16, from: u16, to: u16) -> Migration {
        let mut conn = connect(self.live()).await;
        let masters: HashSet<u16> = slot_owners(&mut conn)
            .await
            .expect("CLUSTER SLOTS")
            .into_iter()
            .collect();
        Migration {
            slot,
            from,
            to,
            from_id: self.id_of(from).await,
            to_id: self.id_of(to).await,
            masters: masters.into_iter().filter(|p| *p != 0).collect(),
        }
    }
}

type RedisResultString = redis::RedisResult<String>;

/// A slot on its way between two masters (see [`RedisCluster::migration`]).
pub struct Migration {
    slot: u16,
    from: u16,
    to: u16,
    from_id: String,
    to_id: String,
    masters: Vec<u16>,
}

impl Migration {
    /// `CLUSTER SETSLOT <slot> IMPORTING` on the target, `MIGRATING` on
    /// the source.
    pub async fn begin(&self) {
        let mut to = connect(self.to).await;
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(self.slot)
            .arg("IMPORTING")
            .arg(&self.from_id)
            .query_async(&mut to)
            .await
            .expect("SETSLOT IMPORTING");
        let mut from = connect(self.from).await;
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(self.slot)
            .arg("MIGRATING")
            .arg(&self.to_id)
            .query_async(&mut from)
            .await
            .expect("SETSLOT MIGRATING");
    }

    /// Moves every key of the slot still on the source, in one `MIGRATE`
    /// (atomic for the keys it names); the number moved.
    pub async fn move_keys(&self) -> usize {
        let mut from = connect(self.from).await;
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(self.slot)
            .arg(1000)
            .query_async(&mut from)
            .await
            .expect("GETKEYSINSLOT");
        if keys.is_empty() {
            return 0;
        }
        let () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(self.to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut from)
            .await
            .expect("MIGRATE");
        keys.len()
    }

    /// `CLUSTER SETSLOT <slot> NODE <target>` on the target, the source, and
    /// every other master: the slot is the target's (replicas learn it from
    /// their masters).
    pub async fn finish(&self) {
        let mut order = vec![self.to, self.from];
        order.extend(
            self.masters
                .iter()
                .filter(|p| **p != self.to && **p != self.from),
        );
        for port in order {
            let mut conn = connect(port).await;
            let () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(self.slot)
                .arg("NODE")
                .arg(&self.to_id)
                .query_async(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("SETSLOT NODE on {port}: {e}"));
        }
    }
}

async fn try_connect(port: u16) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(url(port))?;
    tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))?
}

/// A plain connection to the node on `port`.
pub async fn connect(port: u16) -> MultiplexedConnection {
    try_connect(port)
        .await
        .unwrap_or_else(|e| panic!("connect to the cluster node on {port}: {e}"))
}

/// Waits until the node answers PING (`true`), or its process exits
/// (`false`: its port was taken).
async fn wait_ping(node: &mut Node) -> bool {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        let child = node.child.as_mut().expect("launched");
        if child.try_wait().ok().flatten().is_some() {
            node.child = None;
            return false;
        }
        if let Ok(mut conn) = try_connect(node.port).await {
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
            if pong.as_deref() == Ok("PONG") {
                return true;
            }
        }
    }
}

/// The master port serving each slot (`CLUSTER SLOTS`), indexed by slot;
/// 0 for a slot no one serves.
async fn slot_owners(conn: &mut MultiplexedConnection) -> redis::RedisResult<Vec<u16>> {
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let mut owners = vec![0u16; 16384];
    for range in ranges {
        let redis::Value::Array(items) = range else {
            continue;
        };
        let (Some(start), Some(end), Some(redis::Value::Array(master))) =
            (items.first(), items.get(1), items.get(2))
        else {
            continue;
        };
        let start: u16 = redis::from_redis_value_ref(start)?;
        let end: u16 = redis::from_redis_value_ref(end)?;
        let port: u16 = redis::from_redis_value_ref(&master[1])?;
        for slot in start..=end {
            owners[usize::from(slot)] = port;
        }
    }
    Ok(owners)
}

/// `INFO commandstats` `calls` of the node on `port`, summed over `names`.
pub async fn calls_on(port: u16, names: &[&str]) -> u64 {
    let mut conn = connect(port).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO commandstats");
    super::commandstats_calls(&info, names)
}

impl RedisCluster {
    fn stop_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.stop_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
