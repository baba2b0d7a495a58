//! Per-workspace settings in Redis, read by the producer when it plans a job. Today: the default
//! country of phone numbers written without their country code, which a job may override. (The
//! Facebook connection is `connection`'s.) Never holds a token.

use crate::contract::{PhoneCountry, WorkspaceId};
use crate::redis_conn::RedisConn;
use redis::AsyncCommands;

#[derive(Clone)]
pub struct Workspaces {
    redis: RedisConn,
    ns: String,
}

impl Workspaces {
    /// On a shared connection (`ProgressStore::connection`).
    pub fn new(redis: RedisConn, namespace: &str) -> Workspaces {
        Workspaces {
            redis,
            ns: namespace.to_owned(),
        }
    }

    /// With a connection of its own, for operators' commands.
    pub async fn connect(url: &str, namespace: &str) -> redis::RedisResult<Workspaces> {
        Ok(Workspaces::new(
            crate::redis_conn::connect(url).await?,
            namespace,
        ))
    }

    fn key(&self, workspace: &WorkspaceId) -> String {
        crate::redis_conn::workspace_key(&self.ns, workspace, "settings")
    }

    /// The workspace's default phone country. One stored before the rule was enforced that no
    /// longer parses is reported, not ignored: a silently missing country would count every
    /// national number invalid.
    pub async fn default_phone_country(
        &self,
        workspace: &WorkspaceId,
    ) -> anyhow::Result<Option<PhoneCountry>> {
        let mut c = self.redis.clone();
        let stored: Option<String> = c.hget(self.key(workspace), "default_phone_country").await?;
        Ok(stored.as_deref().map(PhoneCountry::parse).transpose()?)
    }

    /// Sets (or, with None, removes) the workspace's default phone country.
    pub async fn set_default_phone_country(
        &self,
        workspace: &WorkspaceId,
        country: Option<PhoneCountry>,
    ) -> anyhow::Result<()> {
        let mut c = self.redis.clone();
        match country {
            Some(country) => {
                let _: () = c
                    .hset(
                        self.key(workspace),
                        "default_phone_country",
                        country.as_str(),
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
