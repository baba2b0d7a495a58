//! `ae-bench`: measurements that need the whole fleet or the emulator, run from `just bench`.
//! Each figure is the median of several runs on this machine, printed with the raw runs.
//!
//! `emulator`: how many records per second the Graph API emulator accepts from concurrent
//! clients, beside how many one worker uploads when the emulator answers at once, so that the
//! emulator is shown never to be the bottleneck of a benchmark.

use audience_export_core::config::Settings;
use audience_export_core::connection::Connections;
use audience_export_core::contract::PhoneCountry;
use audience_export_core::progress::{FieldTotals, PlanTotals, ProgressStore};
use audience_export_core::token_cipher::TokenCipher;
use audience_export_core::{amqp, Field, Shard};
use audience_export_harness::app::{account, connect_workspace, eventually, export, ws};
use audience_export_harness::emulator::{AdAccountSeed, Config, Emulator, Seed, TokenSeed};
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Benchmarks of the audience-export fleet and its Graph API emulator.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Emulator capacity vs one worker's upload rate (records/s).
    Emulator {
        /// Runs of each measurement; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds of load per emulator run.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Shards of 10,000 records per worker run.
        #[arg(long, default_value_t = 40)]
        shards: u32,
        /// Concurrent clients loading the emulator.
        #[arg(long, default_value_t = 8)]
        clients: usize,
    },
    /// The fleet against an emulator enforcing R calls/s per ad account: achieved rate / R,
    /// throttled calls and failed shards, then the same with the budget halved mid-export, then
    /// doubled mid-export (each change: the rest's time / what the new budget allows).
    Ratelimit {
        /// R: the ad account's budget, in calls per second (also the workers' configured rate).
        #[arg(long, default_value_t = 20)]
        rate: u64,
        /// Shards of 10 records to export.
        #[arg(long, default_value_t = 500)]
        shards: u64,
        /// Emulator latency per call, in milliseconds.
        #[arg(long, default_value_t = 200)]
        latency_ms: u64,
        /// Length of the emulator's rate-limit window, in seconds.
        #[arg(long, default_value_t = 30.0)]
        window_secs: f64,
        /// Worker processes sharing the ad account's budget (1: the in-process worker).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Also print each export's timeline: uploads / throttled calls per half second.
        #[arg(long)]
        timeline: bool,
    },
    /// Meta's Python SDK against the fleet, on the same generated segment and the same emulator
    /// latency: (a) its format_params vs our prepare + encode, one core each; (b) its sequential
    /// add_users of every field vs the whole fleet's export.
    Sdk {
        #[arg(long, default_value_t = 1_000_000)]
        members: u64,
        #[arg(long, default_value_t = 300)]
        latency_base_ms: u64,
        #[arg(long, default_value_t = 20)]
        latency_per_record_us: u64,
        /// Uploads in flight per worker.
        #[arg(long, default_value_t = 16)]
        concurrency: u16,
        /// Fleets to run, by worker processes (1: the in-process worker), each against the
        /// SDK's one run.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1usize])]
        workers: Vec<usize>,
    },
    /// Peak RSS of the producer and of one worker (both real processes, release binaries) for
    /// segments of each size, generated on the fly into a FIFO so no file holds them.
    Memory {
        #[arg(long, value_delimiter = ',', default_values_t = vec![1_000_000u64, 10_000_000])]
        members: Vec<u64>,
    },
    /// Export time with one worker process, then two, at `latency_ms` and no rate limit.
    Scaleout {
        #[arg(long, default_value_t = 160_000)]
        members: u64,
        #[arg(long, default_value_t = 500)]
        latency_ms: u64,
        /// Worker process counts to time; each speed-up is against the first.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 2, 4])]
        workers: Vec<usize>,
    },
    /// Normalize + hash + encode one 10,000-record shard per field on one core, beside the raw
    /// SHA-256 rate on the same values once normalized (records/s). Phone twice: US numbers
    /// with punctuation (default country US), and a mix of 60+ regions in every notation
    /// (`phone-mixed`, the differential test's generator, each default country its own shard).
    Hashing {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        secs: f64,
        /// Only this field (email, phone, madid).
        #[arg(long)]
        field: Option<Field>,
    },
    /// The worker's phone fast path against the `phonenumber` crate on generated numbers (60+
    /// regions, every notation, with and without a default country): fails on any difference.
    PhoneDiff {
        #[arg(long, default_value_t = 1_000_000)]
        count: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

const TOKEN: &str = "EAAbench";
const ACCOUNT: &str = "5005";
const RECORDS: usize = 10_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Emulator {
            runs,
            secs,
            shards,
            clients,
        } => {
            let mut emulator_rates = Vec::new();
            let mut worker_rates = Vec::new();
            for run in 1..=runs {
                let e = emulator_capacity(clients, Duration::from_secs_f64(secs)).await?;
                let w = worker_rate(shards).await?;
                println!("run {run}: emulator {e:.0} records/s, one worker {w:.0} records/s");
                emulator_rates.push(e);
                worker_rates.push(w);
            }
            let (e, w) = (median(&mut emulator_rates), median(&mut worker_rates));
            println!(
                "median: emulator {e:.0} records/s, one worker {w:.0} records/s, ratio {:.1}",
                e / w
            );
        }
        Command::Ratelimit {
            rate,
            shards,
            latency_ms,
            window_secs,
            workers,
            timeline,
        } => {
            for change in [1.0, 0.5, 2.0] {
                let settings = (rate, shards, latency_ms, window_secs);
                ratelimit(settings, change, workers, timeline).await?;
            }
        }
        Command::Sdk {
            members,
            latency_base_ms,
            latency_per_record_us,
            concurrency,
            workers,
        } => {
            sdk(
                members,
                latency_base_ms,
                latency_per_record_us,
                concurrency,
                &workers,
            )
            .await?
        }
        Command::Memory { members } => {
            for m in members {
                memory(m).await?;
            }
        }
        Command::Scaleout {
            members,
            latency_ms,
            workers,
        } => scaleout(members, latency_ms, &workers).await?,
        Command::Hashing { runs, secs, field } => {
            hashing(runs, Duration::from_secs_f64(secs), field)
        }
        Command::PhoneDiff { count, seed } => phone_diff(count, seed)?,
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench_config() -> Config {
    Config {
        record_entries: false,
        ..Config::default()
    }
}

async fn start_emulator() -> anyhow::Result<Emulator> {
    let seed = Seed {
        tokens: vec![TokenSeed::user(TOKEN, &[ACCOUNT])],
        ad_accounts: vec![AdAccountSeed::new(ACCOUNT)],
    };
    Ok(Emulator::start(([127, 0, 0, 1], 0).into(), bench_config(), seed).await?)
}

/// Records per second the emulator accepts from `clients` concurrent keep-alive clients posting
/// full 10,000-entry requests, as the fleet sends them (form-encoded JSON payload).
async fn emulator_capacity(clients: usize, duration: Duration) -> anyhow::Result<f64> {
    let emulator = start_emulator().await?;
    let http = reqwest::Client::new();
    let created: serde_json::Value = http
        .post(format!(
            "{}/v27.0/act_{ACCOUNT}/customaudiences",
            emulator.base_url()
        ))
        .bearer_auth(TOKEN)
        .form(&[
            ("name", "bench"),
            ("customer_file_source", "USER_PROVIDED_ONLY"),
        ])
        .send()
        .await?
        .json()
        .await?;
    let audience = created["id"].as_str().unwrap_or_default().to_owned();
    let data: Vec<String> = (0..RECORDS).map(|i| format!("{i:064x}")).collect();
    let payload = serde_json::json!({"schema": "EMAIL_SHA256", "data": data}).to_string();
    // Shared, not copied, by every request: the load generator should cost little beside the
    // emulator it loads.
    let body = axum::body::Bytes::from(serde_urlencoded::to_string([("payload", payload)])?);
    let url = format!("{}/v27.0/{audience}/users", emulator.base_url());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            while started.elapsed() < duration {
                let r = http
                    .post(&url)
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body.clone())
                    .send()
                    .await;
                if let Ok(r) = r {
                    if r.status().is_success() && r.bytes().await.is_ok() {
                        accepted += RECORDS as u64;
                    }
                }
            }
            accepted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    emulator.stop();
    Ok(rate)
}

