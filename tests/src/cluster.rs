//! Clusters of the test's own, to lose a node under the fleet: a Redis Cluster (3 masters, 3
//! replicas) whose masters can be SIGKILLed, and extra RabbitMQ nodes clustered together whose
//! nodes can be stopped. Never the shared Redis or broker, which other tests use; every process
//! and directory started here goes away on Drop.

use crate::app::eventually;
use crate::fault::free_port;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A log file for a child's stdout and stderr, so a failure can show what the server said.
fn log_to(path: &Path) -> (Stdio, Stdio) {
    let out = File::create(path).expect("a log file");
    let err = out.try_clone().expect("a log file handle");
    (out.into(), err.into())
}

/// The last lines of a log, for a failure message.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    format!(
        "--- {} ---\n{}",
        path.display(),
        all[all.len().saturating_sub(lines)..].join("\n")
    )
}

/// A CLI call, bounded (120 s): its output, successful or not.
async fn try_run(program: &str, args: &[&str]) -> Output {
    tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("`{program} {}` did not finish in 120 s", args.join(" ")))
    .unwrap_or_else(|e| panic!("`{program}` runs: {e}"))
}

fn describe_output(program: &str, args: &[&str], output: &Output) -> String {
    format!(
        "`{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A CLI call that must succeed: its output, or a panic showing what it said.
async fn run(program: &str, args: &[&str]) -> Output {
    let output = try_run(program, args).await;
    assert!(
        output.status.success(),
        "{}",
        describe_output(program, args, &output)
    );
    output
}

/// Whether a child exits within `within`: for Drop, which cannot await.
fn exits_within(child: &mut Child, within: Duration) -> bool {
    let until = Instant::now() + within;
    loop {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------------------------

/// Three masters and three replicas on loopback, AOF on (fsync every second), with a
/// 2 s node timeout so a failover takes seconds, not the default 15 s.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<RedisNode>,
}

struct RedisNode {
    port: u16,
    /// `None` once killed.
    child: Option<Child>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The master's id, for a replica.
    master_id: Option<String>,
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Failed, suspected failed, or not yet (or no longer) known by address.
    fn is_unhealthy(&self) -> bool {
        self.flags
            .iter()
            .any(|f| matches!(f.as_str(), "fail" | "fail?" | "handshake" | "noaddr"))
    }

    /// A live master serving slots: one a client is routed to.
    fn is_serving_master(&self) -> bool {
        self.is_master() && !self.is_unhealthy() && !self.slots.is_empty()
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let addr = fields[1].split('@').next()?;
            let port = addr.rsplit(':').next()?.parse().ok()?;
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('[')) // slots being migrated or imported
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(NodeLine {
                id: fields[0].to_owned(),
                port,
                flags: fields[2].split(',').map(str::to_owned).collect(),
                master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            })
        })
        .collect()
}

/// One connection to one node, bounded: a node that is down or hung answers `None`.
async fn node_connection(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

async fn query<T: redis::FromRedisValue>(
    c: &mut redis::aio::MultiplexedConnection,
    cmd: &redis::Cmd,
) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async(c))
        .await
        .ok()?
        .ok()
}

async fn cluster_nodes(port: u16) -> Option<Vec<NodeLine>> {
    let mut c = node_connection(port).await?;
    let text: String = query(&mut c, redis::cmd("CLUSTER").arg("NODES")).await?;
    Some(parse_nodes(&text))
}

