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

/// The environment prefix of every setting.
pub const ENV_PREFIX: &str = "AE_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Prefix of every queue, exchange and Redis key, so several fleets (or tests) share a broker.
    pub namespace: String,
    /// AMQP URI of the RabbitMQ broker.
    pub amqp_url: String,
    /// Redis URL for progress and fleet-wide coordination.
    pub redis_url: String,
    /// `tracing` filter directive, e.g. `info` or `audience_export_worker=debug`.
    pub log: String,
    pub graph: GraphSettings,
    pub producer: ProducerSettings,
    pub worker: WorkerSettings,
    pub finalizer: FinalizerSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphSettings {
    /// Graph API base URL, without version. Meta's is `https://graph.facebook.com`.
    pub base_url: String,
    /// Graph API version, e.g. `v27.0`. Marketing API versions live about a year.
    pub version: String,
    /// Access token used for every workspace until per-workspace connections exist.
    /// Never logged: `SecretString` redacts it in `Debug`.
    #[serde(skip_serializing)]
    pub access_token: Option<SecretString>,
    /// App secret for `appsecret_proof`; sent with every call when set.
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
    /// Graph calls per second per ad account allowed by this process (no bursts).
    pub calls_per_second_per_account: u32,
    /// Usage percentage (from Meta's usage headers) at which an ad account is paused fleet-wide.
    pub usage_pause_threshold_pct: u64,
    /// How long an account is paused when usage passes the threshold, in milliseconds.
    pub usage_pause_ms: u64,
    /// How long an account is paused after a throttling answer without a regain time.
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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            namespace: "ae".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/".into(),
            log: "info".into(),
            graph: GraphSettings::default(),
            producer: ProducerSettings::default(),
            worker: WorkerSettings::default(),
            finalizer: FinalizerSettings::default(),
        }
    }
}

impl Default for GraphSettings {
    fn default() -> Self {
        GraphSettings {
            base_url: "http://127.0.0.1:8470".into(),
            version: "v27.0".into(),
            access_token: None,
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
            usage_pause_threshold_pct: 90,
            usage_pause_ms: 10_000,
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
        }
    }
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
            jail.set_env("AE_GRAPH__ACCESS_TOKEN", "tok");
            let s = Settings::load().expect("loads");
            assert_eq!(s.namespace, "blue");
            assert_eq!(s.worker.concurrency, 3);
            assert_eq!(s.worker.max_attempts, 5);
            assert_eq!(
                s.graph.access_token.as_ref().map(|t| t.expose_secret()),
                Some("tok")
            );
            assert!(
                !format!("{s:?}").contains("tok\""),
                "token must be redacted in Debug"
            );
            jail.set_env("AE_WORKER__CONCURENCY", "3");
            assert!(Settings::load().is_err(), "a misspelt key must fail");
            Ok(())
        });
    }
}
