//! Logs and the operator endpoints every binary serves: `/metrics` (Prometheus text),
//! `/healthz` (the process is alive) and `/readyz` (connected to the broker and to Redis).
//! Logs are JSON lines; callers must never pass a token or a raw identifier as a field.

use crate::progress::ProgressStore;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Installs the JSON log subscriber. `RUST_LOG` wins over `filter` when set. Safe to call twice
/// (tests do): the second call is a no-op.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(quiet_redis_cluster(filter)));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_env_filter(filter)
        .try_init();
}

/// The filter with redis-rs's cluster client at `error` unless the filter names `redis`: during
/// a failover it warns on every attempt to reach the dead node (hundreds a second), while the
/// fleet's own lines already say what waits on Redis.
fn quiet_redis_cluster(filter: &str) -> String {
    if filter.contains("redis") {
        filter.to_owned()
    } else {
        format!("{filter},redis::cluster_handling=error")
    }
}

/// What `/readyz` reports. The run loop flips `broker` as its connection comes and goes.
pub struct Health {
    broker: AtomicBool,
    progress: ProgressStore,
}

impl Health {
    pub fn new(progress: ProgressStore) -> Arc<Health> {
        Arc::new(Health {
            broker: AtomicBool::new(false),
            progress,
        })
    }

    pub fn set_broker(&self, connected: bool) {
        self.broker.store(connected, Ordering::Relaxed);
    }

    async fn ready(&self) -> Result<(), &'static str> {
        if !self.broker.load(Ordering::Relaxed) {
            return Err("not connected to the broker");
        }
        match tokio::time::timeout(Duration::from_secs(2), self.progress.ping()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err("Redis does not answer"),
        }
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    health: Arc<Health>,
}

/// What every role starts with: its Redis progress store, a metrics registry (the role registers
/// its metrics into it; the registry is shared, so registering after serving is fine), its
/// readiness, and the ops endpoints already serving all three.
pub struct Ops {
    pub progress: ProgressStore,
    pub registry: Registry,
    pub health: Arc<Health>,
    pub addr: SocketAddr,
}

/// Connects to Redis and serves `/metrics`, `/healthz`, `/readyz` for `role` on `addr`.
pub async fn start_ops(
    role: Role,
    addr: SocketAddr,
    settings: &crate::config::Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Ops> {
    use anyhow::Context;
    let progress = ProgressStore::connect(&settings.redis_url, &settings.namespace)
        .await
        .context("connecting to Redis")?;
    if !progress
        .persists_writes()
        .await
        .context("reading Redis's persistence")?
    {
        anyhow::ensure!(
            settings.allow_volatile_redis,
            "Redis does not persist writes (appendonly is off): a restart of it would lose every \
             running export and every workspace's Facebook connection. Turn AOF on \
             (appendonly yes, or CONFIG SET appendonly yes), or set AE_ALLOW_VOLATILE_REDIS=true \
             for a throwaway setup."
        );
        tracing::warn!(message = "Redis does not persist writes (AE_ALLOW_VOLATILE_REDIS): a restart of it loses exports and connections.");
    }
    crate::legacy_keys::tag_workspace_keys(&progress.connection(), &settings.namespace)
        .await
        .context("tagging the workspace keys of an earlier version")?;
    let registry = Registry::new();
    // Every role's CPU and memory, for the dashboard's per-role panels (Linux only: /proc).
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let health = Health::new(progress.clone());
    let addr = serve_ops(
        role,
        addr,
        registry.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    Ok(Ops {
        progress,
        registry,
        health,
        addr,
    })
}

/// Binds the ops endpoints and serves them until `shutdown`. Returns the bound address (tests
/// bind port 0).
async fn serve_ops(
    role: Role,
    addr: SocketAddr,
    registry: Registry,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    register_build_info(&registry, role);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { registry, health });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(message = "Ops server failed.", %error);
        }
    });
    Ok(bound)
}

/// `audience_export_build_info{role, version} 1`: which build each process runs, and a series
/// that exists from the first scrape.
fn register_build_info(registry: &Registry, role: Role) {
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "audience_export_build_info",
            "The role and version of this process.",
        ),
        &["role", "version"],
    );
    if let Ok(info) = info {
        info.with_label_values(&[role.as_str(), env!("CARGO_PKG_VERSION")])
            .set(1);
        // Registering twice fails only if a caller serves two ops endpoints on one registry.
        let _ = registry.register(Box::new(info));
    }
}