/// Whether `port` sees the cluster whole: state ok, `masters` serving masters each with a live
/// replica, nobody failing, and (on a replica) its link to its master up.
async fn sees_healthy_cluster(port: u16, masters: usize) -> bool {
    let check = async {
        let mut c = node_connection(port).await?;
        let info: String = query(&mut c, redis::cmd("CLUSTER").arg("INFO")).await?;
        let nodes: String = query(&mut c, redis::cmd("CLUSTER").arg("NODES")).await?;
        let replication: String = query(&mut c, redis::cmd("INFO").arg("replication")).await?;
        let nodes = parse_nodes(&nodes);
        let serving: Vec<&NodeLine> = nodes.iter().filter(|n| n.is_serving_master()).collect();
        let all_replicated = serving.iter().all(|m| {
            nodes
                .iter()
                .any(|r| r.master_id.as_deref() == Some(m.id.as_str()) && !r.is_unhealthy())
        });
        let link_up =
            !replication.contains("role:slave") || replication.contains("master_link_status:up");
        Some(
            info.contains("cluster_state:ok")
                && serving.len() == masters
                && nodes.iter().all(|n| !n.is_unhealthy())
                && all_replicated
                && link_up,
        )
    };
    check.await.unwrap_or(false)
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create`, and waits until every node
    /// sees three masters, each with a replica whose link is up.
    pub async fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "ae-redis-cluster-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        // Each node needs a cluster bus port as well: by default port + 10000, which nobody
        // checked was free, so every node gets its own free one (`--cluster-port`).
        let ports: Vec<(u16, u16)> = (0..6).map(|_| (free_port(), free_port())).collect();
        // Built before anything runs, so a panic below still kills what did start.
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
        };
        for &(port, bus_port) in &ports {
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("a node directory");
            let (stdout, stderr) = log_to(&node_dir.join("redis.log"));
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-port", &bus_port.to_string()])
                .args(["--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(node_dir.join("nodes.conf"))
                .arg("--dir")
                .arg(&node_dir)
                .args(["--appendonly", "yes", "--appendfsync", "everysec"])
                .args(["--save", ""])
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .expect("redis-server starts");
            cluster.nodes.push(RedisNode {
                port,
                child: Some(child),
            });
        }
        for node in &cluster.nodes {
            let up = eventually(Duration::from_secs(20), || async {
                let mut c = node_connection(node.port).await?;
                let pong: String = query(&mut c, &redis::cmd("PING")).await?;
                (pong == "PONG").then_some(())
            })
            .await;
            assert!(
                up.is_some(),
                "redis-server on {} answers\n{}",
                node.port,
                cluster.log_tail(node.port)
            );
        }

        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        run("redis-cli", &args).await;

        let ports = cluster.live_ports();
        let healthy = eventually(Duration::from_secs(30), || async {
            for &port in &ports {
                if !sees_healthy_cluster(port, 3).await {
                    return None;
                }
            }
            Some(())
        })
        .await;
        assert!(
            healthy.is_some(),
            "the Redis Cluster forms within 30 s: 3 masters, each with a replica\n{}",
            cluster.describe().await
        );
        cluster
    }

    /// `redis+cluster://127.0.0.1:P1,...`: the fleet's cluster URL, every node listed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// `redis://127.0.0.1:P/` for every node, dead or alive: seeds for a cluster client.
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// The cluster as the first live node that answers sees it.
    async fn view(&self) -> Vec<NodeLine> {
        for port in self.live_ports() {
            if let Some(nodes) = cluster_nodes(port).await {
                return nodes;
            }
        }
        panic!("no node of the Redis Cluster answers CLUSTER NODES");
    }

    /// Ports of the masters serving slots now (a killed master is flagged `fail` and, once its
    /// replica took over, serves none).
    pub async fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .view()
            .await
            .iter()
            .filter(|n| n.is_serving_master())
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The master that serves `key`'s hash slot.
    pub async fn master_of_key(&self, key: &str) -> u16 {
        let mut slot = None;
        for port in self.live_ports() {
            if let Some(mut c) = node_connection(port).await {
                slot = query::<u16>(&mut c, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await;
                if slot.is_some() {
                    break;
                }
            }
        }
        let slot = slot.expect("a node answers CLUSTER KEYSLOT");
        self.view()
            .await
            .iter()
            .find(|n| n.is_serving_master() && n.owns(slot))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no live master serves slot {slot} (key {key:?})"))
    }

    /// SIGKILLs the master on `port`, waits until its replica took over and every surviving
    /// node sees the cluster ok again (3 masters, none of them `port`), and returns the
    /// promoted replica's port.
    pub async fn kill_master(&mut self, port: u16) -> u16 {
        let view = self.view().await;
        let master = view
            .iter()
            .find(|n| n.port == port && n.is_serving_master())
            .unwrap_or_else(|| panic!("{port} is no live master of the cluster"));
        let replicas: Vec<u16> = view
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(master.id.as_str()))
            .map(|n| n.port)
            .collect();
        assert!(
            !replicas.is_empty(),
            "master {port} has a replica to promote"
        );

        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }

        let survivors = self.live_ports();
        let promoted = eventually(Duration::from_secs(30), || async {
            let mut promoted = None;
            for &survivor in &survivors {
                let mut c = node_connection(survivor).await?;
                let info: String = query(&mut c, redis::cmd("CLUSTER").arg("INFO")).await?;
                let nodes: String = query(&mut c, redis::cmd("CLUSTER").arg("NODES")).await?;
                let masters: Vec<u16> = parse_nodes(&nodes)
                    .iter()
                    .filter(|n| n.is_serving_master())
                    .map(|n| n.port)
                    .collect();
                let new = masters.iter().copied().find(|p| replicas.contains(p));
                if !info.contains("cluster_state:ok")
                    || masters.len() != 3
                    || masters.contains(&port)
                    || new.is_none()
                {
                    return None;
                }
                promoted = new;
            }
            promoted
        })
        .await;
        match promoted {
            Some(promoted) => promoted,
            None => panic!(
                "a replica of {port} takes over within 30 s\n{}",
                self.describe().await
            ),
        }
    }

    /// Every live node's CLUSTER NODES and its log's tail, for a failure message.
    async fn describe(&self) -> String {
        let mut out = String::new();
        for port in self.live_ports() {
            let nodes = match node_connection(port).await {
                Some(mut c) => query::<String>(&mut c, redis::cmd("CLUSTER").arg("NODES"))
                    .await
                    .unwrap_or_else(|| "(no answer)".into()),
                None => "(no connection)".into(),
            };
            out.push_str(&format!(
                "=== node {port}: CLUSTER NODES ===\n{nodes}\n{}\n",
                self.log_tail(port)
            ));
        }
        out
    }

    fn log_tail(&self, port: u16) -> String {
        tail(&self.dir.join(port.to_string()).join("redis.log"), 15)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ cluster
// ---------------------------------------------------------------------------------------------

/// RabbitMQ nodes of the test's own, clustered, each with its own listener, distribution port,
/// node name and files (so none of it touches the shared `rabbit@localhost`).
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
}