/// Records per second one worker (default settings) uploads when the emulator answers at once:
/// `shards` shards of 10,000 raw emails are queued first, then the worker is started and timed
/// until Redis counts them all.
async fn worker_rate(shards: u32) -> anyhow::Result<f64> {
    let emulator = start_emulator().await?;
    let namespace = format!(
        "bench{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..10)
            .unwrap_or("x")
    );
    let mut settings = Settings::for_namespace(&namespace);
    settings.graph.base_url = emulator.base_url();
    settings.connections.encryption_keys = Some(TokenCipher::generate_config("bench"));
    settings.worker.ops_addr = ([127, 0, 0, 1], 0).into();
    settings.worker.calls_per_second_per_account = 100_000;

    let graph = audience_export_core::graph::GraphClient::from_settings(&settings.graph)?;
    let token = SecretString::from(TOKEN);
    let audience = graph
        .create_custom_audience(&token, &account(ACCOUNT), "bench", "", "USER_PROVIDED_ONLY")
        .await?;
    let progress = ProgressStore::connect(&settings.redis_url, &namespace).await?;
    let cipher = TokenCipher::from_config(settings.connections.encryption_keys.as_ref())?;
    let connections = Connections::new(progress.connection(), &namespace, cipher);
    connect_workspace(&connections, "ws", TOKEN, ACCOUNT).await;
    let export_id = export("bench-export");
    progress
        .begin(
            &export_id,
            "{}",
            0,
            Duration::from_secs(600),
            "ae-bench",
            Duration::from_secs(600),
        )
        .await?;
    let mut plan = PlanTotals::default();
    plan.fields.insert(
        Field::Email,
        FieldTotals {
            shards: shards as u64,
            ..FieldTotals::default()
        },
    );
    progress.seal(&export_id, &plan).await?;

    let topology = amqp::Topology::from_settings(&settings);
    let connection = amqp::connect(&settings.amqp_url, "ae-bench").await?;
    let publisher = amqp::Publisher::new(&connection).await?;
    topology.declare(publisher.channel()).await?;
    for index in 0..shards {
        let records = (0..RECORDS)
            .map(|i| format!(" User{index}.{i}@Example.COM "))
            .collect();
        let shard = Shard {
            export_id: export_id.clone(),
            workspace_id: ws("ws"),
            audience_id: audience.clone(),
            ad_account_id: account(ACCOUNT),
            field: Field::Email,
            shard_index: index,
            plan: String::new(),
            records,
            attempt: 1,
            default_phone_country: None,
            dry_run: false,
        };
        publisher.to_queue(&topology.shards(), &shard).await?;
    }

    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let worker = audience_export_worker::start(settings.clone(), shutdown.clone()).await?;
    let done = eventually(Duration::from_secs(300), || async {
        let s = progress.progress(&export_id).await.ok()?;
        (s.shards_done >= shards as u64).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    shutdown.cancel();
    worker.task.await??;
    topology.delete(publisher.channel()).await?;
    let _ = connection.close(200, "done".into()).await;
    emulator.stop();
    anyhow::ensure!(done.is_some(), "the worker did not finish in 300 s");
    Ok(shards as f64 * RECORDS as f64 / elapsed.as_secs_f64())
}

/// Runs `work` (one shard) repeatedly for `secs` and returns records per second.
fn rate(records: usize, secs: Duration, mut work: impl FnMut() -> usize) -> f64 {
    let started = Instant::now();
    let mut done = 0usize;
    let mut sink = 0usize;
    while started.elapsed() < secs {
        sink = sink.wrapping_add(work());
        done += records;
    }
    std::hint::black_box(sink);
    done as f64 / started.elapsed().as_secs_f64()
}

fn hashing(runs: usize, secs: Duration, only: Option<Field>) {
    use audience_export_worker::normalize::{normalize, Rules};
    use audience_export_worker::phone_diff::Samples;
    use audience_export_worker::prepare::prepare;
    use sha2::Digest;
    let us = Rules::new(PhoneCountry::parse("US").ok());
    // Each input: a label, its field, and its shards with their rules (one default country per
    // shard, as a job has).
    type Shards = Vec<(Rules, Vec<String>)>;
    let mut mixed: std::collections::BTreeMap<Option<String>, Vec<String>> = Default::default();
    for sample in Samples::new(42).take(RECORDS) {
        let country = sample.default_country.map(|c| c.as_str().to_owned());
        mixed.entry(country).or_default().push(sample.value);
    }
    let mixed: Shards = mixed
        .into_iter()
        .map(|(country, values)| {
            let country = country.and_then(|c| PhoneCountry::parse(&c).ok());
            (Rules::new(country), values)
        })
        .collect();
    let inputs: Vec<(&str, Field, Shards)> = vec![
        (
            "email",
            Field::Email,
            vec![(
                us,
                (0..RECORDS)
                    .map(|i| format!(" User{i}.Name@Example.COM "))
                    .collect(),
            )],
        ),
        (
            "phone",
            Field::Phone,
            vec![(
                us,
                (0..RECORDS)
                    .map(|i| format!("+1 (212) {:03}-{:04}", 200 + i % 700, i))
                    .collect(),
            )],
        ),
        ("phone-mixed", Field::Phone, mixed),
        (
            "madid",
            Field::Madid,
            vec![(
                us,
                (0..RECORDS)
                    .map(|i| format!("6D92078A-8246-4BA4-AE5B-{i:012X}"))
                    .collect(),
            )],
        ),
    ];
    for (label, field, shards) in inputs
        .iter()
        .filter(|(_, f, _)| only.is_none_or(|o| o == *f))
    {
        let records: usize = shards.iter().map(|(_, values)| values.len()).sum();
        // What raw SHA-256 is given: the same values, normalized (the invalid ones dropped).
        let normalized: Vec<String> = shards
            .iter()
            .flat_map(|(rules, values)| {
                values
                    .iter()
                    .filter_map(|v| normalize(*field, v, rules).ok())
                    .map(|n| n.normalized)
            })
            .collect();
        let mut prepared = Vec::new();
        let mut raw_sha = Vec::new();
        for _ in 0..runs {
            prepared.push(rate(records, secs, || {
                shards
                    .iter()
                    .map(|(rules, values)| {
                        let p = prepare(*field, values, rules);
                        audience_export_core::graph::users_form(field.schema(), &p.data).len()
                    })
                    .sum()
            }));
            raw_sha.push(rate(normalized.len(), secs, || {
                normalized
                    .iter()
                    .map(|v| sha2::Sha256::digest(v.as_bytes())[0] as usize)
                    .sum()
            }));
        }
        let (p, r) = (median(&mut prepared), median(&mut raw_sha));
        println!("{label:<11} normalize+hash+encode {p:>10.0} records/s   raw SHA-256 {r:>10.0} records/s   ({:.0}% of raw)", 100.0 * p / r);
    }
}

/// `ae-bench phone-diff`: the phone fast path against the crate on `count` generated numbers.
fn phone_diff(count: usize, seed: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let report = audience_export_worker::phone_diff::run(count, seed);
    println!("{}", report.summary());
    println!("seed {seed}, {:.1} s", started.elapsed().as_secs_f64());
    for d in &report.disagreements {
        println!("disagreement: {d:?}");
    }
    anyhow::ensure!(
        report.disagreement_count == 0,
        "{} values normalized differently by the fast path and the crate",
        report.disagreement_count
    );
    Ok(())
}

/// One export of `shards` 10-record email shards through the whole in-process fleet, the emulator
/// allowing `rate` calls/s per ad account (as `rate × window` calls per sliding window). A
/// `change` other than 1 multiplies the budget once half the shards are done; then the rest's
/// time (from the change to the finished event) is compared with what the new budget allows:
/// the shards not done at the change / (new budget / window), one call each.
async fn ratelimit(
    (rate, shards, latency_ms, window_secs): (u64, u64, u64, f64),
    change: f64,
    workers: usize,
    timeline: bool,
) -> anyhow::Result<()> {
    use audience_export_harness::app::{spawn_app_with, Roles, AD_ACCOUNT};
    use audience_export_harness::emulator::Latency;
    let roles = Roles {
        worker: workers <= 1,
        ..Roles::ALL
    };
    let app = spawn_app_with(roles, |s| {
        s.producer.shard_size = 10;
        s.worker.calls_per_second_per_account = rate as u32;
        // Meta's window is a platform constant the fleet is told; the emulator's is shortened.
        s.worker.usage_window_secs = window_secs.ceil() as u64;
    })
    .await;
    let processes: Vec<_> = (0..workers)
        .filter(|_| workers > 1)
        .map(|_| app.spawn_worker_process(&sibling("audience-worker")))
        .collect();
    let budget = (rate as f64 * window_secs) as u64;
    app.emulator.configure(|c| {
        c.window_secs = window_secs;
        c.record_entries = false;
    });
    app.emulator.set_budget(AD_ACCOUNT, budget);
    app.emulator.set_latency(Latency {
        base_ms: latency_ms,
        per_record_us: 0,
        jitter_ms: latency_ms / 10,
    });
    let segment = app.dir.join("ratelimit.ndjson");
    write_plain_emails(&segment, shards * 10)?;
    let started = Instant::now();
    app.enqueue(
        app.job("bench-rate", &["email"], &segment)
            .to_string()
            .as_bytes(),
    )
    .await;
    let mut changed = None;
    if change != 1.0 {
        let half = eventually(Duration::from_secs(600), || async {
            let s = app.progress_of("bench-rate").await;
            (s.shards_done >= shards / 2).then_some(s.shards_done)
        })
        .await;
        anyhow::ensure!(half.is_some(), "half the export did not finish");
        app.emulator
            .set_budget(AD_ACCOUNT, (budget as f64 * change) as u64);
        let done = app.progress_of("bench-rate").await.shards_done;
        changed = Some((Instant::now(), done));
    }
    let report = app.finished("bench-rate", Duration::from_secs(1_800)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let finished = Instant::now();
    let (calls, throttled) = app.emulator.account_stats(AD_ACCOUNT);
    // The emulator's call log, copied once for every figure below.
    let log = app.emulator.calls();
    let uploads = log
        .iter()
        .filter(|c| c.path.ends_with("/users") && c.error_code.is_none())
        .count() as u64;
    if timeline {
        let mut halves = std::collections::BTreeMap::<u128, (u32, u32)>::new();
        for c in log.iter().filter(|c| c.path.ends_with("/users")) {
            let half = halves
                .entry(c.at.duration_since(started).as_millis() / 500)
                .or_default();
            match c.error_code {
                None => half.0 += 1,
                Some(_) => half.1 += 1,
            }
        }
        let change = changed.map_or("no budget change".to_owned(), |(at, _)| {
            format!(
                "budget changed at {:.1} s",
                at.duration_since(started).as_secs_f64()
            )
        });
        let halves: Vec<String> = halves
            .iter()
            .map(|(h, (ok, refused))| format!("{:.1}s {ok}/{refused}", *h as f64 / 2.0))
            .collect();
        println!(
            "timeline ({change}; uploads/throttled per half second from the start): {}",
            halves.join(" ")
        );
    }
    let email = &report.audiences[0];
    for p in processes {
        stop_process(p).await;
    }
    let after_change = changed.map(|(at, done)| {
        let new_rate = rate as f64 * change;
        let rest = finished.duration_since(at).as_secs_f64();
        let allowed = shards.saturating_sub(done) as f64 / new_rate;
        // When the fleet first sent 95% of the new rate over one second (successful uploads).
        let times: Vec<Instant> = log
            .iter()
            .filter(|c| c.path.ends_with("/users") && c.error_code.is_none() && c.at >= at)
            .map(|c| c.at)
            .collect();
        let needed = (0.95 * new_rate).ceil() as usize;
        let reached = (needed >= 1 && times.len() >= needed)
            .then(|| {
                times
                    .windows(needed)
                    .find(|w| w[needed - 1].duration_since(w[0]) <= Duration::from_secs(1))
                    .map(|w| w[needed - 1].duration_since(at).as_secs_f64())
            })
            .flatten();
        // What the new budget itself allows: the emulator's window replayed with the calls it
        // counted before the change, the calls after it scheduled as early as the window takes
        // them (no pace, no latency): when the last of them could have gone, against when the
        // fleet's last did.
        let counted: Vec<Instant> = log
            .iter()
            .filter(|c| c.ad_account.as_deref() == Some(AD_ACCOUNT))
            .filter(|c| !matches!(c.error_code, Some(80003) | Some(17)))
            .map(|c| c.at)
            .collect();
        let before: Vec<Instant> = counted.iter().copied().filter(|t| *t < at).collect();
        let after: Vec<Instant> = counted.iter().copied().filter(|t| *t >= at).collect();
        let oracle = budget_oracle(
            &before,
            after.len(),
            at,
            (budget as f64 * change) as u64,
            Duration::from_secs_f64(window_secs),
        );
        let fleet_last = after
            .iter()
            .max()
            .map(|t| t.duration_since(at).as_secs_f64())
            .unwrap_or(0.0);
        let oracle_ratio = if oracle >= Duration::from_millis(500) {
            format!("ratio {:.2}", fleet_last / oracle.as_secs_f64())
        } else {
            "no ratio: the new budget takes them all at once".to_owned()
        };
        format!(
            "; after the change: {} shards in {rest:.1} s where {new_rate:.0} calls/s allows {allowed:.1} s: ratio {:.2}; budget oracle: the last of {} counted calls could go {:.1} s after the change, the fleet's went {fleet_last:.1} s after it: {oracle_ratio}; 95% of the new rate over 1 s {}",
            shards.saturating_sub(done),
            rest / allowed.max(f64::EPSILON),
            after.len(),
            oracle.as_secs_f64(),
            reached.map_or("never reached".to_owned(), |s| format!("reached {s:.1} s after it")),
        )
    });
    println!(
        "{}, {workers} worker process(es): R = {rate} calls/s, {latency_ms} ms latency, {shards} shards: {uploads} uploads in {elapsed:.1} s = {:.2} calls/s = {:.0}% of R; throttled {throttled} of {calls} calls ({:.2}%); failed shards {}{}",
        match change {
            c if c < 1.0 => "budget halved mid-export",
            c if c > 1.0 => "budget doubled mid-export",
            _ => "steady budget",
        },
        uploads as f64 / elapsed,
        100.0 * uploads as f64 / elapsed / rate as f64,
        100.0 * throttled as f64 / calls as f64,
        email.shards_failed,
        after_change.unwrap_or_default(),
    );
    app.stop().await;
    Ok(())
}

/// When the last of `rest` calls made from `change` on could go at the earliest under a budget
/// of `budget` calls per sliding `window` (the emulator's rule: a call is taken while fewer than
/// `budget` calls of the last `window` were), the calls of `before` (sorted) already counted.
fn budget_oracle(
    before: &[Instant],
    rest: usize,
    change: Instant,
    budget: u64,
    window: Duration,
) -> Duration {
    let mut counted: std::collections::VecDeque<Instant> = before
        .iter()
        .copied()
        .filter(|t| change.duration_since(*t) < window)
        .collect();
    let mut t = change;
    for _ in 0..rest {
        loop {
            while counted
                .front()
                .is_some_and(|oldest| t.duration_since(*oldest) >= window)
            {
                counted.pop_front();
            }
            if (counted.len() as u64) < budget.max(1) {
                break;
            }
            // Not before the oldest counted call leaves the window.
            t = counted[0] + window;
        }
        counted.push_back(t);
    }
    t.duration_since(change)
}

/// Writes `members` members with distinct, valid emails.
fn write_plain_emails(path: &std::path::Path, members: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..members {
        writeln!(
            out,
            "{{\"external_id\":\"u{i}\",\"email\":\"member{i}@example.com\"}}"
        )?;
    }
    out.flush()
}

/// The Python virtual environment with Meta's SDK, created on first use from
/// bench/sdk/requirements.txt (PyPI).
fn sdk_python() -> anyhow::Result<std::path::PathBuf> {
    let python = std::path::PathBuf::from(".bench/venv/bin/python");
    if !python.exists() {
        println!("Creating .bench/venv with facebook-business (bench/sdk/requirements.txt)...");
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv", ".bench/venv"])
            .status()?
            .success()
            && std::process::Command::new(".bench/venv/bin/pip")
                .args(["install", "--quiet", "-r", "bench/sdk/requirements.txt"])
                .status()?
                .success();
        anyhow::ensure!(ok, "could not create the SDK's virtual environment");
    }
    Ok(python)
}

/// Runs the SDK script; returns (field, records, seconds) per line it prints.
fn run_sdk(
    python: &std::path::Path,
    mode: &str,
    graph: &str,
    token: &str,
    segment: &std::path::Path,
) -> anyhow::Result<Vec<(String, u64, f64)>> {
    let out = std::process::Command::new(python)
        .args([
            "bench/sdk/sdk_bench.py",
            mode,
            "--graph",
            graph,
            "--token",
            token,
            "--account",
            ACCOUNT,
            "--segment",
        ])
        .arg(segment)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "the SDK run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok((
                v["field"].as_str().unwrap_or_default().to_owned(),
                v["records"].as_u64().unwrap_or(0),
                v["seconds"].as_f64().unwrap_or(0.0),
            ))
        })
        .collect()
}

