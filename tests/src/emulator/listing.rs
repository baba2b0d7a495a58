//! `GET /act_{id}/customaudiences`: the ad account's custom audiences, as Meta lists them, so a
//! client can find an audience it created but never heard back about (a create whose answer was
//! lost is applied all the same). Newest first; only `id` unless `fields` names more (`id` is
//! always included, as the Graph API does); cursor pagination with `limit` (25 by default, at most
//! 500) and `after`, base64 cursors naming an audience, and a `next` link, present only when more
//! follow, that carries the call's token and parameters as Meta's links do. Reads only: it never
//! changes the model, and the caller authenticates, checks the account and charges the call.

use super::failure::GraphFailure;
use super::state::{Audience, Params, State};
use serde_json::{json, Map, Value};
use std::ops::Bound;

/// Page size without `limit`: the Graph API's.
const DEFAULT_LIMIT: usize = 25;

/// Largest page. Meta documents that an edge may cap `limit` without giving this edge's cap
/// (`shared/reference/graph-api.md` counts about 500 audiences per account, so 500 lists them in
/// one page); a larger `limit` is cut to it silently, and `next` still says whether more follow.
const MAX_LIMIT: usize = 500;

/// The node type named in Meta's answer to an unknown field.
const NODE_TYPE: &str = "CustomAudience";

/// The fields an audience can be listed with.
const FIELDS: [&str; 10] = [
    "id",
    "account_id",
    "name",
    "description",
    "subtype",
    "customer_file_source",
    "time_created",
    "approximate_count_lower_bound",
    "approximate_count_upper_bound",
    "operation_status",
];

/// Where a page's `next` link points: the address the call was made to (scheme, host, version and
/// path, no query) and the token it authenticated with.
pub(super) struct PageLink<'a> {
    pub url: &'a str,
    pub token: &'a str,
}

impl State {
    /// One page of the ad account's audiences, newest first.
    pub fn list_audiences(
        &self,
        ad_account: &str,
        p: &Params,
        link: &PageLink<'_>,
    ) -> Result<Value, GraphFailure> {
        let fields = requested_fields(p)?;
        let limit = page_limit(p)?;
        if p.contains_key("before") {
            // Paging backwards is not reproduced: refused rather than ignored, so a client that
            // relies on it notices here and not against Meta.
            return Err(GraphFailure::bad_param("before"));
        }
        let after = match p.get("after") {
            Some(cursor) => Some(
                cursor_id(cursor)
                    .filter(|id| {
                        self.audiences
                            .get(id)
                            .is_some_and(|a| a.ad_account == ad_account)
                    })
                    .ok_or_else(|| GraphFailure::bad_param("after"))?,
            ),
            None => None,
        };
        // Ids grow with creation (see `State::audiences`): older ones sort first, so newest first
        // is the map read backwards, from just before the cursor's audience.
        let end = match &after {
            Some(id) => Bound::Excluded(id.as_str()),
            None => Bound::Unbounded,
        };
        let older = self.audiences.range::<str, _>((Bound::Unbounded, end));
        let mut account = older.rev().filter(|(_, a)| a.ad_account == ad_account);
        let page: Vec<(&String, &Audience)> = account.by_ref().take(limit).collect();
        let more = account.next().is_some();
        let (Some((first, _)), Some((last, _))) = (page.first(), page.last()) else {
            return Ok(json!({ "data": [] }));
        };
        let mut paging = json!({
            "cursors": { "before": cursor(first), "after": cursor(last) },
        });
        if more {
            paging["next"] = json!(next_link(link, p, limit, &cursor(last)));
        }
        let data: Vec<Value> = page
            .iter()
            .map(|(id, a)| Value::Object(listed(id, a, &fields)))
            .collect();
        Ok(json!({ "data": data, "paging": paging }))
    }
}

/// The `fields` asked for, in order, without repeats, `id` first whether asked for or not.
fn requested_fields(p: &Params) -> Result<Vec<&str>, GraphFailure> {
    let mut fields = vec!["id"];
    for field in p
        .get("fields")
        .map(|f| f.split(',').map(str::trim).filter(|f| !f.is_empty()))
        .into_iter()
        .flatten()
    {
        if !FIELDS.contains(&field) {
            return Err(GraphFailure::nonexisting_field(field, NODE_TYPE));
        }
        if !fields.contains(&field) {
            fields.push(field);
        }
    }
    Ok(fields)
}

