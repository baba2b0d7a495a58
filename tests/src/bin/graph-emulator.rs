//! `graph-emulator`: the Graph API emulator as a process, for the demo and the benchmarks.
//! Configured by a JSON file (`{"config": {...}, "seed": {...}}`) and/or flags; the control API
//! is under `/_emulator/`. Listens on loopback by default.

use audience_export_harness::emulator::{AdAccountSeed, Config, Emulator, Seed, TokenSeed};
use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    about = "Emulates Meta's Graph API for customer-list Custom Audiences."
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8470")]
    listen: SocketAddr,
    /// JSON file with `config` and `seed` sections (see tests/README.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A user token to accept (repeatable); it may use every `--ad-account`.
    #[arg(long)]
    token: Vec<String>,
    /// An ad account number, without `act_` (repeatable).
    #[arg(long)]
    ad_account: Vec<String>,
    /// Calls per rate-limit window per ad account.
    #[arg(long)]
    budget: Option<u64>,
    /// Rate-limit window in seconds.
    #[arg(long)]
    window_secs: Option<f64>,
    #[arg(long)]
    latency_base_ms: Option<u64>,
    #[arg(long)]
    latency_per_record_us: Option<u64>,
    #[arg(long)]
    latency_jitter_ms: Option<u64>,
    /// Do not keep received entries (large benchmarks).
    #[arg(long)]
    no_record_entries: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct File {
    config: Config,
    seed: Seed,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut file: File = match &args.config {
        Some(path) => serde_json::from_slice(&std::fs::read(path)?)?,
        None => File::default(),
    };
    let c = &mut file.config;
    if let Some(b) = args.budget {
        c.default_budget = b;
    }
    if let Some(w) = args.window_secs {
        c.window_secs = w;
    }
    if let Some(v) = args.latency_base_ms {
        c.latency.base_ms = v;
    }
    if let Some(v) = args.latency_per_record_us {
        c.latency.per_record_us = v;
    }
    if let Some(v) = args.latency_jitter_ms {
        c.latency.jitter_ms = v;
    }
    if args.no_record_entries {
        c.record_entries = false;
    }
    let accounts: Vec<&str> = args.ad_account.iter().map(String::as_str).collect();
    for token in &args.token {
        file.seed.tokens.push(TokenSeed::user(token, &accounts));
    }
    for account in &accounts {
        file.seed.ad_accounts.push(AdAccountSeed::new(account));
    }
    let emulator = Emulator::start(args.listen, file.config, file.seed).await?;
    println!("graph-emulator listening on http://{}", emulator.addr);
    audience_export_core::shutdown::on_signal()
        .cancelled()
        .await;
    emulator.stop();
    Ok(())
}
