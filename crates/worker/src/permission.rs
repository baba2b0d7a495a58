//! An upload refused because the connection lost its access to the shard's ad account, told
//! apart from the other permanent failures: the ad account is marked unusable on the connection
//! and announced (`revocation`, the fleet's one path, which the producer's checks share), and the
//! shard's whole export is stopped, since none of its other shards can succeed either.
//!
//! An upload names an audience, not the ad account, and Meta answers a lost account there in two
//! ways: a permission error (code 10 or 200-299, class `PermissionLost`), or as if the audience
//! were missing (code 100, subcode 33, class `AudienceGone`; Meta's Marketing API error reference
//! gives a token without permissions on the ad account that owns the audience as one cause).
//! Either may also be about that one audience (deleted, or shared from another business), so the
//! ad account itself is asked (`GET act_<id>?fields=tos_accepted`, one call, uncharged by Meta's
//! audience budget): only a permission error there marks the account. Otherwise the shard fails
//! as before, with the upload's own reason.

use crate::upload::Deps;
use audience_export_core::connection::ActiveToken;
use audience_export_core::graph::{CallOutcome, ErrorClass, GraphError};
use audience_export_core::revocation::{Refusal, RevocationError};
use audience_export_core::Shard;
use tracing::warn;

/// When `error` (a permanent answer to the shard's upload) means the ad account is lost: marks
/// and announces it, and returns the reason that stops the export. None for any other failure.
/// `Err` only for our infrastructure (Redis, the broker): the shard is retried.
pub async fn lost(
    deps: &Deps,
    shard: &Shard,
    token: &ActiveToken,
    error: &GraphError,
) -> Result<Option<String>, RevocationError> {
    let about_access = match error.class() {
        ErrorClass::PermissionLost => true,
        ErrorClass::AudienceGone => missing_object(error),
        _ => false,
    };
    if !about_access {
        return Ok(None);
    }
    let probe = deps
        .graph
        .tos_accepted(&token.token, &shard.ad_account_id)
        .await;
    let refused = match probe {
        Ok(_) => {
            deps.metrics.graph_requests.with(CallOutcome::Ok).inc();
            return Ok(None);
        }
        Err(refused) => refused,
    };
    let class = refused.class();
    deps.metrics
        .graph_requests
        .with(CallOutcome::Failed(class))
        .inc();
    if class != ErrorClass::PermissionLost {
        return Ok(None);
    }
    let refusal = Refusal::new(
        &shard.workspace_id,
        Some(&shard.export_id),
        token,
        &refused,
        &shard.ad_account_id,
    );
    warn!(message = "The connection lost its access to the shard's ad account; stopping the export.", ad_account = %shard.ad_account_id, upload = %error, account = %refused);
    deps.revocations
        .refused(&deps.publisher, &deps.topology, &refusal)
        .await?;
    Ok(Some(refusal.reason))
}

/// Code 100 subcode 33: "does not exist, cannot be loaded due to missing permissions".
fn missing_object(error: &GraphError) -> bool {
    error
        .meta()
        .is_some_and(|m| m.code == Some(100) && m.error_subcode == Some(33))
}