struct RabbitNode {
    name: String,
    port: u16,
    dir: PathBuf,
    /// The `rabbitmq-server` script, which runs the node as the `rabbitmq` user through `su`:
    /// killing it leaves the Erlang VM running, whose pid is in `dir/pid`. `None` once stopped.
    child: Option<Child>,
}

impl RabbitNode {
    /// Lays out the node's files and starts it, without waiting.
    fn spawn(name: String, port: u16, dist_port: u16, dir: PathBuf) -> RabbitNode {
        std::fs::create_dir_all(dir.join("mnesia")).expect("a mnesia directory");
        std::fs::create_dir_all(dir.join("log")).expect("a log directory");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("rabbitmq.conf");
        // The node runs as `rabbitmq` (rabbitmq-server drops to it when started as root).
        let chown = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .expect("chown runs");
        assert!(
            chown.success(),
            "chown -R rabbitmq:rabbitmq {}",
            dir.display()
        );
        let (stdout, stderr) = log_to(&dir.join("server.log"));
        let child = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            // Absent on purpose: not /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("env.conf"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", dir.join("feature_flags"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            // Distribution on loopback only, as the shared node's ERL_FLAGS have it.
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("rabbitmq-server starts");
        RabbitNode {
            name,
            port,
            dir,
            child: Some(child),
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn log_tail(&self) -> String {
        format!(
            "{}\n{}",
            tail(&self.dir.join("server.log"), 20),
            tail(&self.dir.join("log").join(format!("{}.log", self.name)), 20)
        )
    }

    /// Waits until the node boots (its AMQP listener opens, then `await_startup`), or panics
    /// with its logs if it exits first or takes over 90 s.
    async fn await_boot(&mut self) {
        let port = self.port;
        let child = self.child.as_mut().expect("a started node");
        let booted = eventually(Duration::from_secs(90), || {
            let exited = !matches!(child.try_wait(), Ok(None));
            async move {
                if exited {
                    return Some(false);
                }
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| true)
            }
        })
        .await;
        assert!(
            booted == Some(true),
            "RabbitMQ node {} boots within 90 s (exited: {})\n{}",
            self.name,
            booted == Some(false),
            self.log_tail()
        );
        let args = ["-n", &self.name, "await_startup"];
        let output = try_run("rabbitmqctl", &args).await;
        assert!(
            output.status.success(),
            "{}\n{}",
            describe_output("rabbitmqctl", &args, &output),
            self.log_tail()
        );
    }

    /// Stops the node gracefully and waits until its process exits.
    async fn stop(&mut self) {
        run("rabbitmqctl", &["-n", &self.name, "stop"]).await;
        let mut child = self.child.take().expect("a running node");
        let exited = eventually(Duration::from_secs(60), || {
            let status = child.try_wait();
            async move { (!matches!(status, Ok(None))).then_some(()) }
        })
        .await;
        if exited.is_none() {
            self.kill_vm();
            let _ = child.kill();
            let _ = child.wait();
            panic!("RabbitMQ node {} exits within 60 s of `stop`", self.name);
        }
    }

    /// SIGKILL to the Erlang VM itself (`child` is only the script above it).
    fn kill_vm(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = Command::new("kill")
                .args(["-9", pid.trim()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl RabbitCluster {
    /// Boots `nodes` nodes at once, then joins the 2nd, 3rd... to the first (`stop_app`,
    /// `join_cluster`, `start_app`), and waits until the first lists them all running.
    pub async fn start(nodes: usize) -> RabbitCluster {
        assert!(nodes >= 1, "a cluster has a node");
        let tag = format!("ae{}{:04x}", std::process::id(), rand::random::<u16>());
        // Built as the nodes start, so a panic below still stops what did start.
        let mut cluster = RabbitCluster { nodes: Vec::new() };
        for i in 1..=nodes {
            let port = free_port();
            let dist_port = free_port();
            let dir = std::env::temp_dir().join(format!("{tag}n{i}"));
            cluster.nodes.push(RabbitNode::spawn(
                format!("{tag}n{i}@localhost"),
                port,
                dist_port,
                dir,
            ));
        }
        for node in &mut cluster.nodes {
            node.await_boot().await;
        }

        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            run("rabbitmqctl", &["-n", &node.name, "stop_app"]).await;
            run("rabbitmqctl", &["-n", &node.name, "join_cluster", &first]).await;
            run("rabbitmqctl", &["-n", &node.name, "start_app"]).await;
        }

        let names = cluster.node_names();
        let all_running = eventually(Duration::from_secs(60), || async {
            let out = run(
                "rabbitmqctl",
                &["-n", &first, "cluster_status", "--formatter", "json"],
            )
            .await;
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let running = status["running_nodes"].as_array()?;
            names
                .iter()
                .all(|n| running.iter().any(|r| r.as_str() == Some(n.as_str())))
                .then_some(())
        })
        .await;
        assert!(
            all_running.is_some(),
            "{first} lists all {nodes} nodes running within 60 s"
        );
        cluster
    }

    /// Every node's URL, joined with commas: the fleet's multi-node broker setting.
    pub fn amqp_url(&self) -> String {
        self.node_urls().join(",")
    }

    /// `amqp://guest:guest@127.0.0.1:P/%2f` for every node, stopped or not, in node order.
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RabbitNode::url).collect()
    }

    /// Erlang node names (`ae<pid><rand>n<i>@localhost`), in node order.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Stops node `i` (0-based, the order of `node_urls`) gracefully and waits until it exits;
    /// the others keep the cluster.
    pub async fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop().await;
    }

    fn running_node(&self) -> &RabbitNode {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a running node")
    }

    /// A `rabbitmqctl list_<what>` of a running node, as JSON rows.
    async fn list(&self, what: &str, columns: &[&str]) -> Vec<serde_json::Value> {
        let node = &self.running_node().name;
        let command = format!("list_{what}");
        let mut args = vec!["-n", node.as_str(), command.as_str()];
        args.extend_from_slice(columns);
        args.extend_from_slice(&["--formatter", "json"]);
        let out = run("rabbitmqctl", &args).await;
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("rabbitmqctl {command} prints JSON: {e}"))
    }

