//! `ae-cluster`: the clusters of `just cluster-demo`. Starts a Redis Cluster (3 masters, 3
//! replicas) and a 3-node RabbitMQ cluster on free ports, writes the fleet's settings for them
//! to `--env-file`, then watches the namespace's first export: once `--kill-after` shards are
//! recorded it kills the Redis master holding the export's keys (its replica takes over), and
//! `--stop-after` shards later it stops a RabbitMQ node the fleet is connected to. Stops both
//! clusters on SIGTERM or SIGINT.

use anyhow::Context;
use audience_export_core::progress::ProgressStore;
use audience_export_harness::app::eventually;
use audience_export_harness::cluster::{RabbitCluster, RedisCluster};
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    version,
    about = "Runs a Redis Cluster and a RabbitMQ cluster for the fleet, and breaks a node of each under its first export."
)]
struct Args {
    /// Where to write AE_REDIS_URL, AE_AMQP_URL and AE_QUORUM_INITIAL_GROUP_SIZE (`export` lines).
    #[arg(long)]
    env_file: PathBuf,
    /// The fleet's namespace (AE_NAMESPACE), to find its export.
    #[arg(long, default_value = "ae")]
    namespace: String,
    /// Kill the Redis master of the export's keys once this many shards are recorded.
    #[arg(long, default_value_t = 40)]
    kill_after: u64,
    /// Stop a RabbitMQ node this many shards after the kill.
    #[arg(long, default_value_t = 40)]
    stop_after: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let (mut redis, mut rabbit) = tokio::join!(RedisCluster::start(), RabbitCluster::start(3));
    println!(
        "Clusters up in {:.0} s: Redis masters {:?}, RabbitMQ nodes {:?}",
        started.elapsed().as_secs_f64(),
        redis.masters().await,
        rabbit.node_names()
    );
    std::fs::write(
        &args.env_file,
        format!(
            "export AE_REDIS_URL='{}'\nexport AE_AMQP_URL='{}'\nexport AE_QUORUM_INITIAL_GROUP_SIZE=3\n",
            redis.url(),
            rabbit.amqp_url()
        ),
    )
    .context("writing the env file")?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        outcome = break_nodes(&args, &mut redis, &mut rabbit) => outcome?,
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // After the faults, stay up until the demo is done with the clusters.
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    println!("Stopping the clusters.");
    drop(rabbit);
    drop(redis);
    Ok(())
}

async fn break_nodes(
    args: &Args,
    redis: &mut RedisCluster,
    rabbit: &mut RabbitCluster,
) -> anyhow::Result<()> {
    let store = ProgressStore::connect(&redis.url(), &args.namespace).await?;
    // The namespace's first export, once begun (the sweep's list of unfinished ones).
    let export_id = eventually(Duration::from_secs(600), || async {
        store.unfinished().await.ok()?.into_iter().next()
    })
    .await
    .context("no export began")?;
    let shards_done = |at_least: u64| {
        let (store, id) = (&store, &export_id);
        async move {
            eventually(Duration::from_secs(600), || async {
                let p = store.progress(id).await.ok()?;
                (p.shards_done >= at_least).then_some(p.shards_done)
            })
            .await
        }
    };
    let done = shards_done(args.kill_after)
        .await
        .context("the export did not get going")?;
    let key = format!("{}:export:{{{export_id}}}:progress", args.namespace);
    let victim = redis.master_of_key(&key).await;
    let killed = Instant::now();
    let promoted = redis.kill_master(victim).await;
    println!(
        "Fault: Redis master :{victim} (holding export {export_id}) killed after {done} shards; \
         replica :{promoted} promoted in {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    let done = shards_done(done + args.stop_after)
        .await
        .context("the export did not go on after the failover")?;
    let node = rabbit.busiest_node_but_first().await;
    rabbit.stop_node(node).await;
    println!(
        "Fault: RabbitMQ node {} stopped after {done} shards",
        rabbit.node_names()[node]
    );
    Ok(())
}