async fn metrics(State(state): State<OpsState>) -> (StatusCode, String) {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&buf).into_owned()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn readyz(State(state): State<OpsState>) -> (StatusCode, &'static str) {
    match state.health.ready().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// The three roles of the fleet: the `role` label of `audience_export_build_info`, the name of a
/// broker connection, the word in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Producer,
    Worker,
    Finalizer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Worker => "worker",
            Role::Finalizer => "finalizer",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A metric label's values, declared as an enum: a typo cannot create a new series, and every
/// series exists (at zero) from the first scrape, so alerts on `rate()` see it.
pub trait Label: Copy + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
}

/// One or more `Label`s: the values of one series.
pub trait Labels: Copy + 'static {
    fn values(self) -> Vec<&'static str>;
    fn every() -> Vec<Self>;
}

impl<L: Label> Labels for L {
    fn values(self) -> Vec<&'static str> {
        vec![self.as_str()]
    }
    fn every() -> Vec<L> {
        L::ALL.to_vec()
    }
}

impl<A: Label, B: Label> Labels for (A, B) {
    fn values(self) -> Vec<&'static str> {
        vec![self.0.as_str(), self.1.as_str()]
    }
    fn every() -> Vec<(A, B)> {
        A::ALL
            .iter()
            .flat_map(|&a| B::ALL.iter().map(move |&b| (a, b)))
            .collect()
    }
}

/// A counter family whose label values are typed.
#[derive(Clone)]
pub struct Counters<L> {
    vec: prometheus::IntCounterVec,
    labels: std::marker::PhantomData<L>,
}

impl<L: Labels> Counters<L> {
    /// Declares `name` with `label_names` (one per `Label` of `L`), registers it and creates every
    /// series at zero.
    pub fn register(
        registry: &Registry,
        name: &str,
        help: &str,
        label_names: &[&str],
    ) -> prometheus::Result<Counters<L>> {
        let vec = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), label_names)?;
        registry.register(Box::new(vec.clone()))?;
        let counters = Counters {
            vec,
            labels: std::marker::PhantomData,
        };
        for labels in L::every() {
            counters.with(labels);
        }
        Ok(counters)
    }

    pub fn with(&self, labels: L) -> prometheus::IntCounter {
        self.vec.with_label_values(&labels.values())
    }
}

/// A gauge family whose label values are typed.
#[derive(Clone)]
pub struct Gauges<L> {
    vec: prometheus::IntGaugeVec,
    labels: std::marker::PhantomData<L>,
}

impl<L: Labels> Gauges<L> {
    /// Declares `name`, registers it and creates every series at zero.
    pub fn register(
        registry: &Registry,
        name: &str,
        help: &str,
        label_names: &[&str],
    ) -> prometheus::Result<Gauges<L>> {
        let vec = prometheus::IntGaugeVec::new(prometheus::Opts::new(name, help), label_names)?;
        registry.register(Box::new(vec.clone()))?;
        let gauges = Gauges {
            vec,
            labels: std::marker::PhantomData,
        };
        for labels in L::every() {
            gauges.with(labels);
        }
        Ok(gauges)
    }

    pub fn with(&self, labels: L) -> prometheus::IntGauge {
        self.vec.with_label_values(&labels.values())
    }
}

/// A histogram family whose label values are typed.
#[derive(Clone)]
pub struct Histograms<L> {
    vec: prometheus::HistogramVec,
    labels: std::marker::PhantomData<L>,
}

impl<L: Labels> Histograms<L> {
    pub fn register(
        registry: &Registry,
        name: &str,
        help: &str,
        label_names: &[&str],
        buckets: Vec<f64>,
    ) -> prometheus::Result<Histograms<L>> {
        let vec = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(name, help).buckets(buckets),
            label_names,
        )?;
        registry.register(Box::new(vec.clone()))?;
        Ok(Histograms {
            vec,
            labels: std::marker::PhantomData,
        })
    }

    pub fn with(&self, labels: L) -> prometheus::Histogram {
        self.vec.with_label_values(&labels.values())
    }
}

impl Label for crate::contract::Field {
    const ALL: &'static [Self] = &crate::contract::Field::ALL;
    fn as_str(self) -> &'static str {
        crate::contract::Field::as_str(self)
    }
}

impl Label for crate::contract::ExportStatus {
    const ALL: &'static [Self] = &crate::contract::ExportStatus::ALL;
    fn as_str(self) -> &'static str {
        crate::contract::ExportStatus::as_str(self)
    }
}

/// Exponential backoff with jitter, for reconnect loops and retries: a random delay in
/// `[d/2, d]` where `d = min(cap, base * 2^attempt)`, so a fleet that lost its broker does not
/// return in step, yet never retries at once.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    use rand::Rng;
    let exp = base.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    let ceiling = exp.min(cap);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_under_the_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for attempt in 0..30 {
            let d = backoff(attempt, base, cap);
            assert!(d <= cap, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(0, base, cap) <= base);
        assert!(backoff(10, base, cap) >= cap / 2);
    }
}
