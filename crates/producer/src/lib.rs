//! The producer: takes export jobs, checks them against the workspace's Facebook connection,
//! creates one audience per field, streams the segment into shards and seals the plan once the
//! broker confirmed every shard. A job is acked only when its plan is sealed or its refusal
//! announced. It also serves the HTTP API that connects workspaces to Facebook.

pub mod admission;
pub mod api;
pub mod audiences;
pub mod connect;
pub mod consent;
pub mod dead_letters;
pub mod exports;
pub mod health_check;
pub mod metrics;
pub mod plan;
pub mod sharder;
pub mod source;

use audience_export_core::amqp::Topology;
use audience_export_core::config::Settings;
use audience_export_core::connection::Connections;
use audience_export_core::consumer;
use audience_export_core::graph::GraphClient;
use audience_export_core::revocation::Revocations;
use audience_export_core::telemetry::{self, Role};
use audience_export_core::token_cipher::TokenCipher;
use audience_export_core::workspace::Workspaces;
use audience_export_core::Running;
use plan::Deps;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Jobs planned at once by one producer process. Planning is I/O bound (reading the segment,
/// waiting for confirms); two keeps one large export from holding up a small one.
const JOBS_IN_FLIGHT: u16 = 2;

pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let cipher = TokenCipher::from_config(settings.connections.encryption_keys.as_ref())?;
    let ops = telemetry::start_ops(
        Role::Producer,
        settings.producer.ops_addr,
        &settings,
        &shutdown,
    )
    .await?;
    let metrics = metrics::Metrics::register(&ops.registry)?;
    let owner = format!(
        "producer-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let deliveries = consumer::ConsumerMetrics::register(&ops.registry)?;
    let (progress, health, ops_addr) = (ops.progress, ops.health, ops.addr);
    let graph = GraphClient::from_settings(&settings.graph)?;
    let workspaces = Workspaces::new(progress.connection(), &settings.namespace);
    let connections = Connections::new(progress.connection(), &settings.namespace, cipher.clone());
    let revocations = Revocations::new(
        connections.clone(),
        progress.connection(),
        &settings.namespace,
    )
    .counting(&ops.registry)?;
    let connector = Arc::new(connect::Connector::new(
        graph.clone(),
        connections.clone(),
        cipher,
        settings.clone(),
    ));
    let exports = Arc::new(exports::Exports::from_settings(progress.clone(), &settings));
    let api_addr = api::serve(
        settings.api.addr,
        &settings.api,
        api::Services { connector, exports },
        metrics.api_requests.clone(),
        shutdown.clone(),
    )
    .await?;
    // The periodic connection health check (one producer of the fleet per round).
    let rounds = health_check::Rounds {
        graph: graph.clone(),
        connections: connections.clone(),
        revocations: revocations.clone(),
        announcer: connect::Announcer::new(&settings),
        owner: owner.clone(),
        interval: Duration::from_secs(settings.connections.health_check_interval_secs.max(1)),
    };
    tokio::spawn(rounds.run(shutdown.clone()));
    let task = tokio::spawn(async move {
        let build = |publisher, topology| {
            Ok(Deps {
                graph: graph.clone(),
                progress: progress.clone(),
                publisher,
                topology,
                connections: connections.clone(),
                revocations: revocations.clone(),
                metrics: metrics.clone(),
                shard_size: settings.producer.shard_size.clamp(1, 10_000),
                confirm_window: settings.producer.confirm_window,
                customer_file_source: settings.producer.customer_file_source.clone(),
                workspaces: workspaces.clone(),
                job_ttl: Duration::from_secs(settings.finalizer.retention_secs),
                owner: owner.clone(),
                sources: source::SourceSettings::from_settings(&settings.producer),
            })
        };
        consumer::serve(
            Role::Producer,
            &settings,
            &health,
            &deliveries,
            &shutdown,
            Topology::jobs,
            JOBS_IN_FLIGHT,
            build,
        )
        .await
    });
    Ok(Running {
        ops_addr,
        api_addr: Some(api_addr),
        task,
    })
}
