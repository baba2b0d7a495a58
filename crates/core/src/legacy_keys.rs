//! Renames the workspace keys written before they carried a hash tag
//! (`{ns}:workspace:<id>:connection` → `{ns}:workspace:{<id>}:connection`, and the settings,
//! revocation, notice and health-check keys beside it), so a fleet upgraded in place keeps its
//! workspaces' Facebook connections. Every role runs it at start: idempotent, and a key renamed
//! by another process meanwhile is simply gone.
//!
//! Only a standalone Redis can hold such keys (the fleet never ran on a cluster before the tags);
//! moving an old standalone dataset into a cluster means starting one role against the old
//! server first.

use crate::redis_conn::RedisConn;

/// Renames every untagged workspace key of `namespace`; returns how many it renamed.
pub async fn tag_workspace_keys(redis: &RedisConn, namespace: &str) -> redis::RedisResult<u64> {
    if redis.is_cluster() {
        return Ok(0);
    }
    let mut c = redis.clone();
    let prefix = format!("{namespace}:workspace:");
    let mut cursor: u64 = 0;
    let mut renamed = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await?;
        for key in keys {
            let Some(new) = tagged(&key, namespace) else {
                continue;
            };
            let answer: redis::RedisResult<i64> = redis::cmd("RENAMENX")
                .arg(&key)
                .arg(&new)
                .query_async(&mut c)
                .await;
            match answer {
                Ok(1) => renamed += 1,
                // Both exist: the tagged key was written by the new code since, and wins.
                Ok(_) => tracing::warn!(
                    message = "an untagged workspace key is left beside its tagged copy",
                    key = %key
                ),
                // Renamed by another process since the scan.
                Err(e) if e.to_string().contains("no such key") => {}
                Err(e) => return Err(e),
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    if renamed > 0 {
        tracing::info!(
            message = "tagged the workspace keys of an earlier version",
            renamed
        );
    }
    Ok(renamed)
}

/// The tagged name (`redis_conn::workspace_key`'s) of an untagged workspace key of
/// `namespace`, or None when it has its tag already.
fn tagged(key: &str, namespace: &str) -> Option<String> {
    let rest = key.strip_prefix(namespace)?.strip_prefix(":workspace:")?;
    if rest.starts_with('{') {
        return None;
    }
    let (id, what) = rest.split_once(':')?;
    Some(crate::redis_conn::workspace_key(namespace, id, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_untagged_keys_are_renamed() {
        let p = "ae";
        assert_eq!(
            tagged("ae:workspace:w1:connection", p).as_deref(),
            Some("ae:workspace:{w1}:connection")
        );
        assert_eq!(
            tagged("ae:workspace:w1:revoked:ab12", p).as_deref(),
            Some("ae:workspace:{w1}:revoked:ab12")
        );
        assert_eq!(tagged("ae:workspace:{w1}:exports", p), None);
        assert_eq!(tagged("ae:workspace:w1", p), None);
        assert_eq!(
            tagged("aeb:workspace:w1:connection", p),
            None,
            "another namespace"
        );
    }
}