async fn sdk(
    members: u64,
    base_ms: u64,
    per_record_us: u64,
    concurrency: u16,
    fleets: &[usize],
) -> anyhow::Result<()> {
    use audience_export_core::contract::{Source, SourceFormat};
    use audience_export_harness::app::{spawn_app_with, Roles, AD_ACCOUNT};
    use audience_export_harness::emulator::Latency;
    use audience_export_producer::source::{Line, SegmentReader, SourceSettings};
    use audience_export_worker::normalize::Rules;
    use audience_export_worker::prepare::prepare;

    let python = sdk_python()?;
    std::fs::create_dir_all(".bench")?;
    let segment = std::fs::canonicalize(".bench")?.join("sdk-segment.ndjson");
    let generated = audience_export_harness::segment::generate(&segment, members, 42)?;
    drop(generated);
    let latency = Latency {
        base_ms,
        per_record_us,
        jitter_ms: base_ms / 10,
    };
    println!(
        "Segment: {members} members. Emulator latency: {base_ms} ms + {per_record_us} us/record."
    );

    // (a) Normalize + hash: the SDK's format_params vs our prepare + users_form, one core each.
    let emulator = start_emulator().await?;
    let sdk_hash = run_sdk(&python, "hash", &emulator.base_url(), TOKEN, &segment)?;
    let mut values: std::collections::BTreeMap<Field, Vec<String>> = Default::default();
    let bench_dir = std::fs::canonicalize(".bench")?;
    let sources = SourceSettings {
        file_root: Some(bench_dir.clone()),
        ..SourceSettings::default()
    };
    let source = Source {
        url: format!("file://{}", segment.display()),
        format: SourceFormat::Ndjson,
        compression: None,
        headers_secret: None,
    };
    let mut reader = SegmentReader::open(&source, &sources).await?;
    while let Some(line) = reader.next().await? {
        if let Line::Record(r) = line {
            for field in Field::ALL {
                if let Some(v) = r.value(field) {
                    values.entry(field).or_default().push(v);
                }
            }
        }
    }
    let rules = Rules::new(Some(PhoneCountry::parse("US")?));
    println!("\n(a) normalize + hash, one core (records/s)\nfield   SDK format_params   ours (prepare + encode)   ratio");
    for (field, records, seconds) in &sdk_hash {
        let field: Field = field.parse().map_err(anyhow::Error::msg)?;
        let ours = values.get(&field).map(Vec::as_slice).unwrap_or_default();
        let started = Instant::now();
        let ours_out: usize = tokio::task::block_in_place(|| {
            ours.chunks(RECORDS)
                .map(|chunk| {
                    audience_export_core::graph::users_form(
                        field.schema(),
                        &prepare(field, chunk, &rules).data,
                    )
                    .len()
                })
                .sum()
        });
        std::hint::black_box(ours_out);
        let (sdk_rate, our_rate) = (
            *records as f64 / seconds,
            ours.len() as f64 / started.elapsed().as_secs_f64(),
        );
        println!(
            "{field:<7} {sdk_rate:>17.0}   {our_rate:>23.0}   {:>5.2}",
            our_rate / sdk_rate
        );
    }
    emulator.stop();

    // (b) Upload every field: the SDK's sequential add_users vs the whole fleet.
    let emulator = start_emulator().await?;
    emulator.set_latency(latency.clone());
    let sdk_upload = run_sdk(&python, "upload", &emulator.base_url(), TOKEN, &segment)?;
    let sdk_seconds: f64 = sdk_upload.iter().map(|(_, _, s)| s).sum();
    let sdk_records: u64 = sdk_upload.iter().map(|(_, r, _)| r).sum();
    emulator.stop();

    println!(
        "\n(b) upload of {members} members x 3 fields\nSDK, sequential add_users: {sdk_records} values in {sdk_seconds:.1} s"
    );
    for &workers in fleets {
        let roles = Roles {
            worker: workers <= 1,
            ..Roles::ALL
        };
        let bench_dir = bench_dir.clone();
        let app = spawn_app_with(roles, |s| {
            s.worker.concurrency = concurrency;
            s.worker.calls_per_second_per_account = 1_000;
            // The segment is in .bench/, not in the app's directory.
            s.producer.file_root = Some(bench_dir);
        })
        .await;
        app.emulator.configure(|c| c.record_entries = false);
        app.emulator.set_latency(latency.clone());
        let processes: Vec<_> = (0..workers)
            .filter(|_| workers > 1)
            .map(|_| app.spawn_worker_process(&sibling("audience-worker")))
            .collect();
        let started = Instant::now();
        app.enqueue(
            app.job("bench-sdk", &["email", "phone", "madid"], &segment)
                .to_string()
                .as_bytes(),
        )
        .await;
        let report = app.finished("bench-sdk", Duration::from_secs(3_600)).await;
        let ours = started.elapsed().as_secs_f64();
        let uploaded: u64 = report.audiences.iter().map(|a| a.uploaded).sum();
        let (calls, _) = app.emulator.account_stats(AD_ACCOUNT);
        for p in processes {
            stop_process(p).await;
        }
        app.stop().await;
        println!(
            "fleet (1 producer, {workers} worker(s) x {concurrency}, 1 finalizer): {uploaded} values uploaded in {calls} calls, {ours:.1} s from enqueue to export.finished: ratio {:.1}x",
            sdk_seconds / ours
        );
    }
    Ok(())
}

