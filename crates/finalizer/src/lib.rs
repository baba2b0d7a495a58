//! The finalizer: listens to the fleet's events, finishes each export exactly once (email,
//! `export.finished`, terminal status), and records token rejections.

pub mod email;
pub mod finalize;
pub mod metrics;
pub mod report;

use anyhow::Context;
use audience_export_core::amqp::{self, Publisher, Topology};
use audience_export_core::config::Settings;
use audience_export_core::consumer;
use audience_export_core::progress::ProgressStore;
use audience_export_core::telemetry::{self, Health};
use audience_export_core::Running;
use finalize::Deps;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Events handled at once; finalization is short and mostly waits on Redis and SMTP.
const EVENTS_IN_FLIGHT: u16 = 16;

pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let progress = ProgressStore::connect(&settings.redis_url, &settings.namespace)
        .await
        .context("connecting to Redis")?;
    let registry = prometheus::Registry::new();
    let metrics = metrics::Metrics::register(&registry)?;
    let health = Health::new(progress.clone());
    let ops_addr = telemetry::serve_ops(
        "finalizer",
        settings.finalizer.ops_addr,
        registry,
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    let owner = format!("finalizer-{}-{:08x}", std::process::id(), rand_suffix());
    let task = tokio::spawn(async move {
        consumer::reconnecting("finalizer", &health, &shutdown, || async {
            let connection = amqp::connect(&settings.amqp_url, "audience-finalizer").await?;
            let topology = Topology::from_settings(&settings);
            let publisher = Publisher::new(&connection).await?;
            topology.declare(publisher.channel()).await?;
            let queue = topology.finalizer();
            let f = &settings.finalizer;
            let deps = Arc::new(Deps {
                progress: progress.clone(),
                publisher,
                topology,
                mailer: email::Mailer::new(&f.smtp_host, f.smtp_port, &f.mail_from)?,
                metrics: metrics.clone(),
                retention: Duration::from_secs(f.retention_secs),
                owner: owner.clone(),
            });
            let channel = connection.create_channel().await?;
            health.set_broker(true);
            info!(message = "Finalizer consuming events.");
            let ended =
                consumer::consume(&channel, &queue, EVENTS_IN_FLIGHT, &shutdown, |delivery| {
                    let deps = deps.clone();
                    let queue = queue.clone();
                    async move {
                        let outcome = finalize::handle(deps.clone(), &delivery.data).await;
                        consumer::settle(&deps.publisher, &queue, delivery, outcome).await;
                    }
                })
                .await;
            let _ = connection.close(200, "shutdown").await;
            ended
        })
        .await
    });
    Ok(Running { ops_addr, task })
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}
