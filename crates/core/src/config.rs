//! Typed configuration for the whole fleet, loaded once at start-up from defaults that run the
//! demo on this machine, overridden by environment variables prefixed `AE_` (nested sections are
//! separated by `__`: `AE_WORKER__CONCURRENCY=8`). One struct for every role keeps a single
//! prefix valid everywhere; each binary reads only its sections. Unknown keys are errors, so a
//! misspelt variable fails loudly instead of being ignored.

use figment::providers::{Env, Serialized};
use figment::Figment;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The environment prefix of every setting.
pub const ENV_PREFIX: &str = "AE_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Prefix of every queue, exchange and Redis key, so several fleets (or tests) share a broker.
    #[serde(deserialize_with = "text")]
    pub namespace: String,
    /// AMQP URI of the RabbitMQ broker, or of each node of a RabbitMQ cluster separated by
    /// commas (`amqp://u:p@n1:5672/%2f,amqp://u:p@n2:5672/%2f`): each connection goes to the
    /// next node in turn, and one that is lost reconnects to the next.
    pub amqp_url: String,
    /// Replicas of each quorum queue when it is created (`x-quorum-initial-group-size`). Unset:
    /// the broker's default (one per node up to 3 on RabbitMQ 3.10). Part of the queue's
    /// arguments: a queue declared with another value refuses the declaration (406), so it is
    /// set before the first start and not changed under existing queues.
    pub quorum_initial_group_size: Option<u32>,
    /// Redis URL for progress and fleet-wide coordination: `redis://host:port/db` for one
    /// server, `redis+cluster://[user:password@]host:port[,host:port...]` for a Redis Cluster
    /// (the nodes listed are seeds; the others are discovered).
    pub redis_url: String,
    /// Start even though Redis does not persist writes (no AOF): a restart of it would lose
    /// every running export's progress and every workspace's connection. For throwaway setups
    /// only; managed services that persist another way (replicas with failover) may need it.
    pub allow_volatile_redis: bool,
    /// `tracing` filter directive, e.g. `info` or `audience_export_worker=debug`.
    pub log: String,
    pub graph: GraphSettings,
    pub producer: ProducerSettings,
    pub worker: WorkerSettings,
    pub finalizer: FinalizerSettings,
    pub connections: ConnectionSettings,
    pub api: ApiSettings,
    pub oauth: OAuthSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphSettings {
    /// Graph API base URL, without version. Meta's is `https://graph.facebook.com`.
    pub base_url: String,
    /// Graph API version, e.g. `v27.0`. Marketing API versions live about a year.
    pub version: String,
    /// The app secret: `appsecret_proof` on every call when set, and the OAuth client secret.
    /// Never logged: `SecretString` redacts it in `Debug`.
    #[serde(skip_serializing)]
    pub app_secret: Option<SecretString>,
    /// Whole-request timeout, in milliseconds.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerSettings {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub ops_addr: SocketAddr,
    /// Records per shard; Meta accepts at most 10,000 per request.
    pub shard_size: usize,
    /// Shards published and awaiting the broker's confirm at once.
    pub confirm_window: usize,
    /// `customer_file_source` sent when creating audiences.
    pub customer_file_source: String,
    /// The only directory `file://` sources may be read from (canonicalized; a path outside it,
    /// through `..` or a symlink, is refused). Unset: every `file://` source is refused.
    pub file_root: Option<PathBuf>,
    /// Where `source.headers_secret` names are looked up: a directory of files (a mounted
    /// Kubernetes Secret) holding `Header-Name: value` lines for HTTP(S) sources. Unset: a job
    /// naming a headers secret is refused.
    pub source_secrets_dir: Option<PathBuf>,
    /// How long an HTTP(S) or S3 source may take to connect, to answer, and between two reads of
    /// its body, in milliseconds (a long transfer that keeps moving is never cut).
    pub source_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    pub ops_addr: SocketAddr,
    /// Uploads in flight per worker process; the prefetch equals it.
    pub concurrency: u16,
    /// Attempts per shard before it is recorded as failed.
    pub max_attempts: u32,
    /// Delays of the retry queues, in milliseconds; attempt n waits the n-th (the last repeats).
    pub retry_delays_ms: Vec<u64>,
    /// Graph calls per second per ad account the whole fleet starts at (evenly spaced); from
    /// there the rate moves with Meta's usage headers (`worker::budget`).
    pub calls_per_second_per_account: u32,
    /// The most calls per second per ad account the fleet sends, however low Meta's usage.
    pub max_calls_per_second_per_account: u32,
    /// The usage (percent of the account's budget, from Meta's usage headers) the fleet paces
    /// toward: it slows down through the band below it and sends about as fast as the window
    /// frees at it.
    pub usage_target_pct: u64,
    /// The width of that band, in percent: wider is safer against bursts, narrower uses more
    /// of the budget.
    pub usage_band_pct: u64,
    /// The length of Meta's rate-limit window, in seconds: an hour, as Meta documents it for
    /// the custom-audience budget. Knowing it, the fleet reads its own recent calls against the
    /// usage: the pace the budget sustains (calls of the last window × 100 / usage, per second),
    /// when its calls leave the window (room for more), and when a full window has room again.
    /// Tests and benches shorten it together with the emulator's; a window set longer than
    /// Meta's makes the fleet slower than the budget allows, never faster; shorter, it counts
    /// calls as gone before Meta does. 0: unknown, the pace is read from the usage alone.
    pub usage_window_secs: u64,
    /// The first pause after a throttling answer, in milliseconds (at least Meta's
    /// `reset_time_duration`); it doubles while Meta keeps throttling.
    pub throttle_probe_ms: u64,
    /// The longest pause after a throttling answer, in milliseconds (Meta's regain estimate,
    /// when given, caps it).
    pub throttle_pause_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinalizerSettings {
    pub ops_addr: SocketAddr,
    pub smtp_host: String,
    pub smtp_port: u16,
    /// `From:` of notification emails.
    pub mail_from: String,
    /// How long an export's Redis keys are kept after it finishes, in seconds.
    pub retention_secs: u64,
    /// An export not finished this long after it began is finished by the sweep (failed or
    /// partially failed, naming the shards that never arrived), whatever it waits for
    /// (throttling deferrals included), in seconds.
    pub export_deadline_secs: u64,
    /// An export with no progress (no shard recorded, no planning checkpoint) for this long is
    /// finished by the sweep, in seconds.
    pub stall_after_secs: u64,
    /// How often the finalizer sweeps for stalled exports and reads the dead-letter queues'
    /// depths, in seconds.
    pub sweep_interval_secs: u64,
    /// How long a finalizer may hold an export's (or a notice's) claim before another takes
    /// over, in seconds. The SMTP timeout is held under half of it, so a slow finish is never
    /// taken over and done twice.
    pub claim_lease_secs: u64,
    /// The SMTP server's answer may take this long, in seconds (at most half the claim lease).
    pub smtp_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionSettings {
    /// Keys sealing tokens at rest (AES-256-GCM): `<id>:<base64 of 32 bytes>`, comma-separated;
    /// the first seals, all open (rotation). Required by the producer and the workers; the
    /// finalizer never handles a token and does not need it.
    #[serde(skip_serializing)]
    pub encryption_keys: Option<SecretString>,
    /// A user token expiring within this many days gets one warning email.
    pub expiry_warning_days: u64,
    /// How often the producers check every connection with Meta (`debug_token`, and each
    /// selected ad account still in `/me/adaccounts` and not disabled), in seconds; one producer
    /// of the fleet runs each round. Each export is checked before it starts too (at most once a
    /// minute per workspace).
    pub health_check_interval_secs: u64,
    /// How often the finalizer looks for expiring tokens, in seconds.
    pub expiry_check_interval_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Where the producer serves its HTTP API (connections).
    pub addr: SocketAddr,
    /// The key every request must carry (`Authorization: Bearer <key>`).
    #[serde(skip_serializing)]
    pub key: Option<SecretString>,
    /// Serve without a key. For a demo on a laptop only; never in a deployment.
    pub insecure_dev_mode: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthSettings {
    /// The Meta app's id (`client_id`); its secret is `graph.app_secret`.
    #[serde(deserialize_with = "text")]
    pub app_id: String,
    /// Where Meta sends the browser back with `code` and `state`: the upstream platform's page,
    /// which passes both to `POST /v1/oauth/callback`. Registered in the Meta app.
    pub redirect_uri: String,
    /// Base of the OAuth dialog: Meta's is `https://www.facebook.com`.
    pub dialog_base_url: String,
    /// How long a connect attempt's `state` is accepted, in seconds.
    pub state_ttl_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            namespace: "ae".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            quorum_initial_group_size: None,
            redis_url: "redis://127.0.0.1:6379/".into(),
            allow_volatile_redis: false,
            log: "info".into(),
            graph: GraphSettings::default(),
            producer: ProducerSettings::default(),
            worker: WorkerSettings::default(),
            finalizer: FinalizerSettings::default(),
            connections: ConnectionSettings::default(),
            api: ApiSettings::default(),
            oauth: OAuthSettings::default(),
        }
    }
}

impl Default for GraphSettings {
    fn default() -> Self {
        GraphSettings {
            base_url: "http://127.0.0.1:8470".into(),
            version: "v27.0".into(),
            app_secret: None,
            timeout_ms: 30_000,
        }
    }
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            ops_addr: ([127, 0, 0, 1], 9461).into(),
            shard_size: 10_000,
            confirm_window: 64,
            customer_file_source: "USER_PROVIDED_ONLY".into(),
            file_root: None,
            source_secrets_dir: None,
            source_timeout_ms: 30_000,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            ops_addr: ([127, 0, 0, 1], 9462).into(),
            concurrency: 8,
            max_attempts: 5,
            retry_delays_ms: vec![1_000, 5_000, 30_000, 120_000],
            calls_per_second_per_account: 50,
            max_calls_per_second_per_account: 200,
            usage_target_pct: 96,
            usage_band_pct: 16,
            usage_window_secs: 3_600,
            throttle_probe_ms: 500,
            throttle_pause_ms: 60_000,
        }
    }
}

