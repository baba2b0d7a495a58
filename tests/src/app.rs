//! `spawn_app`: the whole fleet in-process (the real producer, worker and finalizer loops) on
//! the real RabbitMQ and Redis, under a fresh namespace so tests run side by side, with the Graph
//! emulator and the SMTP sink on free ports, and a listener on the fleet's events.

use crate::emulator::{AdAccountSeed, Config, Emulator, Seed, TokenSeed};
use crate::smtp::SmtpSink;
use audience_export_core::amqp::{self, Publisher, Topology};
use audience_export_core::config::Settings;
use audience_export_core::connection::{AdAccountStatus, Connections, NewToken};
use audience_export_core::contract::{AdAccountId, Event, ExportId, FinishedReport, WorkspaceId};
use audience_export_core::progress::now_ms;
use audience_export_core::progress::{ExportProgress, ProgressStore};
use audience_export_core::token_cipher::TokenCipher;
use audience_export_core::Running;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub const AD_ACCOUNT: &str = "1001";
/// The workspace of `TestApp::job`, connected with `TestApp::token` before the roles start.
pub const WORKSPACE: &str = "ws-1";
/// Who connected `WORKSPACE`: told when its connection breaks or expires.
pub const CONNECTED_BY: &str = "admin@example.com";
/// The Meta app's secret, known to the emulator and the fleet (`appsecret_proof`, OAuth).
pub const APP_SECRET: &str = "test-app-secret";

/// Which roles a test runs.
#[derive(Clone, Copy)]
pub struct Roles {
    pub producer: bool,
    pub worker: bool,
    pub finalizer: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        producer: true,
        worker: true,
        finalizer: true,
    };
    /// Only the stores, the emulator and the SMTP sink: for tests that drive one part by hand.
    pub const NONE: Roles = Roles {
        producer: false,
        worker: false,
        finalizer: false,
    };
    /// The producer alone, with its HTTP API.
    pub const PRODUCER: Roles = Roles {
        producer: true,
        worker: false,
        finalizer: false,
    };
}

pub struct TestApp {
    pub settings: Settings,
    /// `WORKSPACE`'s user token.
    pub token: String,
    pub connections: Connections,
    /// The producer's HTTP API, when a producer runs.
    pub api: Option<std::net::SocketAddr>,
    pub emulator: Emulator,
    pub smtp: SmtpSink,
    pub progress: ProgressStore,
    pub topology: Topology,
    pub publisher: Publisher,
    pub dir: PathBuf,
    pub ops: Vec<std::net::SocketAddr>,
    events: Arc<(Mutex<Vec<Event>>, Notify)>,
    connection: lapin::Connection,
    shutdown: CancellationToken,
    roles: Vec<Running>,
    /// `stop` deleted the namespace already.
    cleaned: bool,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Roles::ALL, |_| {}).await
}

/// Spawns the roles asked for, after `tune` adjusts the settings.
pub async fn spawn_app_with(roles: Roles, tune: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on(roles, None, tune).await
}

