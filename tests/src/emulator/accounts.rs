//! What a valid token may do with ad accounts: use only the accounts it was granted (code 200
//! otherwise), create customer-list audiences only where the Custom Audience terms are accepted
//! (code 2655 with the acceptance link), and the two reads about accounts, `GET /act_{id}`
//! (`tos_accepted`) and `GET /me/adaccounts` (with each account's `account_status`). It never
//! charges the rate limits: `limits.rs` does, for the calls that count.
//!
//! Access can be taken away (`State::remove_access`: the Business Manager admin removed whoever
//! connected): the account then leaves `/me/adaccounts` and calls on it answer code 200, as for an
//! account never granted. An account can be disabled (`account_status` 2, or closed 100/101):
//! `/me/adaccounts` still lists it with that status, and calls on it answer
//! `GraphFailure::ad_account_disabled`.

use super::failure::GraphFailure;
use super::state::{State, ACTIVE};
use serde_json::{json, Value};

impl State {
    /// The token may use the ad account, and the account exists.
    pub fn account_for(&self, token: &str, ad_account: &str) -> Result<(), GraphFailure> {
        let allowed = self
            .tokens
            .get(token)
            .is_some_and(|t| t.ad_accounts.contains(ad_account));
        let Some(account) = self.ad_accounts.get(ad_account).filter(|_| allowed) else {
            return Err(GraphFailure::permission_denied(ad_account));
        };
        if matches!(account.status, 2 | 100 | 101) {
            return Err(GraphFailure::ad_account_disabled(ad_account));
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
            .map(|id| {
                let status = self.ad_accounts.get(id).map_or(ACTIVE, |a| a.status);
                json!({ "id": format!("act_{id}"), "account_id": id, "account_status": status })
            })
            .collect();
        json!({ "data": data })
    }
}
