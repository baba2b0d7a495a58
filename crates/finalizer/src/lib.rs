//! The finalizer: listens to the fleet's events, finishes each export exactly once (email,
//! `export.finished`, terminal status), marks connections invalid when Meta refuses their token
//! and tells people, and warns before user tokens expire.

pub mod email;
pub mod expiry;
pub mod finalize;
pub mod invalidation;
pub mod metrics;
pub mod report;

use audience_export_core::amqp::Topology;
use audience_export_core::config::Settings;
use audience_export_core::connection::Connections;
use audience_export_core::consumer;
use audience_export_core::telemetry;
use audience_export_core::Running;
use finalize::Deps;
use lapin::message::Delivery;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Events handled at once; finalization is short and mostly waits on Redis and SMTP.
const EVENTS_IN_FLIGHT: u16 = 16;

pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let ops = telemetry::start_ops(
        "finalizer",
        settings.finalizer.ops_addr,
        &settings,
        &shutdown,
    )
    .await?;
    let metrics = metrics::Metrics::register(&ops.registry)?;
    let (progress, health, ops_addr) = (ops.progress, ops.health, ops.addr);
    let owner = format!(
        "finalizer-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    // The finalizer marks connections invalid and reads who to tell; it never needs a token,
    // so it is not given the key that opens them.
    let connections = Connections::without_tokens(progress.connection(), &settings.namespace);
    let f = &settings.finalizer;
    let sweeper = expiry::Sweeper {
        connections: connections.clone(),
        mailer: email::Mailer::new(&f.smtp_host, f.smtp_port, &f.mail_from)?,
        metrics: metrics.clone(),
        warn_within: Duration::from_secs(settings.connections.expiry_warning_days * 86_400),
        owner: owner.clone(),
    };
    tokio::spawn(sweeper.run(
        Duration::from_secs(settings.connections.expiry_check_interval_secs.max(1)),
        shutdown.clone(),
    ));
    let task = tokio::spawn(async move {
        let f = &settings.finalizer;
        let build = |publisher, topology| {
            Ok(Deps {
                progress: progress.clone(),
                publisher,
                topology,
                mailer: email::Mailer::new(&f.smtp_host, f.smtp_port, &f.mail_from)?,
                metrics: metrics.clone(),
                retention: Duration::from_secs(f.retention_secs),
                owner: owner.clone(),
                connections: connections.clone(),
            })
        };
        let handle = |deps, delivery: Arc<Delivery>| async move {
            finalize::handle(deps, &delivery.data).await
        };
        consumer::serve(
            "finalizer",
            &settings,
            &health,
            &shutdown,
            Topology::finalizer,
            EVENTS_IN_FLIGHT,
            build,
            handle,
        )
        .await
    });
    Ok(Running {
        ops_addr,
        api_addr: None,
        task,
    })
}
