//! `audience-producer`: runs the producer (configured by `AE_*` environment variables; stops on
//! SIGTERM or SIGINT), or manages a workspace's settings and Facebook connection for operators.

use audience_export_core::amqp::WorkQueue;
use audience_export_core::connection::Connections;
use audience_export_core::contract::{ExportId, PhoneCountry, WorkspaceId};
use audience_export_core::graph::GraphClient;
use audience_export_core::progress::ProgressStore;
use audience_export_core::token_cipher::TokenCipher;
use audience_export_core::workspace::Workspaces;
use audience_export_core::{config::Settings, shutdown, telemetry};
use audience_export_producer::connect::Connector;
use audience_export_producer::dead_letters;
use audience_export_producer::exports::Exports;
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use std::io::Read;

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
        workspace: WorkspaceId,
        /// ISO 3166-1 alpha-2 code, e.g. US. Omit to show the current one.
        country: Option<PhoneCountry>,
        /// Remove the workspace's default.
        #[arg(long, conflicts_with = "country")]
        clear: bool,
    },
    /// A workspace's Facebook connection, without a browser (the same checks as the HTTP API).
    Connection {
        #[command(subcommand)]
        action: ConnectionAction,
    },
    /// Exports: submit a job, see how far one is, cancel it, list a workspace's recent ones (the
    /// same as the HTTP API's /v1/exports).
    Exports {
        #[command(subcommand)]
        action: ExportAction,
    },
    /// What the dead-letter queues hold, and putting it back once the cause is fixed.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Lists parked messages (queue, what, export, reason) without taking them.
    List {
        /// jobs, shards or finalizer.
        #[arg(long, default_value = "shards")]
        queue: Queue,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Moves parked messages back into their work queue, oldest first.
    Replay {
        #[arg(long, default_value = "shards")]
        queue: Queue,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum ExportAction {
    /// Records and queues a job read from a file (`-`: standard input); prints its export id.
    Submit { job: std::path::PathBuf },
    /// Status, counts so far and per audience progress, as JSON.
    Status { export_id: ExportId },
    /// Stops an export: no shard is sent after this; it finishes `cancelled`.
    Cancel {
        export_id: ExportId,
        /// Who cancels (named in the report and the email).
        #[arg(long)]
        by: Option<String>,
    },
    /// A workspace's most recent exports, newest first, as JSON.
    List {
        workspace: WorkspaceId,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// A work queue, as the command line names it.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Queue {
    Jobs,
    Shards,
    Finalizer,
}

impl From<Queue> for WorkQueue {
    fn from(q: Queue) -> WorkQueue {
        match q {
            Queue::Jobs => WorkQueue::Jobs,
            Queue::Shards => WorkQueue::Shards,
            Queue::Finalizer => WorkQueue::Finalizer,
        }
    }
}

#[derive(Subcommand)]
enum ConnectionAction {
    /// Shows the connection's status, ad accounts and expiry (never the token).
    Status { workspace: WorkspaceId },
    /// Prints the URL of Meta's OAuth dialog for connecting the workspace.
    ConnectUrl {
        workspace: WorkspaceId,
        /// Who connects: told when the connection breaks or is about to expire.
        #[arg(long)]
        connected_by: Option<String>,
    },
    /// Sets or replaces the Business Manager system user token, read from standard input (never
    /// from the command line, where `ps` and shell history would keep it).
    SetSystemUserToken {
        workspace: WorkspaceId,
        /// Who is told when the connection breaks.
        #[arg(long)]
        connected_by: Option<String>,
    },
    /// Selects the ad accounts the workspace may export to and checks their terms.
    SelectAdAccounts {
        workspace: WorkspaceId,
        #[arg(required = true)]
        ad_account_ids: Vec<String>,
    },
    /// Deletes the connection and its tokens.
    Disconnect { workspace: WorkspaceId },
    /// Re-seals every stored token with the first key of AE_CONNECTIONS__ENCRYPTION_KEYS.
    RotateKeys,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    audience_export_core::failpoints_from_env();
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
                    .set_default_phone_country(&workspace, country)
                    .await?;
            }
            let current = workspaces.default_phone_country(&workspace).await?;
            match current {
                Some(country) => println!("{workspace}: {country}"),
                None => println!("{workspace}: no default phone country"),
            }
            Ok(())
        }
        Some(Command::DeadLetters { action }) => {
            let listed = match action {
                DeadLetterAction::List { queue, limit } => {
                    dead_letters::list(&settings, queue.into(), limit).await
                }
                DeadLetterAction::Replay { queue, limit } => {
                    dead_letters::replay(&settings, queue.into(), limit).await
                }
            };
            match listed {
                Ok(messages) => {
                    for m in &messages {
                        println!("{m}");
                    }
                    eprintln!("{} message(s)", messages.len());
                    Ok(())
                }
                Err(error) => {
                    eprintln!("error: {error:#}");
                    std::process::exit(1);
                }
            }
        }
        Some(Command::Exports { action }) => {
            if let Err(error) = exports(settings, action).await {
                eprintln!("error: {error:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Some(Command::Connection { action }) => {
            // An operator's command: one line saying what failed, no backtrace.
            if let Err(error) = connection(settings, action).await {
                eprintln!("error: {error:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn exports(settings: Settings, action: ExportAction) -> anyhow::Result<()> {
    let progress = ProgressStore::connect(&settings.redis_url, &settings.namespace).await?;
    let exports = Exports::from_settings(progress, &settings);
    let json = match action {
        ExportAction::Submit { job } => {
            let body = if job.as_os_str() == "-" {
                let mut body = Vec::new();
                std::io::stdin().read_to_end(&mut body)?;
                body
            } else {
                std::fs::read(&job)?
            };
            serde_json::to_string_pretty(&exports.submit(&body).await?)?
        }
        ExportAction::Status { export_id } => {
            serde_json::to_string_pretty(&exports.status(&export_id).await?)?
        }
        ExportAction::Cancel { export_id, by } => {
            serde_json::to_string_pretty(&exports.cancel(&export_id, by.as_deref()).await?)?
        }
        ExportAction::List { workspace, limit } => {
            serde_json::to_string_pretty(&exports.list(&workspace, limit).await?)?
        }
    };
    println!("{json}");
    Ok(())
}

async fn connection(settings: Settings, action: ConnectionAction) -> anyhow::Result<()> {
    let redis = audience_export_core::redis_conn::connect(&settings.redis_url).await?;
    if let ConnectionAction::Status { workspace } = &action {
        // Reading a status opens no token: no key needed.
        let view = Connections::without_tokens(redis, &settings.namespace)
            .view(workspace)
            .await?
            .ok_or_else(|| anyhow::anyhow!("workspace {workspace} has no Facebook connection"))?;
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    let cipher = TokenCipher::from_config(settings.connections.encryption_keys.as_ref())?;
    let connections = Connections::new(redis, &settings.namespace, cipher.clone());
    let graph = GraphClient::from_settings(&settings.graph)?;
    let connector = Connector::new(graph, connections.clone(), cipher, settings);
    let show = |view| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(&view)?);
        Ok(())
    };
    match action {
        ConnectionAction::Status { .. } => unreachable!("answered above"),
        ConnectionAction::ConnectUrl {
            workspace,
            connected_by,
        } => {
            let start = connector.start_oauth(&workspace, connected_by.as_deref())?;
            println!("{}", start.dialog_url);
            Ok(())
        }
        ConnectionAction::SetSystemUserToken {
            workspace,
            connected_by,
        } => {
            let mut token = String::new();
            std::io::stdin().read_to_string(&mut token)?;
            let token = SecretString::from(token.trim().to_owned());
            show(
                connector
                    .set_system_token(&workspace, token, connected_by.as_deref())
                    .await?,
            )
        }
        ConnectionAction::SelectAdAccounts {
            workspace,
            ad_account_ids,
        } => show(
            connector
                .select_ad_accounts(&workspace, &ad_account_ids)
                .await?,
        ),
        ConnectionAction::Disconnect { workspace } => {
            connector.disconnect(&workspace).await?;
            println!("{workspace}: disconnected");
            Ok(())
        }
        ConnectionAction::RotateKeys => {
            let n = connections.reseal_all().await?;
            println!("{n} token(s) re-sealed with the active key");
            Ok(())
        }
    }
}
