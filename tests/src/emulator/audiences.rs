//! Custom audiences: creating them (`POST /act_{id}/customaudiences`, customer-list `CUSTOM` or
//! `LOOKALIKE` from an origin of at least 100 people), adding and removing users
//! (`POST`/`DELETE /{id}/users`, with a payload already checked by `payload.rs`), and reading one
//! back (`GET /{id}`) with approximate bounds only, as Meta never reveals an exact size. Listing an
//! account's audiences is `listing.rs`. An audience a token may not use answers as missing (code
//! 100 subcode 33), never as forbidden: Meta does not confirm that it exists.

use super::failure::GraphFailure;
use super::payload::Checked;
use super::state::{now_secs, Audience, Params, State};
use rand::Rng;
use serde_json::{json, Value};
use std::collections::HashMap;

const CUSTOMER_FILE_SOURCES: [&str; 3] = [
    "USER_PROVIDED_ONLY",
    "PARTNER_PROVIDED_ONLY",
    "BOTH_USER_AND_PARTNER_PROVIDED",
];

impl State {
    /// `POST /act_{id}/customaudiences`.
    pub fn create_audience(
        &mut self,
        token: &str,
        ad_account: &str,
        p: &Params,
    ) -> Result<Value, GraphFailure> {
        self.account_for(token, ad_account)?;
        self.tos_checked(ad_account)?;
        // Names past 200 characters are refused (Meta's limit is undocumented; 200 is the
        // producer's assumption, `MAX_AUDIENCE_NAME_CHARS`).
        let name = p
            .get("name")
            .filter(|n| !n.trim().is_empty() && n.chars().count() <= 200)
            .ok_or_else(|| GraphFailure::bad_param("name"))?;
        let subtype = p.get("subtype").cloned().unwrap_or_else(|| "CUSTOM".into());
        let source = match subtype.as_str() {
            "CUSTOM" => {
                let source = p.get("customer_file_source").cloned();
                if source
                    .as_ref()
                    .is_some_and(|s| !CUSTOMER_FILE_SOURCES.contains(&s.as_str()))
                {
                    return Err(GraphFailure::bad_param("customer_file_source"));
                }
                source
            }
            "LOOKALIKE" => {
                let origin = p
                    .get("origin_audience_id")
                    .ok_or_else(|| GraphFailure::bad_param("origin_audience_id"))?;
                let size = self
                    .audiences
                    .get(origin)
                    .map(|a| a.entries.len())
                    .ok_or_else(|| GraphFailure::missing_object(origin))?;
                if size < 100 {
                    return Err(GraphFailure::lookalike_source_too_small());
                }
                // `lookalike_spec`: a ratio of 0.01 to 0.20 and a `country`, or countries in
                // `location_spec.geo_locations.countries`.
                let spec: Value = p
                    .get("lookalike_spec")
                    .and_then(|s| serde_json::from_str(s).ok())
                    .ok_or_else(|| GraphFailure::bad_param("lookalike_spec"))?;
                let ratio_ok = spec["ratio"]
                    .as_f64()
                    .is_some_and(|r| (0.01..=0.20).contains(&r));
                let countries_ok = spec["country"].as_str().is_some_and(|c| c.len() == 2)
                    || spec["location_spec"]["geo_locations"]["countries"]
                        .as_array()
                        .is_some_and(|c| !c.is_empty());
                if !ratio_ok || !countries_ok {
                    return Err(GraphFailure::bad_param("lookalike_spec"));
                }
                None
            }
            _ => return Err(GraphFailure::bad_param("subtype")),
        };
        let id = self.new_id();
        self.audiences.insert(
            id.clone(),
            Audience {
                ad_account: ad_account.into(),
                name: name.clone(),
                description: p.get("description").cloned(),
                subtype,
                customer_file_source: source,
                time_created: now_secs(),
                entries: HashMap::new(),
                calls: 0,
            },
        );
        Ok(json!({ "id": id }))
    }

    /// The ad account of an audience the token may use.
    pub fn audience_account(&self, token: &str, audience_id: &str) -> Result<String, GraphFailure> {
        let account = self
            .audiences
            .get(audience_id)
            .map(|a| a.ad_account.clone())
            .ok_or_else(|| GraphFailure::missing_object(audience_id))?;
        // Without access to the owning account the audience answers as missing (100/33, as
        // Meta's error reference describes); a disabled account answers as disabled.
        self.account_for(token, &account).map_err(|f| {
            if f == GraphFailure::ad_account_disabled(&account) {
                f
            } else {
                GraphFailure::missing_object(audience_id)
            }
        })?;
        Ok(account)
    }

    /// `POST` (add) or `DELETE` (remove) `/{audience_id}/users`, with the payload parsed and
    /// checked by the caller: only applying it runs under the state's lock.
    pub fn users(
        &mut self,
        audience_id: &str,
        checked: &Checked<'_>,
        remove: bool,
        p: &Params,
    ) -> Result<Value, GraphFailure> {
        if let Some(refusal) = &checked.refusal {
            return Err(refusal.clone());
        }
        if !remove && !self.config.poison_entries.is_empty() {
            let accepted = checked.accepted();
            if let Some(entry) = accepted
                .iter()
                .find(|e| self.config.poison_entries.contains(e))
            {
                return Err(GraphFailure::payload_refused(entry));
            }
        }
        let record = self.config.record_entries;
        let audience = self
            .audiences
            .get_mut(audience_id)
            .ok_or_else(|| GraphFailure::missing_object(audience_id))?;
        audience.calls += 1;
        if record {
            for entry in checked.accepted() {
                if remove {
                    audience.entries.remove(&entry);
                } else {
                    *audience.entries.entry(entry).or_default() += 1;
                }
            }
        }
        let session_id = p
            .get("session")
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .and_then(|s| s.get("session_id").cloned())
            .unwrap_or_else(|| json!(self.rng.gen::<u32>() as u64 * 1000));
        Ok(json!({
            "audience_id": audience_id,
            "session_id": session_id,
            "num_received": checked.payload.len(),
            "num_invalid_entries": checked.invalid,
            "invalid_entry_samples": checked.samples,
        }))
    }

    /// `GET /{audience_id}` with approximate counts.
    pub fn audience_info(&self, audience_id: &str) -> Result<Value, GraphFailure> {
        let a = self
            .audiences
            .get(audience_id)
            .ok_or_else(|| GraphFailure::missing_object(audience_id))?;
        let (lower, upper) = a.approximate_bounds();
        Ok(json!({
            "id": audience_id,
            "name": a.name,
            "subtype": a.subtype,
            "approximate_count_lower_bound": lower,
            "approximate_count_upper_bound": upper,
            "operation_status": Audience::operation_status(),
        }))
    }
}

impl Audience {
    /// What `operation_status` reads for every audience here: none is ever flagged.
    pub(super) fn operation_status() -> Value {
        json!({"code": 200, "description": "Normal"})
    }

    /// Meta shows sizes only approximately: bounds around the number of distinct entries.
    pub(super) fn approximate_bounds(&self) -> (u64, u64) {
        let n = self.entries.len() as u64;
        if n < 1000 {
            (0, 1000)
        } else {
            (n * 9 / 10, n * 11 / 10)
        }
    }
}
