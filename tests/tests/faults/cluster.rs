//! The fleet past one machine: a Redis Cluster of 3 masters and 3 replicas and a 3-node RabbitMQ
//! cluster of the test's own (never the shared servers), a master killed and a broker node
//! stopped under a running export; and every Lua script and transaction of the fleet run on the
//! cluster, where keys of two slots in one of them fail with CROSSSLOT.

use crate::{assert_exact, finished_events, DEADLINE};
use audience_export_core::amqp::{self, Topology};
use audience_export_core::connection::{
    AccountUnusable, AdAccountStatus, Connections, Invalidated, Marked, UnusableKind,
};
use audience_export_core::contract::ExportStatus;
use audience_export_core::graph::Usage;
use audience_export_core::pause::AccountPauses;
use audience_export_core::progress::{
    self, Begin, Cancelled, Claim, Failure, ProgressStore, Recorded, ShardCounts, Unreadable,
};
use audience_export_core::token_cipher::TokenCipher;
use audience_export_core::Field;
use audience_export_harness::app::{
    account, connect_workspace, eventually, export, spawn_app_on, ws, Roles,
};
use audience_export_harness::cluster::{RabbitCluster, RedisCluster};
use audience_export_harness::emulator::Latency;
use audience_export_harness::fault::set_appendonly;
use audience_export_harness::segment::generate;
use audience_export_worker::budget::{Controls, FleetBudget, Ticket};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const FIELDS: [Field; 3] = [Field::Email, Field::Phone, Field::Madid];
const NAMES: [&str; 3] = ["email", "phone", "madid"];
const MEMBERS: u64 = 200_000;
const SHARD_SIZE: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_on_clusters_survives_a_redis_master_killed_and_a_broker_node_stopped() {
    let (mut redis, mut rabbit) = tokio::join!(RedisCluster::start(), RabbitCluster::start(3));
    let (redis_url, amqp_url) = (redis.url(), rabbit.amqp_url());
    // The harness listens on the first node, which the test never stops.
    let harness_node = rabbit.node_urls()[0].clone();
    let app = spawn_app_on(Roles::ALL, Some(harness_node), move |s| {
        s.redis_url = redis_url;
        s.amqp_url = amqp_url;
        s.quorum_initial_group_size = Some(3);
        s.producer.shard_size = SHARD_SIZE;
        s.worker.concurrency = 4;
    })
    .await;
    let shards_queue = app.topology.shards();
    assert_eq!(
        rabbit.quorum_members(&shards_queue).await,
        3,
        "the shard queue has a replica on each node"
    );
    // The setting is what decides (3 is also the broker's default on 3 nodes): 2 gives 2.
    let mut two = app.settings.clone();
    two.namespace = format!("{}-two", app.namespace());
    two.quorum_initial_group_size = Some(2);
    let topology = Topology::from_settings(&two);
    let connection = amqp::connect(&rabbit.node_urls()[0], "test-two")
        .await
        .expect("node 1");
    let channel = connection.create_channel().await.expect("a channel");
    topology.declare(&channel).await.expect("declared");
    assert_eq!(rabbit.quorum_members(&topology.shards()).await, 2);
    topology.delete(&channel).await.expect("deleted");
    let _ = connection.close(200, "done".into()).await;
    // Slow uploads: the export is still running when the faults hit.
    app.emulator.set_latency(Latency {
        base_ms: 150,
        per_record_us: 0,
        jitter_ms: 30,
    });
    let path = app.dir.join("cluster.ndjson");
    let generated = generate(&path, MEMBERS, 161).expect("segment");
    let started = Instant::now();
    app.export("exp-cluster", &NAMES, &path).await;
    let done = |at_least: u64| {
        let app = &app;
        async move {
            eventually(DEADLINE, || async {
                let p = app.progress.progress(&export("exp-cluster")).await.ok()?;
                (p.shards_done >= at_least).then_some(p.shards_done)
            })
            .await
        }
    };
    let before_kill = done(30).await.expect("a first 30 shards upload");
    let total_shards = app.progress_of("exp-cluster").await.shards_planned;
    assert_eq!(finished_events(&app, "exp-cluster"), 0, "still running");

    // The master holding the export's keys dies; its replica takes over.
    let ns = app.namespace().to_owned();
    let victim = redis
        .master_of_key(&format!("{ns}:export:{{exp-cluster}}:progress"))
        .await;
    let killed = Instant::now();
    let promoted = redis.kill_master(victim).await;
    eprintln!(
        "Redis master :{victim} killed after {before_kill} of {total_shards} shards; replica \
         :{promoted} promoted {:.1} s later",
        killed.elapsed().as_secs_f64()
    );
    let after_kill = done(before_kill + 30)
        .await
        .expect("shards keep being recorded after the failover");
    eprintln!(
        "30 more shards recorded {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );

    // A broker node the fleet is connected to stops (gracefully: a node taken out for an
    // upgrade); the quorum queues keep a majority on the other two.
    let node = rabbit.busiest_node_but_first().await;
    assert_eq!(finished_events(&app, "exp-cluster"), 0, "still running");
    let stopped = Instant::now();
    rabbit.stop_node(node).await;
    eprintln!("RabbitMQ node {node} stopped after {after_kill} of {total_shards} shards");

    let report = app.finished("exp-cluster", DEADLINE * 2).await;
    eprintln!(
        "cluster export: {} members x 3 fields finished {:.1} s after its start, {:.1} s after \
         the node stopped",
        MEMBERS,
        started.elapsed().as_secs_f64(),
        stopped.elapsed().as_secs_f64()
    );
    assert_exact(
        &app,
        "exp-cluster",
        &report,
        &generated,
        &FIELDS,
        SHARD_SIZE,
    )
    .await;
    app.stop().await;
}

/// Every script of the fleet and every transaction of several keys, run on a Redis Cluster: a
/// script or a transaction whose keys span two slots fails there with CROSSSLOT (the client
/// refuses a pipeline across slots itself). The list below must name every script in the source
/// (checked), so a new script cannot skip this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_script_and_transaction_keeps_its_keys_in_one_slot() {
    let covered: BTreeSet<&str> = [
        "BEGIN",
        "RENEW",
        "SET_ONCE",
        "RECORD_SHARD",
        "CANCEL",
        "REJECT_UNREADABLE",
        "COMPLETE",
        "RELEASE",
        "INVALIDATE",
        "HSET_IF",
        "MARK_UNUSABLE",
        "CLEAR_UNUSABLE",
        "SELECT",
        "REFRESH_AVAILABLE",
        "EXTEND",
        "RESERVE",
        "OBSERVE",
    ]
    .into();
    assert_eq!(
        scripts_in_source(),
        covered,
        "every script of the source is run below (add a new one to both)"
    );

    let redis = RedisCluster::start().await;
    let ns = format!("slots{}", rand::random::<u32>());
    let store = ProgressStore::connect(&redis.url(), &ns)
        .await
        .expect("the cluster");
    assert!(store.connection().is_cluster());
    // The other spellings of a cluster: a node's plain URL, and a list of node URLs.
    for url in [redis.seed_urls()[0].clone(), redis.seed_urls().join(",")] {
        let conn = audience_export_core::redis_conn::connect(&url)
            .await
            .expect("the cluster");
        assert!(
            conn.is_cluster(),
            "{url} is used as the cluster it is part of"
        );
    }
    assert!(store.persists_writes().await.expect("INFO on every node"));
    // A replica without AOF fails the check: it would become a master that forgets.
    let masters = redis.masters().await;
    let replica = redis
        .seed_urls()
        .into_iter()
        .find(|u| !masters.iter().any(|m| u.contains(&format!(":{m}/"))))
        .expect("a replica");
    set_appendonly(&replica, false).await;
    assert!(
        !store.persists_writes().await.expect("INFO on every node"),
        "a replica with appendonly no is found"
    );
    set_appendonly(&replica, true).await;
    let ttl = Duration::from_secs(600);
    let now = progress::now_ms();

    // Export keys: BEGIN, RENEW, SET_ONCE, the plan transaction, RECORD_SHARD, the shard gate's
    // pipeline, a claim and RELEASE, COMPLETE.
    let id = export("exp-slots");
    let begun = store
        .begin(&id, "{}", now, ttl, "p1", Duration::from_secs(10))
        .await
        .expect("BEGIN");
    assert!(matches!(begun, Begin::New), "{begun:?}");
    assert!(store
        .renew_lease(&id, "p1", Duration::from_secs(10))
        .await
        .expect("RENEW"));
    store
        .intend_audience(&id, Field::Email, "name")
        .await
        .expect("SET_ONCE");
    store.plan_identity(&id, "fp", 2_000).await.expect("MULTI");
    store.release_lease(&id, "p1").await.expect("RELEASE");
    let recorded = store
        .record_shard(&id, "email:0", Field::Email, None, &ShardCounts::default())
        .await
        .expect("RECORD_SHARD");
    assert_eq!(recorded, Recorded::Now);
    store
        .record_shard(
            &id,
            "email:1",
            Field::Email,
            Some(&Failure::shard("x")),
            &ShardCounts::default(),
        )
        .await
        .expect("RECORD_SHARD with a failure");
    assert!(store.shard_gate(&id, "email:0").await.expect("gate").0);
    let claim = store
        .claim_finalization(&id, "f1", Duration::from_secs(10))
        .await
        .expect("claim");
    assert!(matches!(claim, Claim::Won));
    store
        .complete(&id, ExportStatus::Succeeded, "", now, ttl)
        .await
        .expect("COMPLETE");

    // Cancelling and the unreadable-job tombstone: CANCEL, REJECT_UNREADABLE.
    let other = export("exp-slots-2");
    store
        .begin(&other, "{}", now, ttl, "p1", Duration::from_secs(10))
        .await
        .expect("BEGIN");
    let cancelled = store
        .cancel(&other, "stop", now, ttl)
        .await
        .expect("CANCEL");
    assert_eq!(cancelled, Cancelled::Cancelled);
    let unreadable = store
        .reject_unreadable(&export("exp-slots-3"), "digest", ttl)
        .await
        .expect("REJECT_UNREADABLE");
    assert_eq!(unreadable, Unreadable::New);

    // A workspace's connection: the store transaction (connection, revocation and health-check
    // keys), SELECT, MARK_UNUSABLE, CLEAR_UNUSABLE, REFRESH_AVAILABLE, HSET_IF, INVALIDATE and
    // the disconnect transaction.
    let cipher = TokenCipher::from_config(Some(&TokenCipher::generate_config("k"))).expect("key");
    let connections = Connections::new(store.connection(), &ns, cipher);
    connect_workspace(&connections, "ws-slots", "EAAslots", "1001").await;
    let (w, a) = (ws("ws-slots"), account("1001"));
    let fingerprint = connections
        .active_token(&w)
        .await
        .expect("read")
        .expect("a token")
        .fingerprint
        .clone();
    // After the selection's check (a loss found before it is stale).
    let later = progress::now_ms() + 1_000;
    let marked = connections
        .mark_unusable(
            &w,
            &a,
            &AccountUnusable {
                kind: UnusableKind::NotListed,
                reason: "gone".into(),
                code: None,
                subcode: None,
                at_ms: later,
                token_fingerprint: fingerprint.clone(),
            },
        )
        .await
        .expect("MARK_UNUSABLE");
    assert!(matches!(marked, Marked::Now(_)), "{marked:?}");
    assert!(connections
        .clear_unusable(&w, &a, later)
        .await
        .expect("CLEAR_UNUSABLE"));
    assert!(connections
        .refresh_available(&w, &fingerprint, std::slice::from_ref(&a))
        .await
        .expect("REFRESH_AVAILABLE"));
    assert!(connections
        .update_terms(&w, AdAccountStatus::new(&a, true, now))
        .await
        .expect("HSET_IF"));
    let invalidated = connections
        .invalidate(&w, &fingerprint, "expired", 190, None, now)
        .await
        .expect("INVALIDATE");
    assert_eq!(invalidated, Invalidated::Now);
    assert!(connections.disconnect(&w).await.expect("disconnect"));

    // An ad account's pause and pace: EXTEND, RESERVE, OBSERVE (the pace's four keys).
    let pauses = AccountPauses::new(store.connection(), &ns);
    assert!(pauses
        .pause(&a, Duration::from_secs(1))
        .await
        .expect("EXTEND"));
    // With a window, so that the fleet's calls (two more keys) are recorded and read too.
    let controls = Controls {
        window: Some(Duration::from_secs(10)),
        ..Controls::fixed(10)
    };
    let budget = FleetBudget::new(store.connection(), &ns, controls);
    budget
        .observe(&a, Ticket(1), None, true)
        .await
        .expect("OBSERVE");
    budget.reserve(&a).await.expect("RESERVE");
    budget.reserve(&a).await.expect("RESERVE");
    budget
        .observe(
            &a,
            Ticket(2),
            Some(&Usage {
                percent: 50,
                ..Usage::default()
            }),
            true,
        )
        .await
        .expect("OBSERVE");
}

/// The names of the script constants handed to `redis::Script::new` anywhere in the fleet's
/// crates.
fn scripts_in_source() -> BTreeSet<&'static str> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    let mut found = BTreeSet::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable source").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("readable source");
                for part in text.split("Script::new(").skip(1) {
                    let name: String = part
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                        .collect();
                    let name = name.rsplit("::").next().unwrap_or_default().to_owned();
                    found.insert(&*Box::leak(name.into_boxed_str()));
                }
            }
        }
    }
    found
}
