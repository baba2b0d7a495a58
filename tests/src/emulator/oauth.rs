//! OAuth, played from both ends: the consent dialog (`GET /dialog/oauth`, answered by the next
//! queued approval or declined) and the token endpoint (`/oauth/access_token`: a dialog code for
//! a short-lived user token, `fb_exchange_token` for a long-lived one). Authenticated by the
//! app's id and secret, never by a token; a code is exchanged at most once.

use super::failure::GraphFailure;
use super::state::{now_secs, Params, State, Token};
use rand::Rng;
use serde_json::{json, Value};

impl State {
    /// `GET /oauth/access_token`: a dialog code for a short-lived user token, or
    /// `grant_type=fb_exchange_token` for a long-lived one. Authenticated by the app's id and
    /// secret, not a token.
    pub fn oauth(&mut self, p: &Params) -> Result<Value, GraphFailure> {
        let app_ok = p.get("client_id") == Some(&self.config.app_id)
            && match &self.config.app_secret {
                Some(secret) => p.get("client_secret") == Some(secret),
                None => p.contains_key("client_secret"),
            };
        if !app_ok {
            return Err(GraphFailure::client_secret_invalid());
        }
        if p.get("grant_type").map(String::as_str) == Some("fb_exchange_token") {
            let short = p.get("fb_exchange_token").cloned().unwrap_or_default();
            let (kind, accounts, user_id) = match self.tokens.get(&short) {
                Some(t) if t.revoked.is_none() => {
                    (t.kind, t.ad_accounts.clone(), t.user_id.clone())
                }
                _ => return Err(GraphFailure::token_unparseable()),
            };
            let long = format!("{short}LL");
            self.tokens.insert(
                long.clone(),
                Token {
                    kind,
                    expires_at: now_secs() + 60 * 24 * 3600,
                    ad_accounts: accounts,
                    revoked: None,
                    calls_after_revocation: 0,
                    user_id,
                },
            );
            return Ok(
                json!({ "access_token": long, "token_type": "bearer", "expires_in": 60 * 24 * 3600 }),
            );
        }
        let code = p.get("code").cloned().unwrap_or_default();
        if !p.contains_key("redirect_uri") {
            return Err(GraphFailure::bad_param("redirect_uri"));
        }
        let Some((_, dialog_redirect)) = self.codes.get(&code) else {
            return Err(GraphFailure::auth_code_used());
        };
        if dialog_redirect
            .as_ref()
            .is_some_and(|r| Some(r) != p.get("redirect_uri"))
        {
            return Err(GraphFailure::redirect_uri_mismatch());
        }
        let (seed, _) = self
            .codes
            .remove(&code)
            .expect("present: checked under the same lock");
        let token = seed.token.clone();
        self.add_token(seed);
        if let Some(t) = self.tokens.get_mut(&token) {
            t.expires_at = now_secs() + 2 * 3600;
        }
        Ok(json!({ "access_token": token, "token_type": "bearer", "expires_in": 2 * 3600 }))
    }

    /// `GET /dialog/oauth`: the consent dialog, played by the next queued approval. Returns where
    /// the browser is sent: `redirect_uri` with `code` and `state`, or with `error=access_denied`
    /// when nobody approves. An unknown app or a missing `redirect_uri` is an error page.
    pub fn dialog(&mut self, p: &Params) -> Result<String, String> {
        if p.get("client_id") != Some(&self.config.app_id) {
            return Err("Invalid App ID: the app does not exist.".into());
        }
        let Some(redirect) = p.get("redirect_uri").filter(|r| !r.is_empty()) else {
            return Err("URL blocked: redirect_uri is missing.".into());
        };
        let mut back = url::Url::parse(redirect).map_err(|_| "Invalid redirect_uri.".to_owned())?;
        {
            let mut q = back.query_pairs_mut();
            match self.dialog_approvals.pop_front() {
                Some(seed) => {
                    let code = format!("AQD{:016x}", self.rng.gen::<u64>());
                    self.codes
                        .insert(code.clone(), (seed, Some(redirect.clone())));
                    q.append_pair("code", &code);
                }
                None => {
                    q.append_pair("error", "access_denied")
                        .append_pair("error_reason", "user_denied")
                        .append_pair("error_description", "Permissions error");
                }
            }
            if let Some(state) = p.get("state") {
                q.append_pair("state", state);
            }
        }
        Ok(back.to_string())
    }
}
