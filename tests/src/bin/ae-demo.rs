//! `ae-demo`: the upstream platform's side of the demo. Generates a segment, waits until the
//! fleet is ready, connects the demo workspace to Facebook through the producer's API (the
//! emulator plays Meta's OAuth dialog), enqueues one export job for every field, waits for
//! `export.finished` and prints the report. Reads the same `AE_*` settings as the fleet.

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
    connect(&http, &settings, WORKSPACE, &args.ad_account).await?;

    let connection = amqp::connect(&settings.amqp_url, "ae-demo").await?;
    let topology = Topology::from_settings(&settings);
    let publisher = Publisher::new(&connection).await?;
    topology.declare(publisher.channel()).await?;
    let (_channel, mut events) = amqp::subscribe(&connection, &topology, "export.finished").await?;

    let export_id = format!("demo-{}", time::OffsetDateTime::now_utc().unix_timestamp());
    let job = serde_json::json!({
        "export_id": export_id,
        "workspace_id": WORKSPACE,
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
                if r.export_id == export_id.as_str() {
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
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

const WORKSPACE: &str = "demo-workspace";

/// Connects `workspace` the way a marketer does, through the producer's API: start the OAuth
/// connect, follow Meta's dialog (the emulator approves it as a person who may use
/// `ad_account`), hand the code and state back to the API, then select the ad account.
async fn connect(
    http: &reqwest::Client,
    settings: &Settings,
    workspace: &str,
    ad_account: &str,
) -> anyhow::Result<()> {
    use secrecy::ExposeSecret;
    let api = format!("http://{}", settings.api.addr);
    let key = settings
        .api
        .key
        .as_ref()
        .map(|k| k.expose_secret().to_owned())
        .unwrap_or_default();
    let call = |method: reqwest::Method, path: &str, body: serde_json::Value| {
        http.request(method, format!("{api}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let start: serde_json::Value = call(
        reqwest::Method::POST,
        &format!("/v1/workspaces/{workspace}/connection/oauth"),
        serde_json::json!({"connected_by": "admin@example.com"}),
    )
    .await?
    .error_for_status()?
    .json()
    .await?;
    let dialog = start["dialog_url"].as_str().context("no dialog_url")?;

    // The person approves the dialog: a fresh token only the emulator and the fleet ever see.
    let token = format!("EAAdemo{:032x}", rand::random::<u128>());
    http.post(format!(
        "{}/_emulator/dialog/approvals",
        settings.graph.base_url
    ))
    .json(&serde_json::json!({"token": token, "kind": "user", "ad_accounts": [ad_account]}))
    .send()
    .await?
    .error_for_status()?;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let answer = no_redirects.get(dialog).send().await?;
    let back = answer
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .context("the dialog did not redirect back")?;
    let back = url::Url::parse(back)?;
    let param = |name: &str| {
        back.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let connected = call(
        reqwest::Method::POST,
        &format!("/v1/workspaces/{workspace}/connection/oauth/callback"),
        serde_json::json!({"code": param("code").context("no code")?, "state": param("state").context("no state")?}),
    )
    .await?;
    anyhow::ensure!(
        connected.status().is_success(),
        "the OAuth callback failed: {}",
        connected.text().await.unwrap_or_default()
    );
    let selected: serde_json::Value = call(
        reqwest::Method::PUT,
        &format!("/v1/workspaces/{workspace}/connection/ad-accounts"),
        serde_json::json!({"ad_account_ids": [ad_account]}),
    )
    .await?
    .error_for_status()?
    .json()
    .await?;
    println!(
        "Workspace {workspace} connected to Facebook through OAuth: {} token, ad account act_{ad_account} selected (terms accepted: {}).",
        selected["token_kind"].as_str().unwrap_or("?"),
        selected["ad_accounts"][0]["tos_accepted"]
    );
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
        if let (Some(lower), Some(upper)) = (
            a.approximate_count_lower_bound,
            a.approximate_count_upper_bound,
        ) {
            println!(
                "{:<8} {:>18}   Meta shows about {lower} to {upper} people",
                "", ""
            );
        }
    }
    if !r.excluded.is_empty() {
        let excluded: Vec<String> = r
            .excluded
            .iter()
            .map(|(a, n)| format!("{a}: {n}"))
            .collect();
        println!("\nLeft out by consent: {}", excluded.join(", "));
    }
}
