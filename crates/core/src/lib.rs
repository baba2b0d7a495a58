//! The library the three binaries share, so that each contract is written once.
//!
//! It owns the message contracts and ids (`contract`), configuration loading (`config`), the
//! Graph API client (`graph`), the Redis progress store and its schema (`progress`), workspaces'
//! connections (`connection`, `token_cipher`) and the refused-token path (`revocation`), the
//! RabbitMQ topology and publishing rules (`amqp`, `consumer`), and telemetry (`telemetry`). It must never hold business decisions that belong to
//! one role: planning lives in the producer, hashing in the worker, completion in the finalizer.

pub mod amqp;
pub mod config;
pub mod connection;
pub mod consumer;
pub mod contract;
pub mod graph;
pub mod legacy_keys;
pub mod naming;
pub mod pause;
pub mod progress;
pub mod redis_conn;
pub mod revocation;
pub mod shutdown;
pub mod telemetry;
pub mod token_cipher;
pub mod url_list;
pub mod workspace;

pub use contract::{ExportJob, Field, Shard};
/// A place where the fault suite can make the process die, as a SIGKILL would (abort: no
/// destructor runs, nothing is flushed), to prove that nothing is lost or done twice from there:
/// `FAILPOINTS=<name>=return` in the process's environment (`failpoints_from_env`), or panic
/// there (`<name>=panic`), or either after a count (`<name>=3*off->return`). Compiled out
/// without the `failpoints` feature.
pub fn crash_point(name: &str) {
    let _ = name; // unused when the fail points are compiled out
    fail::fail_point!(name, |_| {
        std::process::abort();
    });
}

/// Reads fail points from the `FAILPOINTS` environment variable (e.g.
/// `FAILPOINTS=producer::audience-created=return`), for the fault suite's child processes.
/// Without the `failpoints` feature, fail points are compiled out and this does nothing.
pub fn failpoints_from_env() {
    // The scenario holds the configuration for as long as it lives: the whole process.
    std::mem::forget(fail::FailScenario::setup());
}

/// A started role: where its ops endpoints (and, for the producer, its HTTP API) listen, and its
/// main loop, which returns once shutdown is requested and in-flight work is drained.
pub struct Running {
    pub ops_addr: std::net::SocketAddr,
    pub api_addr: Option<std::net::SocketAddr>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}
