//! `audience-finalizer`: configured by `AE_*` environment variables; stops on SIGTERM or SIGINT.

use audience_export_core::{config::Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    audience_export_core::failpoints_from_env();
    telemetry::init_logging(&settings.log);
    let running = audience_export_finalizer::start(settings, shutdown::on_signal()).await?;
    running.task.await?
}
