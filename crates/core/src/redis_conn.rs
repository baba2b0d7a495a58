//! The one way a process talks to Redis: one standalone server or a Redis Cluster, chosen by
//! the URL, behind one cloneable connection that every store shares.
//!
//! `AE_REDIS_URL` is either a `redis://` URL (one server; a node of a cluster is recognised by
//! `INFO cluster` and its cluster used) or `redis+cluster://[user:password@]host:port[,...]`
//! or `redis://host:port,redis://host:port` (a cluster: the nodes listed are seeds, the client
//! discovers the rest and follows failovers). On a cluster every script and
//! every pipeline must keep its keys in one hash slot: the fleet's keys carry hash tags for that
//! (`{<export id>}`, `{<workspace id>}`, `{<ad account id>}`; `workspace_key` and `account_key`
//! write the last two), and `faults::cluster` runs every script on a real cluster to prove it.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};
use std::time::Duration;

/// How long one Redis command may take before it counts as failed. redis-rs 1.x defaults to
/// 500 ms, which a loaded CI machine (or a Lua script over a large done-set) can exceed; a timeout
/// leaves the outcome unknown (the command may have run), which every caller treats as
/// "retry", and every write here is idempotent.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting to one node may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// The URL scheme of a cluster.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// A connection to one Redis server or to a cluster; cheap to clone (clones share it).
#[derive(Clone)]
pub enum RedisConn {
    /// Reconnects in the background (delays from 100 ms, doubling, capped at 2 s), so work
    /// resumes within seconds of Redis coming back.
    Single(ConnectionManager),
    /// Routes each command to the master of its slot; on `MOVED`, a lost node or a failover it
    /// refreshes the slot map and retries a few times (about a second in all), then fails the
    /// command, which callers retry like any Redis outage until the failover is done.
    Cluster {
        conn: ClusterConnection,
        /// A seed node's URL: its credentials reach the other nodes (`on_every_node`).
        seed: String,
    },
}

/// Where `AE_REDIS_URL` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Single(String),
    /// Seed node URLs (`redis://[user:password@]host:port`), at least one.
    Cluster(Vec<String>),
}

/// Reads `AE_REDIS_URL`: a `redis+cluster://` URL becomes one `redis://` URL per listed node
/// (credentials copied to each), a list of `redis://` URLs is a cluster's seeds, anything else
/// is one server (which `connect` may still find to be a cluster node).
pub fn parse_target(url: &str) -> Result<Target, String> {
    if url.starts_with("rediss") {
        return Err(
            "TLS (rediss://) is not built in: reach Redis over a TLS sidecar or a private network"
                .into(),
        );
    }
    let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
        // Several `redis://` URLs separated by commas: the seed nodes of a cluster (a comma
        // inside one URL, in a password, does not split it).
        let nodes = crate::url_list::split(url, &["redis"]);
        if nodes.len() > 1 {
            return Ok(Target::Cluster(
                nodes.into_iter().map(str::to_owned).collect(),
            ));
        }
        return Ok(Target::Single(url.trim().to_owned()));
    };
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    // A trailing "/" (or "/0") is tolerated; a cluster has one database only.
    let hosts = hosts.trim_end_matches('/').trim_end_matches("/0");
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{auth}{h}"))
        .collect();
    if nodes.is_empty() || hosts.contains('/') {
        return Err(format!(
            "a cluster URL lists its nodes as {CLUSTER_SCHEME}host:port[,host:port...] (no database)"
        ));
    }
    Ok(Target::Cluster(nodes))
}

/// Connects to what `url` names. A cluster is reached through any one of its listed nodes.
pub async fn connect(url: &str) -> RedisResult<RedisConn> {
    match parse_target(url).map_err(|why| {
        redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "AE_REDIS_URL", why))
    })? {
        Target::Single(url) => {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                .set_max_delay(Duration::from_secs(2));
            let mut manager =
                ConnectionManager::new_with_config(redis::Client::open(url.as_str())?, config)
                    .await?;
            // A cluster node named by a plain URL: talk to the cluster, not to this one node
            // (which would answer MOVED for every key of another node's slots).
            let info: String = redis::cmd("INFO")
                .arg("cluster")
                .query_async(&mut manager)
                .await?;
            if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
                return cluster(vec![url]).await;
            }
            Ok(RedisConn::Single(manager))
        }
        Target::Cluster(nodes) => cluster(nodes).await,
    }
}