/// `limit`: a positive integer, cut to `MAX_LIMIT`; `DEFAULT_LIMIT` without one.
fn page_limit(p: &Params) -> Result<usize, GraphFailure> {
    match p.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(l) => match l.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n.min(MAX_LIMIT)),
            _ => Err(GraphFailure::bad_param("limit")),
        },
    }
}

/// One audience with the requested fields; a field without a value (no description, no customer
/// file source) is left out, as Meta leaves out empty fields.
fn listed(id: &str, a: &Audience, fields: &[&str]) -> Map<String, Value> {
    let mut out = Map::new();
    let (lower, upper) = a.approximate_bounds();
    for field in fields {
        let value = match *field {
            "id" => json!(id),
            "account_id" => json!(a.ad_account),
            "name" => json!(a.name),
            "description" => json!(a.description),
            "subtype" => json!(a.subtype),
            "customer_file_source" => json!(a.customer_file_source),
            "time_created" => json!(a.time_created),
            "approximate_count_lower_bound" => json!(lower),
            "approximate_count_upper_bound" => json!(upper),
            "operation_status" => Audience::operation_status(),
            // `requested_fields` lets only `FIELDS` through.
            _ => Value::Null,
        };
        if !value.is_null() {
            out.insert((*field).to_owned(), value);
        }
    }
    out
}

/// The next page's address: the same call from `after`, with the token in the query as Meta's
/// links carry it (a client that logs `next` logs the token).
fn next_link(link: &PageLink<'_>, p: &Params, limit: usize, after: &str) -> String {
    let mut url = format!("{}?", link.url);
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("access_token", link.token);
    for carried in ["appsecret_proof", "fields"] {
        if let Some(value) = p.get(carried) {
            query.append_pair(carried, value);
        }
    }
    query
        .append_pair("limit", &limit.to_string())
        .append_pair("after", after);
    url.push_str(&query.finish());
    url
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The cursor naming an audience: its id in padded base64, the form of Meta's cursors.
fn cursor(id: &str) -> String {
    let mut out = String::with_capacity(id.len().div_ceil(3) * 4);
    for chunk in id.as_bytes().chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let bits = byte(0) << 16 | byte(1) << 8 | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(bits >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The audience id a cursor names; None for anything that is not padded base64 of UTF-8.
fn cursor_id(cursor: &str) -> Option<String> {
    let bytes = cursor.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let sextet = |c: u8| BASE64.iter().position(|b| *b == c).map(|p| p as u32);
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let last = bytes.len() / 4 - 1;
    for (n, chunk) in bytes.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && n != last) {
            return None;
        }
        let mut bits = 0u32;
        for c in &chunk[..4 - pad] {
            bits = bits << 6 | sextet(*c)?;
        }
        bits <<= 6 * pad as u32;
        out.extend_from_slice(&bits.to_be_bytes()[1..4 - pad]);
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::{cursor, cursor_id, page_limit, requested_fields, Params};

    #[test]
    fn cursors_are_base64_ids_like_metas() {
        // The cursor of Meta's pagination guide, and what it decodes to.
        assert_eq!(cursor("10151194520072941"), "MTAxNTExOTQ1MjAwNzI5NDE=");
        for id in ["1", "12", "123", "23850000000000001"] {
            assert_eq!(cursor_id(&cursor(id)).as_deref(), Some(id));
        }
        for bad in ["", "abc", "MT=A", "M===", "MTAx!TEx", "MT==MTAx"] {
            assert_eq!(cursor_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn fields_default_to_id_and_always_hold_it() {
        let params = |fields: &str| Params::from([("fields".to_owned(), fields.to_owned())]);
        assert_eq!(requested_fields(&Params::new()).ok(), Some(vec!["id"]));
        assert_eq!(
            requested_fields(&params("name, description,name,,time_created")).ok(),
            Some(vec!["id", "name", "description", "time_created"])
        );
        let unknown = requested_fields(&params("name,secret")).expect_err("unknown field");
        assert_eq!(
            (unknown.code, unknown.message.as_str()),
            (
                100,
                "(#100) Tried accessing nonexisting field (secret) on node type (CustomAudience)"
            )
        );
    }

    #[test]
    fn limit_defaults_to_25_and_is_capped_at_500() {
        let limit = |l: &str| page_limit(&Params::from([("limit".to_owned(), l.to_owned())]));
        assert_eq!(page_limit(&Params::new()).ok(), Some(25));
        assert_eq!(limit("3").ok(), Some(3));
        assert_eq!(limit("5000").ok(), Some(500));
        for bad in ["0", "-1", "ten"] {
            assert_eq!(limit(bad).map_err(|f| f.code), Err(100), "{bad}");
        }
    }
}
