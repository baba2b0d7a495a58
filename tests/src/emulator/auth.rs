//! Who may call at all: the API version in the path (code 2635), the access token (104 when
//! absent, 190 when unknown or revoked, counting calls made after a revocation), the
//! `appsecret_proof` that binds it to the app, and `GET /debug_token`, which describes a token.
//! What a valid token may then touch (its ad accounts) is `accounts.rs`'s business, and the OAuth
//! endpoints, which take the app's credentials instead of a token, are `oauth.rs`'s. It never
//! charges the rate limits: a call refused here costs no ad account anything.

use super::failure::GraphFailure;
use super::seed::TokenKind;
use super::state::State;
use serde_json::{json, Value};

impl State {
    pub fn check_version(&self, version: &str) -> Result<(), GraphFailure> {
        let major = version
            .strip_prefix('v')
            .and_then(|v| v.strip_suffix(".0"))
            .and_then(|v| v.parse::<u32>().ok());
        match major {
            Some(m) if (self.config.min_version..=self.config.max_version).contains(&m) => Ok(()),
            _ => Err(GraphFailure::deprecated_version(version)),
        }
    }

    /// Checks the token (and `appsecret_proof`) and returns its name, counting calls made after
    /// a revocation.
    pub fn authenticate(
        &mut self,
        token: Option<&str>,
        proof: Option<&str>,
    ) -> Result<String, GraphFailure> {
        let Some(token) = token else {
            return Err(GraphFailure::token_missing());
        };
        let Some(t) = self.tokens.get_mut(token) else {
            return Err(GraphFailure::token_unparseable());
        };
        if let Some(subcode) = t.revoked {
            t.calls_after_revocation += 1;
            return Err(GraphFailure::token_invalid(subcode));
        }
        if let Some(secret) = &self.config.app_secret {
            match proof {
                Some(p) if p == appsecret_proof(secret, token) => {}
                Some(_) => return Err(GraphFailure::appsecret_proof_invalid()),
                None if self.config.require_appsecret_proof => {
                    return Err(GraphFailure::appsecret_proof_missing())
                }
                None => {}
            }
        }
        Ok(token.to_owned())
    }

    /// `GET /debug_token?input_token=...`: validity, expiry, scopes and user of a token.
    pub fn debug_token(&self, input: &str) -> Value {
        match self.tokens.get(input) {
            Some(t) => json!({ "data": {
                "app_id": self.config.app_id,
                "type": if t.kind == TokenKind::SystemUser { "SYSTEM_USER" } else { "USER" },
                "is_valid": t.revoked.is_none(),
                "expires_at": t.expires_at,
                "scopes": ["ads_management", "business_management"],
                "user_id": t.user_id,
            }}),
            None => {
                json!({ "data": { "is_valid": false, "error": { "code": 190, "message": "Invalid OAuth access token." } } })
            }
        }
    }
}

/// Hex HMAC-SHA256 of the token keyed by the app secret, as Meta computes it.
fn appsecret_proof(secret: &str, token: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}