impl Default for FinalizerSettings {
    fn default() -> Self {
        FinalizerSettings {
            ops_addr: ([127, 0, 0, 1], 9463).into(),
            smtp_host: "127.0.0.1".into(),
            smtp_port: 2525,
            mail_from: "Audience export <audience-export@localhost>".into(),
            retention_secs: 14 * 24 * 3600,
            export_deadline_secs: 24 * 3600,
            stall_after_secs: 30 * 60,
            sweep_interval_secs: 60,
            claim_lease_secs: 120,
            smtp_timeout_secs: 30,
        }
    }
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            encryption_keys: None,
            expiry_warning_days: 7,
            health_check_interval_secs: 3600,
            expiry_check_interval_secs: 3600,
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            addr: ([127, 0, 0, 1], 8480).into(),
            key: None,
            insecure_dev_mode: false,
        }
    }
}

impl Default for OAuthSettings {
    fn default() -> Self {
        OAuthSettings {
            app_id: "1000000000000001".into(),
            redirect_uri: "http://127.0.0.1:8480/facebook/oauth/return".into(),
            dialog_base_url: "http://127.0.0.1:8470".into(),
            state_ttl_secs: 600,
        }
    }
}

/// A text setting that may look like a number in the environment (a Meta app id is digits):
/// figment reads `AE_OAUTH__APP_ID=1234567890` as a number, which is still meant as text.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Words(String),
        Unsigned(u64),
        Signed(i64),
    }
    Ok(match Text::deserialize(d)? {
        Text::Words(s) => s,
        Text::Unsigned(n) => n.to_string(),
        Text::Signed(n) => n.to_string(),
    })
}

