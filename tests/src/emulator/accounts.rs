//! What a valid token may do with ad accounts: use only the accounts it was granted (code 200
//! otherwise), create customer-list audiences only where the Custom Audience terms are accepted
//! (code 2655 with the acceptance link), and the two reads about accounts, `GET /act_{id}`
//! (`tos_accepted`) and `GET /me/adaccounts`. It never charges the rate limits: `limits.rs` does,
//! for the calls that count.

use super::failure::GraphFailure;
use super::state::State;
use serde_json::{json, Value};

impl State {
    /// The token may use the ad account, and the account exists.
    pub fn account_for(&self, token: &str, ad_account: &str) -> Result<(), GraphFailure> {
        let allowed = self
            .tokens
            .get(token)
            .is_some_and(|t| t.ad_accounts.contains(ad_account));
        if !allowed || !self.ad_accounts.contains_key(ad_account) {
            return Err(GraphFailure::permission_denied(ad_account));
        }
        Ok(())
    }

    /// The ad account accepted the Custom Audience terms. Panics on an unknown account: callers
    /// check `account_for` first.
    pub(super) fn tos_checked(&self, ad_account: &str) -> Result<(), GraphFailure> {
        if !self.ad_accounts[ad_account].tos_accepted {
            return Err(GraphFailure::terms_not_accepted(ad_account));
        }
        Ok(())
    }

    /// `GET /act_{id}?fields=tos_accepted`.
    pub fn tos(&self, ad_account: &str) -> Value {
        let accepted = self
            .ad_accounts
            .get(ad_account)
            .is_some_and(|a| a.tos_accepted);
        if accepted {
            json!({ "id": format!("act_{ad_account}"), "tos_accepted": { "custom_audience_tos": 1 } })
        } else {
            json!({ "id": format!("act_{ad_account}"), "tos_accepted": {} })
        }
    }

    /// `GET /me/adaccounts`: the token's accounts, sorted. Panics on an unknown token: callers
    /// authenticate first.
    pub fn my_ad_accounts(&self, token: &str) -> Value {
        let mut ids: Vec<&String> = self.tokens[token].ad_accounts.iter().collect();
        ids.sort();
        let data: Vec<Value> = ids
            .into_iter()
            .map(|id| json!({ "id": format!("act_{id}"), "account_id": id }))
            .collect();
        json!({ "data": data })
    }
}