    /// How many AMQP client connections node `i` (0-based) holds now (counted by the listener
    /// they came in on: 3.10's `list_connections` has no `node` column): which node stopping
    /// drops the most of the fleet's connections. A stopped node holds none.
    pub async fn connections(&self, i: usize) -> usize {
        let port = u64::from(self.nodes[i].port);
        self.list("connections", &["port"])
            .await
            .iter()
            .filter(|c| c["port"].as_u64() == Some(port))
            .count()
    }

    /// The node, other than the first (a harness's own connection may live there), holding the
    /// most client connections: the one whose stop drops the most of the fleet's. Panics when
    /// none holds any: stopping it would break nothing.
    pub async fn busiest_node_but_first(&self) -> usize {
        let mut best = (0, 0);
        for i in 1..self.nodes.len() {
            let connections = self.connections(i).await;
            if connections > best.1 {
                best = (i, connections);
            }
        }
        assert!(
            best.1 > 0,
            "the fleet is connected to a node other than the first"
        );
        best.0
    }

    /// How many members quorum queue `queue` (vhost `/`) has, as a running node lists them
    /// (the configured membership: a stopped member still counts).
    pub async fn quorum_members(&self, queue: &str) -> usize {
        self.list("queues", &["name", "members"])
            .await
            .iter()
            .find(|q| q["name"].as_str() == Some(queue))
            .unwrap_or_else(|| panic!("no queue {queue:?}"))["members"]
            .as_array()
            .unwrap_or_else(|| panic!("{queue:?} has a member list (a quorum queue)"))
            .len()
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        let running: Vec<&mut RabbitNode> = self
            .nodes
            .iter_mut()
            .filter(|n| n.child.is_some())
            .collect();
        // All at once: a node waits for nothing of the others to stop.
        let mut stops: Vec<Child> = running
            .iter()
            .filter_map(|n| {
                Command::new("rabbitmqctl")
                    .args(["-n", &n.name, "stop"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
            })
            .collect();
        for stop in &mut stops {
            if !exits_within(stop, Duration::from_secs(30)) {
                let _ = stop.kill();
                let _ = stop.wait();
            }
        }
        for node in running {
            let mut child = node.child.take().expect("a running node");
            // The script exits with the VM; while it runs, the pid file still names the VM.
            if !exits_within(&mut child, Duration::from_secs(15)) {
                node.kill_vm();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(&node.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    async fn timed<T>(what: &str, start: impl std::future::Future<Output = T>) -> T {
        let t = Instant::now();
        let started = start.await;
        eprintln!("{what} up in {:.1?}", t.elapsed());
        started
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_master_and_a_rabbit_node_can_be_lost() {
        let (mut redis, mut rabbit) = tokio::join!(
            timed("Redis Cluster", RedisCluster::start()),
            timed("RabbitMQ cluster", RabbitCluster::start(3)),
        );

        // Redis: a write through a cluster client lands on its slot's master and survives
        // the loss of that master.
        assert_eq!(redis.url().matches("127.0.0.1:").count(), 6);
        let tag = format!("{{export-{}}}", rand::random::<u32>());
        let key = format!("{tag}:state");
        let client = redis::cluster::ClusterClient::new(redis.seed_urls()).expect("seed URLs");
        let mut c = client
            .get_async_connection()
            .await
            .expect("a cluster connection");
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("planned")
            .query_async(&mut c)
            .await
            .expect("SET through the cluster");
        let owner = redis.master_of_key(&key).await;
        let mut on_owner = node_connection(owner).await.expect("the key's master");
        let value: Option<String> = query(&mut on_owner, redis::cmd("GET").arg(&key)).await;
        assert_eq!(value.as_deref(), Some("planned"), "the key is on {owner}");
        // So the kill loses nothing: a write of this connection in the same slot, acknowledged
        // by the replica, comes after the cluster client's in the replication stream.
        let _: () = query(
            &mut on_owner,
            redis::cmd("SET").arg(format!("{tag}:fence")).arg(1),
        )
        .await
        .expect("SET on the key's master");
        let replicated: Option<i64> =
            query(&mut on_owner, redis::cmd("WAIT").arg(1).arg(5000)).await;
        assert_eq!(replicated, Some(1));

        let before = redis.masters().await;
        assert_eq!(before.len(), 3);
        assert!(before.contains(&owner));
        let promoted = redis.kill_master(owner).await;
        let after = redis.masters().await;
        assert!(!after.contains(&owner) && after.contains(&promoted) && after.len() == 3);
        assert_eq!(redis.master_of_key(&key).await, promoted);
        let value: String = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut c)
            .await
            .expect("GET through the cluster after the failover");
        assert_eq!(value, "planned");

        // RabbitMQ: a quorum queue on three nodes, still usable with one of them stopped.
        assert_eq!(rabbit.node_urls().len(), 3);
        assert_eq!(rabbit.amqp_url().split(',').count(), 3);
        let queue = format!("ae-cluster-{}", rand::random::<u32>());
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongLongInt(3),
        );
        let first = Connection::connect(&rabbit.node_urls()[0], ConnectionProperties::default())
            .await
            .expect("node 1 accepts AMQP");
        let channel = first.create_channel().await.expect("a channel");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("a quorum queue");
        assert_eq!(rabbit.quorum_members(&queue).await, 3);
        assert_eq!(rabbit.connections(0).await, 1, "this test's connection");
        assert_eq!(rabbit.connections(1).await, 0);

        rabbit.stop_node(2).await;
        assert_eq!(rabbit.quorum_members(&queue).await, 3, "membership stays");
        let second = Connection::connect(&rabbit.node_urls()[1], ConnectionProperties::default())
            .await
            .expect("node 2 accepts AMQP");
        assert_eq!(rabbit.connections(1).await, 1);
        assert_eq!(rabbit.connections(2).await, 0, "a stopped node holds none");
        let channel = second.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"job",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("a confirm");
        assert!(confirm.is_ack(), "the queue's majority takes the message");
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
            .expect("the message");
        assert_eq!(got.delivery.data, b"job");
        let _ = second.close(200, "done".into()).await;
        let _ = first.close(200, "done".into()).await;
    }
}