/// A binary built beside this one (same target directory and profile), wherever
/// `CARGO_TARGET_DIR` put them.
fn sibling(name: &str) -> String {
    let exe = std::env::current_exe().expect("the path of this benchmark binary");
    exe.with_file_name(name).to_string_lossy().into_owned()
}

/// Peak resident set size of a running process, from /proc (Linux).
fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM for {pid}"))?;
    Ok(kib / 1024.0)
}

async fn stop_process(mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(45), child.wait()).await;
}

async fn memory(members: u64) -> anyhow::Result<()> {
    use audience_export_harness::app::{spawn_app_with, Roles};
    let app = spawn_app_with(
        Roles {
            producer: false,
            worker: false,
            finalizer: true,
        },
        |s| {
            s.worker.calls_per_second_per_account = 100_000;
        },
    )
    .await;
    app.emulator.configure(|c| c.record_entries = false);
    let fifo = app.dir.join("segment.fifo");
    anyhow::ensure!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()?
            .success(),
        "mkfifo failed"
    );
    let producer = app.spawn_producer_process(&sibling("audience-producer"));
    let worker = app.spawn_worker_process(&sibling("audience-worker"));
    let (producer_pid, worker_pid) = (producer.id().unwrap_or(0), worker.id().unwrap_or(0));
    let path = fifo.clone();
    // Opening a FIFO for writing blocks until the producer opens it to read.
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let out = std::fs::OpenOptions::new().write(true).open(path)?;
        audience_export_harness::segment::stream(out, members, 7)
    });
    let started = Instant::now();
    app.enqueue(
        app.job("bench-memory", &["email"], &fifo)
            .to_string()
            .as_bytes(),
    )
    .await;
    let report = app
        .finished("bench-memory", Duration::from_secs(3_600))
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let (producer_mib, worker_mib) = (peak_rss_mib(producer_pid)?, peak_rss_mib(worker_pid)?);
    stop_process(producer).await;
    stop_process(worker).await;
    let _ = writer.join();
    println!(
        "{members} members (email, {} shards) in {elapsed:.1} s: producer peak RSS {producer_mib:.1} MiB, worker peak RSS {worker_mib:.1} MiB (prefetch {})",
        report.audiences.first().map(|a| a.shards).unwrap_or(0),
        app.settings.worker.concurrency
    );
    app.stop().await;
    Ok(())
}

