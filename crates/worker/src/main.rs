//! `audience-worker`: runs the worker, or (`normalize`) shows how values would be normalized,
//! so support can answer "why did this user not match".

use audience_export_core::contract::PhoneCountry;
use audience_export_core::{config::Settings, shutdown, telemetry, Field};
use audience_export_worker::normalize::{normalize, Rules};
use clap::{Parser, Subcommand};
use std::io::{BufRead, Write};

#[derive(Parser)]
#[command(
    version,
    about = "Uploads audience shards to Meta. Configured by AE_* environment variables."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Reads raw values on stdin and prints, per line, the normalized value and what is sent,
    /// or `invalid: <reason>`.
    Normalize {
        #[arg(long)]
        field: Field,
        /// Country of phone numbers written without their country code, e.g. US.
        #[arg(long)]
        default_country: Option<PhoneCountry>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Some(Command::Normalize {
            field,
            default_country,
        }) => normalize_stdin(field, &Rules::new(default_country)),
        None => {
            let settings = Settings::load()?;
            audience_export_core::failpoints_from_env();
            telemetry::init_logging(&settings.log);
            let running = audience_export_worker::start(settings, shutdown::on_signal()).await?;
            running.task.await?
        }
    }
}

fn normalize_stdin(field: Field, rules: &Rules) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::stdin().lock().lines() {
        match normalize(field, &line?, rules) {
            Ok(n) => writeln!(out, "{}\t{}", n.normalized, n.sent)?,
            Err(reason) => writeln!(out, "invalid: {}", reason.as_str())?,
        }
    }
    Ok(())
}
