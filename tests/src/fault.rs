//! What the fault suite breaks, of its own: a Redis server on a free port with AOF (fsync always)
//! that can be killed with SIGKILL and started again on the same port and data, and a TCP proxy
//! in front of RabbitMQ whose connections can be cut. Never the shared Redis or broker, which
//! other tests use.

use rand::Rng;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A free loopback port for a server of the test's own. Never handed out twice in one test
/// process: two tests starting servers at once could otherwise be given the same just-released
/// port (the likeliest cause of a cluster test's one failure in CI, whose message was not
/// kept). Taken below the kernel's ephemeral range where there is room, so that no outgoing
/// connection (nor another `bind(0)`) takes it between this check and the server's own bind.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    loop {
        let port = if ephemeral_low > 20_000 {
            rand::thread_rng().gen_range(10_000..ephemeral_low)
        } else {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free loopback port")
        };
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
}

/// Turns AOF on or off (`CONFIG SET appendonly`) in the Redis at `url`: a server that does
/// not persist writes, which every role must refuse.
pub async fn set_appendonly(url: &str, on: bool) {
    let client = redis::Client::open(url).expect("a Redis URL");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("the test's Redis answers");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg(if on { "yes" } else { "no" })
        .query_async(&mut c)
        .await
        .expect("CONFIG SET appendonly");
}

/// A `redis-server` of the test's own, persisting every write (AOF, fsync always).
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port with a fresh data directory, and waits until it answers.
    pub async fn start() -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ae-redis-{port}-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("a data directory");
        let mut server = RedisServer {
            port,
            dir,
            child: None,
        };
        server.run().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let url = self.url();
        let up = crate::app::eventually(Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                let mut c = client.get_multiplexed_async_connection().await.ok()?;
                let pong: String = redis::cmd("PING").query_async(&mut c).await.ok()?;
                (pong == "PONG").then_some(())
            }
        })
        .await;
        assert!(up.is_some(), "the test's redis-server answers");
    }

    /// SIGKILL: no shutdown, nothing flushed beyond what AOF already wrote.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy to `upstream`: what the fleet connects to, so a test can cut its connections.
pub struct TcpProxy {
    pub addr: SocketAddr,
    /// Cancelled to cut every connection open now; replaced by a fresh one for the next ones.
    cut: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let proxy = TcpProxy {
            addr: listener.local_addr().expect("bound"),
            cut: Arc::new(Mutex::new(CancellationToken::new())),
            stop: CancellationToken::new(),
        };
        let (cut, stop) = (proxy.cut.clone(), proxy.stop.clone());
        tokio::spawn(async move {
            loop {
                let inbound = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let cut = cut.lock().expect("proxy lock").clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        proxy
    }

    /// Cuts every connection open now (both directions closed at once); new ones go through.
    pub fn cut(&self) {
        let mut cut = self.cut.lock().expect("proxy lock");
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// `amqp://guest:guest@<proxy>/%2f`, for the fleet's settings.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}