/// `spawn_app_with`, the harness itself on `harness_amqp` (default: the shared broker) for its
/// events, jobs and queue depths: a node the test never stops when the fleet runs on a cluster.
pub async fn spawn_app_on(
    roles: Roles,
    harness_amqp: Option<String>,
    tune: impl FnOnce(&mut Settings),
) -> TestApp {
    // Logs go to stderr at warn (RUST_LOG overrides) and, at debug, to `logs::captured`.
    crate::logs::init();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let namespace = format!("t{}", &id[..12]);
    let token = format!("EAAtest{}", &id[..16]);
    let emulator = Emulator::start(
        ([127, 0, 0, 1], 0).into(),
        Config {
            app_secret: Some(APP_SECRET.into()),
            ..Config::default()
        },
        Seed {
            tokens: vec![TokenSeed::user(&token, &[AD_ACCOUNT])],
            ad_accounts: vec![AdAccountSeed::new(AD_ACCOUNT)],
        },
    )
    .await
    .expect("binding a loopback port");
    let smtp = SmtpSink::on_free_port().await;
    let dir = std::env::temp_dir().join(format!("ae-{namespace}"));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");

    let mut settings = Settings::for_namespace(&namespace);
    settings.graph.base_url = emulator.base_url();
    settings.graph.app_secret = Some(SecretString::from(APP_SECRET));
    settings.graph.timeout_ms = 10_000;
    settings.connections.encryption_keys = Some(TokenCipher::generate_config("test"));
    settings.api.addr = ([127, 0, 0, 1], 0).into();
    settings.api.key = Some(SecretString::from(format!("key-{}", &id[16..])));
    settings.oauth.dialog_base_url = emulator.base_url();
    settings.oauth.redirect_uri = "https://app.example.com/integrations/facebook/return".into();
    settings.worker.retry_delays_ms = vec![100, 200, 400];
    settings.finalizer.smtp_port = smtp.addr.port();
    settings.finalizer.retention_secs = 3600;
    // The tests' segments are written in `dir`: the only place `file://` sources may be read
    // from (child processes get it too, as AE_PRODUCER__FILE_ROOT, through `settings_env`).
    settings.producer.file_root = Some(dir.clone());
    for addr in [
        &mut settings.producer.ops_addr,
        &mut settings.worker.ops_addr,
        &mut settings.finalizer.ops_addr,
    ] {
        *addr = ([127, 0, 0, 1], 0).into();
    }
    // The harness itself talks to the broker directly, even when the fleet goes through a
    // proxy the test cuts: it must keep hearing the fleet's events.
    let harness_amqp = harness_amqp.unwrap_or_else(|| settings.amqp_url.clone());
    tune(&mut settings);

    let topology = Topology::from_settings(&settings);
    let connection = amqp::connect(&harness_amqp, "test-harness")
        .await
        .expect("RabbitMQ at 127.0.0.1:5672");
    let publisher = Publisher::new(&connection).await.expect("a channel");
    topology
        .declare(publisher.channel())
        .await
        .expect("declaring the topology");
    let progress = ProgressStore::connect(&settings.redis_url, &namespace)
        .await
        .expect("Redis at 127.0.0.1:6379");
    let events = listen(&connection, &topology).await;
    let cipher = TokenCipher::from_config(settings.connections.encryption_keys.as_ref())
        .expect("the generated key");
    let connections = Connections::new(progress.connection(), &namespace, cipher);
    connect_workspace(&connections, WORKSPACE, &token, AD_ACCOUNT).await;

    let shutdown = CancellationToken::new();
    let mut running = Vec::new();
    if roles.producer {
        running.push(
            audience_export_producer::start(settings.clone(), shutdown.clone())
                .await
                .expect("producer starts"),
        );
    }
    if roles.worker {
        running.push(
            audience_export_worker::start(settings.clone(), shutdown.clone())
                .await
                .expect("worker starts"),
        );
    }
    if roles.finalizer {
        running.push(
            audience_export_finalizer::start(settings.clone(), shutdown.clone())
                .await
                .expect("finalizer starts"),
        );
    }
    TestApp {
        ops: running.iter().map(|r| r.ops_addr).collect(),
        api: running.iter().find_map(|r| r.api_addr),
        settings,
        token,
        connections,
        emulator,
        smtp,
        progress,
        topology,
        publisher,
        dir,
        events,
        connection,
        shutdown,
        roles: running,
        cleaned: false,
    }
}

