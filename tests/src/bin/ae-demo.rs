//! `ae-demo`: the upstream platform's side of the demo. Generates a segment, waits until the
//! fleet is ready, enqueues one export job for every field, waits for `export.finished` and
//! prints the report. Reads the same `AE_*` settings as the fleet.

use anyhow::Context;
use audience_export_core::amqp::{self, Publisher, Topology};
use audience_export_core::config::Settings;
use audience_export_core::contract::{Event, FinishedReport};
use audience_export_harness::app::eventually;
use audience_export_harness::segment::generate;
use clap::Parser;
use futures::StreamExt;
use lapin::types::FieldTable;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    version,
    about = "Runs one export through a running fleet and prints its report."
)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    members: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    segment: PathBuf,
    #[arg(long)]
    mail_dir: PathBuf,
    #[arg(long, default_value = "1234567890")]
    ad_account: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load()?;

    let started = Instant::now();
    let generated =
        generate(&args.segment, args.members, args.seed).context("writing the segment")?;
    println!(
        "Segment: {} members ({} malformed lines) in {} ({:.1} s)",
        generated.members,
        generated.malformed_lines,
        args.segment.display(),
        started.elapsed().as_secs_f64()
    );

    let http = reqwest::Client::new();
    let endpoints = [
        format!("{}/_emulator/config", settings.graph.base_url),
        format!("http://{}/readyz", settings.producer.ops_addr),
        format!("http://{}/readyz", settings.worker.ops_addr),
        format!("http://{}/readyz", settings.finalizer.ops_addr),
    ];
    for url in &endpoints {
        let ready = eventually(Duration::from_secs(60), || async {
            let r = http.get(url).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        ready.with_context(|| format!("{url} did not become ready within 60 s"))?;
    }
    println!("Fleet ready: emulator, producer, worker, finalizer.");

    let connection = amqp::connect(&settings.amqp_url, "ae-demo").await?;
    let topology = Topology::from_settings(&settings);
    let publisher = Publisher::new(&connection).await?;
    topology.declare(publisher.channel()).await?;
    let (_channel, mut events) = amqp::subscribe(&connection, &topology, "export.finished").await?;

    let export_id = format!("demo-{}", time::OffsetDateTime::now_utc().unix_timestamp());
    let job = serde_json::json!({
        "export_id": export_id,
        "workspace_id": "demo-workspace",
        "segment": {"id": "seg-demo", "name": "Demo segment"},
        "ad_account_id": format!("act_{}", args.ad_account),
        "fields": ["email", "phone", "madid"],
        "source": {"url": format!("file://{}", std::fs::canonicalize(&args.segment)?.display()), "format": "ndjson"},
        "notify": {"emails": ["marketer@example.com"]},
        "default_phone_country": "US",
        "requested_by": "marketer@example.com"
    });
    let enqueued = Instant::now();
    publisher
        .publish(
            "",
            &topology.jobs(),
            job.to_string().as_bytes(),
            FieldTable::default(),
        )
        .await?;
    println!("Enqueued export {export_id} for email, phone and madid.");

    let report = tokio::time::timeout(Duration::from_secs(args.timeout_secs), async {
        while let Some(Ok(delivery)) = events.next().await {
            if let Ok(Event::ExportFinished(r)) = serde_json::from_slice::<Event>(&delivery.data) {
                if r.export_id == export_id {
                    return Some(r);
                }
            }
        }
        None
    })
    .await
    .context("the export did not finish in time")?
    .context("the event stream ended")?;
    print_report(&report, enqueued.elapsed());
    println!(
        "\nThe notification email is in {}",
        std::fs::canonicalize(&args.mail_dir)?.display()
    );
    let _ = connection.close(200, "done").await;
    Ok(())
}

fn print_report(r: &FinishedReport, wall: Duration) {
    println!(
        "\nExport {} finished: {}{}",
        r.export_id,
        r.status.as_str(),
        r.reason
            .as_ref()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default()
    );
    println!(
        "Members read: {}, malformed lines: {}, duration: {:.2} s (wall {:.2} s)",
        r.members_read,
        r.malformed_records,
        r.duration_ms as f64 / 1000.0,
        wall.as_secs_f64()
    );
    println!(
        "\n{:<8} {:>18} {:>10} {:>8} {:>8} {:>6} {:>9} {:>9} {:>12} {:>11}",
        "field",
        "audience",
        "with value",
        "missing",
        "invalid",
        "dups",
        "prehashed",
        "uploaded",
        "Meta recvd",
        "Meta invalid"
    );
    for a in &r.audiences {
        println!(
            "{:<8} {:>18} {:>10} {:>8} {:>8} {:>6} {:>9} {:>9} {:>12} {:>11}",
            a.field.map(|f| f.as_str()).unwrap_or("-"),
            a.audience_id,
            a.with_value,
            a.missing,
            a.invalid_total(),
            a.duplicates,
            a.prehashed,
            a.uploaded,
            a.meta_received,
            a.meta_invalid
        );
        for (reason, n) in &a.invalid {
            println!("{:<8} {:>18}   invalid {reason}: {n}", "", "");
        }
    }
}
