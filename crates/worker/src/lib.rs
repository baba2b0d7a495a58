//! The worker: consumes shards, uploads them to Meta, records progress. Several uploads in flight
//! (prefetch = concurrency); each delivery is acked only after its effect is recorded in Redis,
//! so a killed worker loses nothing: its unacked shards are redelivered and counted once.

pub mod metrics;
pub mod normalize;
pub mod prepare;
pub mod upload;

use anyhow::Context;
use audience_export_core::amqp::{self, Publisher, Topology};
use audience_export_core::config::Settings;
use audience_export_core::consumer;
use audience_export_core::graph::GraphClient;
use audience_export_core::pause::AccountPauses;
use audience_export_core::progress::ProgressStore;
use audience_export_core::telemetry::{self, Health};
use audience_export_core::Running;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::info;
use upload::Deps;

pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let token = settings
        .graph
        .access_token
        .clone()
        .context("AE_GRAPH__ACCESS_TOKEN is not set: the worker has no token to upload with")?;
    let progress = ProgressStore::connect(&settings.redis_url, &settings.namespace)
        .await
        .context("connecting to Redis")?;
    let registry = prometheus::Registry::new();
    let metrics = metrics::Metrics::register(&registry)?;
    let health = Health::new(progress.clone());
    let ops_addr = telemetry::serve_ops(
        "worker",
        settings.worker.ops_addr,
        registry,
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    let graph = GraphClient::from_settings(&settings.graph)?;
    let pauses = AccountPauses::connect(&settings.redis_url, &settings.namespace)
        .await
        .context("connecting to Redis")?;
    let task = tokio::spawn(async move {
        consumer::reconnecting("worker", &health, &shutdown, || async {
            let connection = amqp::connect(&settings.amqp_url, "audience-worker").await?;
            let topology = Topology::from_settings(&settings);
            let publisher = Publisher::new(&connection).await?;
            topology.declare(publisher.channel()).await?;
            let queue = topology.shards();
            let deps = Arc::new(Deps {
                graph: graph.clone(),
                progress: progress.clone(),
                publisher,
                topology,
                limiter: Deps::limiter(settings.worker.calls_per_second_per_account),
                token: token.clone(),
                metrics: metrics.clone(),
                max_attempts: settings.worker.max_attempts,
                pauses: pauses.clone(),
                token_fingerprint: audience_export_core::pause::token_fingerprint(&token),
                pacing: upload::Pacing::from_settings(&settings.worker),
            });
            let channel = connection.create_channel().await?;
            health.set_broker(true);
            info!(
                message = "Worker consuming shards.",
                concurrency = settings.worker.concurrency
            );
            let ended = consumer::consume(
                &channel,
                &queue,
                settings.worker.concurrency,
                &shutdown,
                |delivery| {
                    let deps = deps.clone();
                    let queue = queue.clone();
                    async move {
                        let outcome = upload::handle(deps.clone(), &delivery.data).await;
                        consumer::settle(&deps.publisher, &queue, delivery, outcome).await;
                    }
                },
            )
            .await;
            let _ = connection.close(200, "shutdown").await;
            ended
        })
        .await
    });
    Ok(Running { ops_addr, task })
}
