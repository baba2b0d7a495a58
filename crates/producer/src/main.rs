//! `audience-producer`: runs the producer (configured by `AE_*` environment variables; stops on
//! SIGTERM or SIGINT), or manages a workspace's settings for operators.

use audience_export_core::workspace::Workspaces;
use audience_export_core::{config::Settings, shutdown, telemetry};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Plans audience exports. Configured by AE_* environment variables."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Shows or sets the country of phone numbers written without their country code, for every
    /// export of a workspace that does not name one itself.
    PhoneCountry {
        workspace: String,
        /// ISO 3166-1 alpha-2 code, e.g. US. Omit to show the current one.
        country: Option<String>,
        /// Remove the workspace's default.
        #[arg(long, conflicts_with = "country")]
        clear: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    match Cli::parse().command {
        None => {
            telemetry::init_logging(&settings.log);
            let running = audience_export_producer::start(settings, shutdown::on_signal()).await?;
            running.task.await?
        }
        Some(Command::PhoneCountry {
            workspace,
            country,
            clear,
        }) => {
            let workspaces = Workspaces::connect(&settings.redis_url, &settings.namespace).await?;
            if clear || country.is_some() {
                workspaces
                    .set_default_phone_country(&workspace, country.as_deref())
                    .await?;
            }
            let current = workspaces.default_phone_country(&workspace).await?;
            println!(
                "{workspace}: {}",
                current.as_deref().unwrap_or("no default phone country")
            );
            Ok(())
        }
    }
}
