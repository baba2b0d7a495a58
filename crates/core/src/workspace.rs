//! Per-workspace settings in Redis, read by the producer when it plans a job. Today: the default
//! country of phone numbers written without their country code, which a job may override. The
//! Facebook connection of a workspace (issue 6) belongs here too. Never holds a token in clear.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

/// Whether `country` is an ISO 3166-1 alpha-2 code with a numbering plan libphonenumber knows.
pub fn is_phone_country(country: &str) -> bool {
    country.len() == 2
        && country
            .to_ascii_uppercase()
            .parse::<phonenumber::country::Id>()
            .is_ok()
}

#[derive(Clone)]
pub struct Workspaces {
    redis: ConnectionManager,
    ns: String,
}

impl Workspaces {
    /// On a shared connection (`ProgressStore::connection`).
    pub fn new(redis: ConnectionManager, namespace: &str) -> Workspaces {
        Workspaces {
            redis,
            ns: namespace.to_owned(),
        }
    }

    /// With a connection of its own, for operators' commands.
    pub async fn connect(url: &str, namespace: &str) -> redis::RedisResult<Workspaces> {
        Ok(Workspaces::new(
            ConnectionManager::new(redis::Client::open(url)?).await?,
            namespace,
        ))
    }

    fn key(&self, workspace: &str) -> String {
        format!("{}:workspace:{workspace}:settings", self.ns)
    }

    pub async fn default_phone_country(
        &self,
        workspace: &str,
    ) -> redis::RedisResult<Option<String>> {
        let mut c = self.redis.clone();
        c.hget(self.key(workspace), "default_phone_country").await
    }

    /// Sets (or, with None, removes) the workspace's default phone country.
    pub async fn set_default_phone_country(
        &self,
        workspace: &str,
        country: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut c = self.redis.clone();
        match country {
            Some(country) => {
                anyhow::ensure!(
                    is_phone_country(country),
                    "`{country}` is not an ISO 3166-1 alpha-2 code with a numbering plan, e.g. US"
                );
                let _: () = c
                    .hset(
                        self.key(workspace),
                        "default_phone_country",
                        country.to_ascii_uppercase(),
                    )
                    .await?;
            }
            None => {
                let _: () = c.hdel(self.key(workspace), "default_phone_country").await?;
            }
        }
        Ok(())
    }
}
