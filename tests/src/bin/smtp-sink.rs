//! `smtp-sink`: accepts mail over SMTP on loopback and writes each message to a folder as an
//! `.eml` file. The demo's mailbox.

use audience_export_harness::smtp::SmtpSink;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    about = "Writes every message received over SMTP into a folder."
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:2525")]
    listen: SocketAddr,
    #[arg(long)]
    dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let sink = SmtpSink::start(args.listen, Some(args.dir.clone())).await?;
    println!(
        "smtp-sink listening on {}, writing to {}",
        sink.addr,
        args.dir.display()
    );
    audience_export_core::shutdown::on_signal()
        .cancelled()
        .await;
    sink.stop();
    Ok(())
}
