//! The worker: consumes shards, uploads them to Meta, records progress. Several uploads in flight
//! (prefetch = concurrency); each delivery is acked only after its effect is recorded in Redis,
//! so a killed worker loses nothing: its unacked shards are redelivered and counted once.

pub mod budget;
pub mod followup;
pub mod isolate;
pub mod metrics;
pub mod normalize;
pub mod permission;
pub mod phone_diff;
pub mod phone_fast;
pub mod prepare;
pub mod upload;

use audience_export_core::amqp::Topology;
use audience_export_core::config::Settings;
use audience_export_core::connection::Connections;
use audience_export_core::consumer;
use audience_export_core::graph::GraphClient;
use audience_export_core::pause::AccountPauses;
use audience_export_core::revocation::Revocations;
use audience_export_core::telemetry::{self, Role};
use audience_export_core::token_cipher::TokenCipher;
use audience_export_core::Running;
use tokio_util::sync::CancellationToken;
use upload::Deps;

pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let cipher = TokenCipher::from_config(settings.connections.encryption_keys.as_ref())?;
    let ops =
        telemetry::start_ops(Role::Worker, settings.worker.ops_addr, &settings, &shutdown).await?;
    let metrics = metrics::Metrics::register(&ops.registry)?;
    let deliveries = consumer::ConsumerMetrics::register(&ops.registry)?;
    let (progress, health, ops_addr) = (ops.progress, ops.health, ops.addr);
    let graph = GraphClient::from_settings(&settings.graph)?;
    let pauses = AccountPauses::new(progress.connection(), &settings.namespace);
    let connections = Connections::new(progress.connection(), &settings.namespace, cipher);
    let revocations = Revocations::new(connections, progress.connection(), &settings.namespace)
        .counting(&ops.registry)?;
    let task = tokio::spawn(async move {
        let build = |publisher, topology| {
            Ok(Deps {
                graph: graph.clone(),
                progress: progress.clone(),
                publisher,
                topology,
                budget: budget::FleetBudget::new(
                    progress.connection(),
                    &settings.namespace,
                    budget::Controls::from_settings(&settings.worker),
                ),
                revocations: revocations.clone(),
                metrics: metrics.clone(),
                max_attempts: settings.worker.max_attempts,
                pauses: pauses.clone(),
                throttle_pause: std::time::Duration::from_millis(settings.worker.throttle_pause_ms),
            })
        };
        consumer::serve(
            Role::Worker,
            &settings,
            &health,
            &deliveries,
            &shutdown,
            Topology::shards,
            settings.worker.concurrency,
            build,
        )
        .await
    });
    Ok(Running {
        ops_addr,
        api_addr: None,
        task,
    })
}