/// Connects `workspace` with a user token for `ad_account` (terms accepted), as the OAuth
/// callback would, without the dialog: most tests and benchmarks are about exports, not
/// connecting.
pub async fn connect_workspace(
    connections: &Connections,
    workspace: &str,
    token: &str,
    ad_account: &str,
) {
    let (workspace, ad_account) = (ws(workspace), account(ad_account));
    let new = NewToken {
        token: SecretString::from(token.to_owned()),
        expires_at: now_ms() / 1000 + 60 * 24 * 3600,
        scopes: vec!["ads_management".into()],
        ad_accounts: vec![ad_account.clone()],
    };
    connections
        .store_user_token(&workspace, &new, Some(CONNECTED_BY), now_ms())
        .await
        .expect("storing the test connection");
    connections
        .select_ad_accounts(
            &workspace,
            &[AdAccountStatus::new(&ad_account, true, now_ms())],
        )
        .await
        .expect("selecting the test ad account");
}

/// A workspace id the test knows is valid.
pub fn ws(id: &str) -> WorkspaceId {
    WorkspaceId::parse(id).expect("a valid workspace id in a test")
}

/// An export id the test knows is valid.
pub fn export(id: &str) -> ExportId {
    ExportId::parse(id).expect("a valid export id in a test")
}

/// An ad account id the test knows is valid.
pub fn account(id: &str) -> AdAccountId {
    AdAccountId::parse(id).expect("a valid ad account id in a test")
}

