//! The finalizer: listens to the fleet's events, finishes each export exactly once (email,
//! `export.finished`, terminal status), marks connections invalid when Meta refuses their token
//! and tells people, and warns before user tokens expire.
//!
//! `dispatch` routes each event; `finalize` and `invalidation` handle them and know nothing of
//! each other; every email goes through `notify`.

pub mod dispatch;
pub mod email;
pub mod expiry;
pub mod finalize;
pub mod invalidation;
pub mod metrics;
pub mod notify;
pub mod report;
pub mod sweep;
pub mod unusable;

use audience_export_core::amqp::{PublishError, Publisher, Topology};
use audience_export_core::config::Settings;
use audience_export_core::connection::{ConnectionError, Connections};
use audience_export_core::consumer;
use audience_export_core::progress::{ProgressError, ProgressStore};
use audience_export_core::telemetry::{self, Role};
use audience_export_core::Running;
use email::EmailError;
use notify::Notifier;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Events handled at once; finalization is short and mostly waits on Redis and SMTP.
const EVENTS_IN_FLIGHT: u16 = 16;

/// What the event handlers share.
pub struct Deps {
    pub progress: ProgressStore,
    pub publisher: Publisher,
    pub topology: Topology,
    pub notifier: Notifier,
    pub metrics: metrics::Metrics,
    pub retention: Duration,
    /// This process's claim owner id.
    pub owner: String,
    /// How long a claim (an export's finish, a notice) lasts before another finalizer may take
    /// it over: longer than anything a finish waits for (an SMTP exchange is cut at half of it).
    pub lease: Duration,
    pub connections: Connections,
    /// Stops this broker session's sweep when the session's state is dropped.
    pub sweeping: Option<tokio_util::sync::DropGuard>,
}

/// How a handler left an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Nothing more to do with it.
    Done,
    /// Another finalizer holds the export's (or the notice's) claim: look again later, in case
    /// it dies before finishing.
    Held,
}

#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Email(#[from] EmailError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl FinalizeError {
    /// Whether the same event may succeed later (Redis, the broker or SMTP back).
    pub fn is_retryable(&self) -> bool {
        match self {
            FinalizeError::Progress(e) => e.is_retryable(),
            FinalizeError::Publish(e) => e.is_retryable(),
            FinalizeError::Email(e) => e.is_retryable(),
            FinalizeError::Connection(e) => e.is_retryable(),
        }
    }
}

pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let ops = telemetry::start_ops(
        Role::Finalizer,
        settings.finalizer.ops_addr,
        &settings,
        &shutdown,
    )
    .await?;
    let metrics = metrics::Metrics::register(&ops.registry)?;
    let deliveries = consumer::ConsumerMetrics::register(&ops.registry)?;
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
    let lease = Duration::from_secs(f.claim_lease_secs.max(2));
    let smtp_timeout = Duration::from_secs(f.smtp_timeout_secs).min(lease / 2);
    let notifier = Notifier::new(
        email::Mailer::new(&f.smtp_host, f.smtp_port, &f.mail_from, smtp_timeout)?,
        metrics.clone(),
    );
    let limits = sweep::Limits {
        deadline: Duration::from_secs(f.export_deadline_secs),
        stall: Duration::from_secs(f.stall_after_secs),
    };
    let sweep_every = Duration::from_secs(f.sweep_interval_secs.max(1));
    let sweeper = expiry::Sweeper {
        connections: connections.clone(),
        notifier: notifier.clone(),
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
        let build = |publisher: Publisher, topology: Topology| {
            let deps = |sweeping| Deps {
                progress: progress.clone(),
                publisher: publisher.clone(),
                topology: topology.clone(),
                notifier: notifier.clone(),
                metrics: metrics.clone(),
                retention: Duration::from_secs(f.retention_secs),
                owner: owner.clone(),
                lease,
                connections: connections.clone(),
                sweeping,
            };
            let stop = CancellationToken::new();
            tokio::spawn(sweep::run(deps(None), limits, sweep_every, stop.clone()));
            Ok(deps(Some(stop.drop_guard())))
        };
        consumer::serve(
            Role::Finalizer,
            &settings,
            &health,
            &deliveries,
            &shutdown,
            Topology::finalizer,
            EVENTS_IN_FLIGHT,
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