impl Settings {
    /// Defaults overridden by `AE_*` environment variables.
    pub fn load() -> Result<Settings, Box<figment::Error>> {
        Figment::from(Serialized::defaults(Settings::default()))
            .merge(Env::prefixed(ENV_PREFIX).split("__"))
            .extract()
            .map_err(Box::new)
    }

    /// Settings with a fresh namespace, for tests that share one broker and one Redis.
    pub fn for_namespace(namespace: impl Into<String>) -> Settings {
        Settings {
            namespace: namespace.into(),
            ..Settings::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail dictates the closure's error type.
    fn env_overrides_defaults_and_unknown_keys_fail() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AE_NAMESPACE", "blue");
            jail.set_env("AE_WORKER__CONCURRENCY", "3");
            jail.set_env("AE_API__KEY", "tok");
            let s = Settings::load().expect("loads");
            assert_eq!(s.namespace, "blue");
            assert_eq!(s.worker.concurrency, 3);
            assert_eq!(s.worker.max_attempts, 5);
            assert_eq!(s.api.key.as_ref().map(|t| t.expose_secret()), Some("tok"));
            assert!(
                !format!("{s:?}").contains("tok\""),
                "token must be redacted in Debug"
            );
            jail.set_env("AE_OAUTH__APP_ID", "1234567890123456");
            jail.set_env("AE_NAMESPACE", "2026");
            let s = Settings::load().expect("digits are text where text is meant");
            assert_eq!(s.oauth.app_id, "1234567890123456");
            assert_eq!(s.namespace, "2026");
            jail.set_env("AE_PRODUCER__FILE_ROOT", "/exports");
            let s = Settings::load().expect("a path");
            assert_eq!(s.producer.file_root, Some(PathBuf::from("/exports")));
            assert_eq!(s.producer.source_secrets_dir, None, "unset by default");
            jail.set_env("AE_WORKER__CONCURENCY", "3");
            assert!(Settings::load().is_err(), "a misspelt key must fail");
            Ok(())
        });
    }
}