/// Every (serializable, so non-secret) setting as the `AE_*` variable that sets it: nested
/// sections joined by `__`, lists as JSON (figment reads them back).
fn settings_env(settings: &Settings) -> Vec<(String, String)> {
    fn walk(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let name = if prefix.is_empty() {
                        k.to_ascii_uppercase()
                    } else {
                        format!("{prefix}__{}", k.to_ascii_uppercase())
                    };
                    walk(&name, v, out);
                }
            }
            Value::Null => {}
            Value::String(s) => out.push((format!("AE_{prefix}"), s.clone())),
            other => out.push((format!("AE_{prefix}"), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk(
        "",
        &serde_json::to_value(settings).expect("settings serialize"),
        &mut out,
    );
    out
}

/// A secret setting's value for a child process's environment ("" when unset).
fn secret(value: &Option<SecretString>) -> &str {
    value
        .as_ref()
        .map(|s| s.expose_secret())
        .unwrap_or_default()
}

/// Binds an exclusive queue to every event and collects them.
async fn listen(
    connection: &lapin::Connection,
    topology: &Topology,
) -> Arc<(Mutex<Vec<Event>>, Notify)> {
    let (channel, mut consumer) = amqp::subscribe(connection, topology, "#")
        .await
        .expect("subscribing to the fleet's events");
    let events: Arc<(Mutex<Vec<Event>>, Notify)> = Arc::default();
    let sink = events.clone();
    tokio::spawn(async move {
        let _keep = channel;
        while let Some(Ok(delivery)) = consumer.next().await {
            if let Ok(event) = serde_json::from_slice::<Event>(&delivery.data) {
                sink.0.lock().expect("events lock").push(event);
                sink.1.notify_waiters();
            }
        }
    });
    events
}

impl TestApp {
    pub fn namespace(&self) -> &str {
        &self.settings.namespace
    }

    /// A job for the test's ad account, reading `segment`.
    pub fn job(&self, export_id: &str, fields: &[&str], segment: &std::path::Path) -> Value {
        serde_json::json!({
            "export_id": export_id,
            "workspace_id": WORKSPACE,
            "segment": {"id": "seg-1", "name": "Spring buyers"},
            "ad_account_id": format!("act_{AD_ACCOUNT}"),
            "fields": fields,
            "source": {"url": format!("file://{}", segment.display()), "format": "ndjson"},
            "notify": {"emails": ["marketer@example.com"]},
            "default_phone_country": "US",
            "requested_by": "marketer@example.com"
        })
    }

    /// Enqueues `job(export_id, fields, segment)`: the usual export of a test.
    pub async fn export(&self, export_id: &str, fields: &[&str], segment: &std::path::Path) {
        let job = self.job(export_id, fields, segment);
        self.enqueue(job.to_string().as_bytes()).await;
    }

    pub async fn enqueue(&self, body: &[u8]) {
        self.publisher
            .publish("", &self.topology.jobs(), body, FieldTable::default())
            .await
            .expect("publishing a job");
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.0.lock().expect("events lock").clone()
    }

    /// Waits for an event matching `pred`.
    pub async fn wait_event(
        &self,
        deadline: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Option<Event> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = self.events.1.notified();
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return Some(e);
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Waits until every work and delay queue of the namespace has stayed empty for `quiet`
    /// (dead-letter queues hold what they hold for good). With `quiet` longer than the
    /// finalizer's 5 s retry delay, a second finish would have happened by then: how "exactly
    /// one email" is checked. False if the queues never settle within two minutes. Polls every
    /// 250 ms: an interval, not a synchronisation (the condition is what is waited for).
    pub async fn settled(&self, quiet: Duration) -> bool {
        let queues: Vec<String> = self
            .topology
            .queues()
            .into_iter()
            .filter(|q| !q.ends_with(".dead"))
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut empty_since: Option<std::time::Instant> = None;
        while std::time::Instant::now() < deadline {
            let mut total = 0;
            for q in &queues {
                total += self.depth(q).await;
            }
            if total > 0 {
                empty_since = None;
            } else if empty_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                >= quiet
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    }

    /// The export's progress hash, decoded.
    pub async fn progress_of(&self, export_id: &str) -> ExportProgress {
        self.progress
            .progress(&export(export_id))
            .await
            .expect("reading progress")
    }

    /// Waits for the export's `export.finished` event and returns its report.
    pub async fn finished(&self, export_id: &str, deadline: Duration) -> FinishedReport {
        let event = self
            .wait_event(
                deadline,
                |e| matches!(e, Event::ExportFinished(r) if r.export_id == export_id),
            )
            .await
            .unwrap_or_else(|| {
                panic!(
                    "export {export_id} did not finish within {deadline:?}; events: {:?}",
                    self.events()
                )
            });
        match event {
            Event::ExportFinished(report) => report,
            _ => unreachable!("matched above"),
        }
    }

    /// Starts a worker as a real process (the binary built from the worker's main.rs), configured
    /// through `AE_*` variables from this app's settings: what a deployment does.
    pub fn spawn_worker_process(&self, binary: &str) -> tokio::process::Child {
        self.spawn_process(binary, &[])
    }

    /// Starts the producer as a real process, like `spawn_worker_process`.
    pub fn spawn_producer_process(&self, binary: &str) -> tokio::process::Child {
        self.spawn_process(binary, &[])
    }

    /// Starts a role's binary with every setting of this app as an `AE_*` variable (secrets
    /// included), then `extra` (e.g. `FAILPOINTS`, a fixed ops address).
    pub fn spawn_process(&self, binary: &str, extra: &[(&str, String)]) -> tokio::process::Child {
        let mut command = self.command(binary);
        for (key, value) in extra {
            command.env(key, value);
        }
        command
            .spawn()
            .unwrap_or_else(|e| panic!("{binary} starts: {e}"))
    }

    /// A role's binary configured like this app (every setting as an `AE_*` variable, secrets
    /// included), not started: for operators' commands run the way an operator runs them.
    pub fn command(&self, binary: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(binary);
        command
            .envs(settings_env(&self.settings))
            .kill_on_drop(true);
        command
            .env("AE_API__KEY", secret(&self.settings.api.key))
            .env(
                "AE_GRAPH__APP_SECRET",
                secret(&self.settings.graph.app_secret),
            )
            .env(
                "AE_CONNECTIONS__ENCRYPTION_KEYS",
                secret(&self.settings.connections.encryption_keys),
            )
            .env("AE_LOG", "warn");
        command
    }

    /// Calls the producer's HTTP API with this app's key; returns the status and JSON body.
    pub async fn api_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let key = self
            .settings
            .api
            .key
            .as_ref()
            .map(|k| k.expose_secret().to_owned());
        self.api_call_with_key(method, path, body, key.as_deref())
            .await
    }

    /// `api_call` with a key of the caller's choice (or none).
    pub async fn api_call_with_key(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let api = self.api.expect("a producer with its API runs");
        let mut request = reqwest::Client::new().request(method, format!("http://{api}{path}"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Every key of this app's namespace with its value(s), as text: for checks that no token
    /// or identifier is stored in clear.
    pub async fn redis_dump(&self) -> String {
        let client = redis::Client::open(self.settings.redis_url.as_str()).expect("redis url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.namespace()))
            .query_async(&mut c)
            .await
            .expect("KEYS");
        let mut out = String::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut c)
                .await
                .expect("TYPE");
            let value: String = match kind.as_str() {
                "string" => redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default(),
                "hash" => {
                    let h: Vec<String> = redis::cmd("HGETALL")
                        .arg(&key)
                        .query_async(&mut c)
                        .await
                        .unwrap_or_default();
                    h.join(" ")
                }
                "set" => {
                    let m: Vec<String> = redis::cmd("SMEMBERS")
                        .arg(&key)
                        .query_async(&mut c)
                        .await
                        .unwrap_or_default();
                    m.join(" ")
                }
                other => format!("<{other}>"),
            };
            out.push_str(&format!("{key} {value}\n"));
        }
        out
    }

    /// Takes one message from a queue (for dead-letter assertions), acking it.
    pub async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        let channel = self.publisher.channel();
        let message = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")?;
        message
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        Some(message)
    }

    /// Messages waiting in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.expect("a channel");
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the queue exists");
        let _ = channel.close(200, "done".into()).await;
        q.message_count()
    }

    /// Stops every role and waits for their drain; dropping the app then cleans up.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for role in std::mem::take(&mut self.roles) {
            role.task
                .await
                .expect("role task joins")
                .expect("role ends cleanly");
        }
        delete_namespace(&self.settings, &self.topology, self.publisher.channel()).await;
        self.cleaned = true;
        // Closed while the runtime still runs, so lapin's I/O loop ends quietly.
        let _ = self.connection.close(200, "done".into()).await;
    }
}