async fn scaleout(members: u64, latency_ms: u64, counts: &[usize]) -> anyhow::Result<()> {
    use audience_export_harness::app::{spawn_app_with, Roles};
    use audience_export_harness::emulator::Latency;
    let mut seconds = Vec::new();
    for &workers in counts {
        let app = spawn_app_with(
            Roles {
                producer: true,
                worker: false,
                finalizer: true,
            },
            |s| {
                s.producer.shard_size = 1_000;
                s.worker.calls_per_second_per_account = 100_000;
            },
        )
        .await;
        app.emulator.configure(|c| c.record_entries = false);
        app.emulator.set_latency(Latency {
            base_ms: latency_ms,
            per_record_us: 0,
            jitter_ms: latency_ms / 10,
        });
        let segment = app.dir.join("scaleout.ndjson");
        audience_export_harness::segment::stream(std::fs::File::create(&segment)?, members, 11)?;
        let processes: Vec<_> = (0..workers)
            .map(|_| app.spawn_worker_process(&sibling("audience-worker")))
            .collect();
        let started = Instant::now();
        app.enqueue(
            app.job("bench-scaleout", &["email"], &segment)
                .to_string()
                .as_bytes(),
        )
        .await;
        let report = app
            .finished("bench-scaleout", Duration::from_secs(3_600))
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        for p in processes {
            stop_process(p).await;
        }
        // Where the time went: before the first upload arrived at Meta (planning, the health
        // check, the audience's creation), the uploads, and after the last upload (its answer,
        // the follow-up's readback, the email): the part more workers do not shorten.
        let calls = app.emulator.calls();
        let uploads: Vec<Instant> = calls
            .iter()
            .filter(|c| c.path.ends_with("/users") && c.error_code.is_none())
            .map(|c| c.at)
            .collect();
        let since = |t: Option<&Instant>| {
            t.map(|t| t.saturating_duration_since(started).as_secs_f64())
                .unwrap_or(f64::NAN)
        };
        let (first, last) = (since(uploads.iter().min()), since(uploads.iter().max()));
        println!(
            "{workers} worker process(es), {} shards of 1,000 at {latency_ms} ms: {elapsed:.1} s (first upload at {first:.2} s, last at {last:.2} s, finished {:.2} s after it)",
            report.audiences.first().map(|a| a.shards).unwrap_or(0),
            elapsed - last
        );
        seconds.push(elapsed);
        app.stop().await;
    }
    for (workers, secs) in counts.iter().zip(&seconds).skip(1) {
        println!(
            "speed-up of {workers} worker processes over {}: {:.2}x",
            counts[0],
            seconds[0] / secs
        );
    }
    Ok(())
}

#[cfg(test)]
mod oracle_tests {
    use super::*;

    #[test]
    fn the_oracle_waits_for_counted_calls_to_leave_the_window() {
        let t0 = Instant::now();
        let before: Vec<Instant> = (0..10)
            .map(|i| t0 + Duration::from_millis(100 * i))
            .collect();
        let change = t0 + Duration::from_millis(950);
        let window = Duration::from_secs(1);
        // Full window: the next call waits for the call at 0 ms to leave (1,000 ms), the one
        // after for the call at 100 ms (1,100 ms).
        assert_eq!(
            budget_oracle(&before, 2, change, 10, window),
            Duration::from_millis(150)
        );
        // Room for both at once.
        assert_eq!(
            budget_oracle(&before, 2, change, 12, window),
            Duration::ZERO
        );
    }
}