/// The cluster client, seeded with `nodes` (any one reachable is enough).
async fn cluster(nodes: Vec<String>) -> RedisResult<RedisConn> {
    let seed = nodes.first().cloned().unwrap_or_default();
    let client = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(CONNECTION_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        // A failover takes the cluster's node timeout plus an election (15 s and more by
        // default): a command retries for about a second, not the crate's minutes, and the
        // caller's retry (the infrastructure retry queue) waits out the rest.
        .retries(6)
        .min_retry_wait(100)
        .max_retry_wait(2_000)
        .build()?;
    Ok(RedisConn::Cluster {
        conn: client.get_async_connection().await?,
        seed,
    })
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster { .. })
    }

    /// Runs `cmd` on the server, or on every node of a cluster, replicas included (the cluster
    /// client reaches masters only): each node's address and answer. The nodes are read from
    /// `CLUSTER NODES` and reached with the seed's credentials.
    pub async fn on_every_node<T: FromRedisValue>(
        &self,
        cmd: &Cmd,
    ) -> RedisResult<Vec<(String, RedisResult<T>)>> {
        let (conn, seed) = match self {
            RedisConn::Single(c) => {
                return Ok(vec![(
                    "server".into(),
                    cmd.query_async(&mut c.clone()).await,
                )])
            }
            RedisConn::Cluster { conn, seed } => (conn, seed),
        };
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn.clone())
            .await?;
        let mut answers = Vec::new();
        for address in cluster_node_addresses(&nodes) {
            let answer = async {
                let url = node_url(seed, &address).ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "a node's address does not fit the seed's URL",
                    ))
                })?;
                let mut c = redis::Client::open(url)?
                    .get_multiplexed_async_connection_with_config(
                        &redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                            .set_response_timeout(Some(RESPONSE_TIMEOUT)),
                    )
                    .await?;
                cmd.query_async::<T>(&mut c).await
            }
            .await;
            answers.push((address, answer));
        }
        Ok(answers)
    }
}

/// `ip:port` of every node `CLUSTER NODES` lists that is connected (not failed or without an
/// address).
fn cluster_node_addresses(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (_id, address, flags) = (parts.next()?, parts.next()?, parts.next()?);
            if flags.contains("fail") || flags.contains("noaddr") || flags.contains("handshake") {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let address = address.split('@').next()?;
            (!address.starts_with(':')).then(|| address.to_owned())
        })
        .collect()
}

/// The seed's URL pointed at `address` (`ip:port`), keeping its credentials.
fn node_url(seed: &str, address: &str) -> Option<String> {
    let (host, port) = address.rsplit_once(':')?;
    let mut url = url::Url::parse(seed).ok()?;
    url.set_host(Some(host.trim_start_matches('[').trim_end_matches(']')))
        .ok()?;
    url.set_port(Some(port.parse().ok()?)).ok()?;
    Some(url.to_string())
}

/// `{ns}:workspace:{<workspace>}:<what>`: every key of a workspace, in the workspace's slot.
pub fn workspace_key(ns: &str, workspace: impl std::fmt::Display, what: &str) -> String {
    format!("{ns}:workspace:{{{workspace}}}:{what}")
}

/// `{ns}:account:{<ad account>}:<what>`: every key of an ad account, in the account's slot.
pub fn account_key(ns: &str, ad_account: impl std::fmt::Display, what: &str) -> String {
    format!("{ns}:account:{{{ad_account}}}:{what}")
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster { conn, .. } => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster { conn, .. } => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster { conn, .. } => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_url_is_one_server() {
        assert_eq!(
            parse_target("redis://127.0.0.1:6379/2").unwrap(),
            Target::Single("redis://127.0.0.1:6379/2".into())
        );
    }

    #[test]
    fn a_cluster_url_lists_seed_nodes_with_shared_credentials() {
        assert_eq!(
            parse_target("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001/").unwrap(),
            Target::Cluster(vec![
                "redis://u:p@10.0.0.1:7000".into(),
                "redis://u:p@10.0.0.2:7001".into()
            ])
        );
        assert_eq!(
            parse_target("redis+cluster://h:7000").unwrap(),
            Target::Cluster(vec!["redis://h:7000".into()])
        );
    }

    #[test]
    fn a_list_of_redis_urls_is_a_cluster_and_tls_is_refused_with_a_reason() {
        assert_eq!(
            parse_target("redis://a:7000, redis://b:7001").unwrap(),
            Target::Cluster(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
        assert_eq!(
            parse_target("redis://:pa,ss@a:7000/").unwrap(),
            Target::Single("redis://:pa,ss@a:7000/".into()),
            "a comma in a password is not a list"
        );
        assert!(parse_target("rediss://a:7000").unwrap_err().contains("TLS"));
    }

    #[test]
    fn a_cluster_url_without_nodes_or_with_a_database_is_refused() {
        assert!(parse_target("redis+cluster://").is_err());
        assert!(parse_target("redis+cluster://h:7000/3").is_err());
    }

    #[test]
    fn every_connected_node_of_cluster_nodes_is_reached_with_the_seeds_credentials() {
        let nodes = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
6ec2 127.0.0.1:30005@40005 master,fail - 1426238316232 1426238314752 5 connected
";
        assert_eq!(
            cluster_node_addresses(nodes),
            vec!["127.0.0.1:30004", "127.0.0.1:30002", "127.0.0.1:30001"]
        );
        assert_eq!(
            node_url("redis://u:p@10.0.0.9:7000", "127.0.0.1:30004").as_deref(),
            Some("redis://u:p@127.0.0.1:30004")
        );
    }
}