impl Drop for TestApp {
    /// Deletes the namespace's queues, Redis keys and files, also when a test panicked: quorum
    /// queues left behind would pile up on the shared broker run after run. `stop` cleans up on
    /// the test's own runtime; this is the fallback for a test that never reached it.
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.emulator.stop();
        self.smtp.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.cleaned {
            return;
        }
        let (settings, topology) = (self.settings.clone(), self.topology.clone());
        // A thread with its own runtime: Drop cannot await, and may run inside the test's runtime.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let connection = amqp::connect(&settings.amqp_url, "test-cleanup")
                    .await
                    .ok()?;
                let channel = connection.create_channel().await.ok()?;
                delete_namespace(&settings, &topology, &channel).await;
                connection.close(200, "cleaned".into()).await.ok()
            })
        });
        let _ = cleanup.join();
    }
}

/// Deletes a namespace's queues, exchange and Redis keys (some, like workspace settings, have no
/// TTL). Best effort: a failure leaves litter, not a broken test.
async fn delete_namespace(settings: &Settings, topology: &Topology, channel: &lapin::Channel) {
    let _ = topology.delete(channel).await;
    let Ok(client) = redis::Client::open(settings.redis_url.as_str()) else {
        return;
    };
    let Ok(mut redis) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let pattern = format!("{}:*", settings.namespace);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _ = redis::cmd("DEL")
            .arg(&keys)
            .query_async::<i64>(&mut redis)
            .await;
    }
}

/// Polls `check` until it yields Some or the deadline passes: a wait on a condition, never a
/// fixed sleep.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
