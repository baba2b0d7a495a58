//! The Graph paths: `/{version}/{node}` and `/{version}/{node}/{edge}`, dispatched to the model
//! (`state.rs` and its rule modules) under its lock, answered after the latency model's delay
//! with Meta's usage headers and error envelope, or cut, or sent slowly, as a fault says. HTTP in
//! and out only: every rule Meta applies lives in the model, and the lock is never held across an
//! await.

use super::failure::GraphFailure;
use super::faults::Fault;
use super::limits::Usage;
use super::listing::PageLink;
use super::payload::{Checked, Payload};
use super::state::{Params, State};
use super::CallRecord;
use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Shared = Arc<Mutex<State>>;

/// What a handler sends back: body, status, and how long to wait before answering.
struct Answer {
    result: Result<Value, GraphFailure>,
    /// Entries in the request's payload, for the call log.
    records: usize,
    delay: Duration,
    usage: Option<Usage>,
    transport: Transport,
}

/// How the answer travels.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Transport {
    Normal,
    /// Cut the connection instead of answering.
    Reset,
    /// Send the body in two halves, `Duration` apart.
    Slow(Duration),
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/{version}/dialog/oauth", axum::routing::get(dialog))
        .route("/{version}/{node}", any(node))
        .route("/{version}/{node}/{edge}", any(edge))
        .with_state(state)
}

async fn node(
    AxState(state): AxState<Shared>,
    Path((version, node)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    respond(
        &state, method, &version, &node, None, &headers, query, &body,
    )
    .await
}

async fn edge(
    AxState(state): AxState<Shared>,
    Path((version, node, edge)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    respond(
        &state,
        method,
        &version,
        &node,
        Some(&edge),
        &headers,
        query,
        &body,
    )
    .await
}

/// The OAuth consent dialog (on www.facebook.com at Meta): redirects the browser back.
async fn dialog(
    AxState(state): AxState<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let outcome = state.lock().expect("emulator state lock").dialog(&query);
    match outcome {
        Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
        Err(page) => (StatusCode::BAD_REQUEST, page).into_response(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn respond(
    state: &Shared,
    method: Method,
    version: &str,
    node: &str,
    edge: Option<&str>,
    headers: &HeaderMap,
    query: HashMap<String, String>,
    body: &[u8],
) -> Response {
    let params = params(headers, query, body);
    let token = bearer(headers).or_else(|| params.get("access_token").cloned());
    // Where the client reached us, for the `next` links of listings.
    let origin = format!(
        "http://{}",
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost")
    );
    // Parsing and checking up to 10,000 entries is the costly part of a call: done here, on the
    // request's task, so concurrent uploads do not queue behind one lock.
    let checked = (edge == Some("users")).then(|| {
        params
            .get("payload")
            .ok_or_else(|| GraphFailure::bad_param("payload"))
            .and_then(|raw| Payload::parse(raw))
            .map(Payload::check)
    });
    let answer = {
        let mut s = state.lock().expect("emulator state lock");
        let answer = dispatch(
            &mut s,
            &method,
            version,
            node,
            edge,
            &params,
            checked.as_ref(),
            token.as_deref(),
            &origin,
        );
        s.calls.push(CallRecord {
            method: method.to_string(),
            path: match edge {
                Some(e) => format!("{node}/{e}"),
                None => node.to_owned(),
            },
            token: token.clone(),
            ad_account: answer.usage.as_ref().map(|u| u.ad_account.clone()),
            error_code: answer.result.as_ref().err().map(|f| f.code),
            records: answer.records,
            at: std::time::Instant::now(),
        });
        answer
    };
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    let mut response = match (answer.result, answer.transport) {
        (_, Transport::Reset) => {
            // Headers go out, then the body fails: hyper drops the connection mid-answer.
            let cut = futures::stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "emulated reset",
                ))
            });
            return (StatusCode::OK, axum::body::Body::from_stream(cut)).into_response();
        }
        (Ok(value), Transport::Slow(pause)) => {
            let body = value.to_string().into_bytes();
            let (first, second) = body.split_at(body.len() / 2);
            let (first, second) = (
                Bytes::copy_from_slice(first),
                Bytes::copy_from_slice(second),
            );
            // The first half at once, the second after the pause.
            let halves = futures::stream::iter([(Duration::ZERO, first), (pause, second)]).then(
                |(wait, chunk)| async move {
                    tokio::time::sleep(wait).await;
                    Ok::<Bytes, std::io::Error>(chunk)
                },
            );
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                axum::body::Body::from_stream(halves),
            )
                .into_response()
        }
        (Ok(value), Transport::Normal) => (StatusCode::OK, axum::Json(value)).into_response(),
        (Err(f), _) if f.html => (
            StatusCode::from_u16(f.http).unwrap_or(StatusCode::BAD_GATEWAY),
            [(header::CONTENT_TYPE, "text/html")],
            f.message,
        )
            .into_response(),
        (Err(f), _) => (
            StatusCode::from_u16(f.http).unwrap_or(StatusCode::BAD_REQUEST),
            axum::Json(f.envelope()),
        )
            .into_response(),
    };
    if let Some(usage) = answer.usage {
        usage_headers(response.headers_mut(), &usage);
    }
    response
}

// The request's parts, passed as they are: a struct for them would only be unpacked again.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    s: &mut State,
    method: &Method,
    version: &str,
    node: &str,
    edge: Option<&str>,
    p: &Params,
    checked: Option<&Result<Checked<'_>, GraphFailure>>,
    token: Option<&str>,
    origin: &str,
) -> Answer {
    let plain = |result: Result<Value, GraphFailure>| Answer {
        result,
        delay: Duration::ZERO,
        usage: None,
        transport: Transport::Normal,
        records: 0,
    };
    if let Err(f) = s.check_version(version) {
        return plain(Err(f));
    }
    // OAuth endpoints authenticate with the app's credentials, not a token.
    if node == "oauth" && edge == Some("access_token") {
        return plain(s.oauth(p));
    }
    let proof = p.get("appsecret_proof").map(String::as_str);
    let token = match s.authenticate(token, proof) {
        Ok(t) => t,
        Err(f) => return plain(Err(f)),
    };
    match (method.as_str(), node, edge) {
        ("GET", "me", Some("adaccounts")) => plain(Ok(s.my_ad_accounts(&token))),
        ("GET", "debug_token", None) => {
            let input = p.get("input_token").cloned().unwrap_or_default();
            plain(Ok(s.debug_token(&input)))
        }
        (_, account, edge) if account.starts_with("act_") => {
            let id = &account[4..];
            if let Err(f) = s.account_for(&token, id) {
                return plain(Err(f));
            }
            match (method.as_str(), edge) {
                ("GET", None) => plain(Ok(s.tos(id))),
                ("GET", Some("customaudiences")) => {
                    let url = format!("{origin}/{version}/{account}/customaudiences");
                    let link = PageLink {
                        url: &url,
                        token: &token,
                    };
                    charged(s, &token, id, 0, |s| s.list_audiences(id, p, &link))
                }
                ("POST", Some("customaudiences")) => {
                    let fault = s.next_create_fault();
                    faulted(s, &token, id, 0, fault, |s| {
                        s.create_audience(&token, id, p)
                    })
                }
                _ => plain(Err(unsupported(method, account))),
            }
        }
        ("GET", audience, None) => plain(s.audience_info(audience)),
        (m @ ("POST" | "DELETE"), audience, Some("users")) => {
            let account = match s.audience_account(&token, audience) {
                Ok(a) => a,
                Err(f) => return plain(Err(f)),
            };
            let checked = match checked {
                Some(Ok(checked)) => checked,
                Some(Err(f)) => return plain(Err(f.clone())),
                None => return plain(Err(GraphFailure::bad_param("payload"))),
            };
            let records = checked.payload.len();
            let fault = s.next_fault();
            let mut answer = faulted(s, &token, &account, records, fault, |s| {
                s.users(audience, checked, m == "DELETE", p)
            });
            answer.records = records;
            answer
        }
        _ => plain(Err(unsupported(method, node))),
    }
}

/// Runs a call that counts against the ad account's rate limit.
fn charged(
    s: &mut State,
    token: &str,
    account: &str,
    records: usize,
    call: impl FnOnce(&mut State) -> Result<Value, GraphFailure>,
) -> Answer {
    let delay = s.delay(records);
    match s.charge(token, account) {
        Err((throttled, usage)) => Answer {
            result: Err(throttled),
            delay: s.delay(0),
            usage: Some(usage),
            transport: Transport::Normal,
            records: 0,
        },
        Ok(usage) => Answer {
            result: call(s),
            delay,
            usage: Some(usage),
            transport: Transport::Normal,
            records: 0,
        },
    }
}

/// A charged call that may meet an injected fault, drawn by the caller. One policy for every
/// faultable call: an error fault answers instead of the call (not applied); a reset cuts the
/// connection (not applied); a hang or a slow body applies the call, then answers late or slowly,
/// so the client cannot tell whether it was applied.
fn faulted(
    s: &mut State,
    token: &str,
    account: &str,
    records: usize,
    fault: Option<Fault>,
    call: impl FnOnce(&mut State) -> Result<Value, GraphFailure>,
) -> Answer {
    let mut answer = charged(s, token, account, records, |s| {
        match fault.as_ref().and_then(Fault::failure) {
            Some(failure) => Err(failure),
            None if fault == Some(Fault::Reset) => Ok(Value::Null),
            None => call(s),
        }
    });
    if answer.result.is_ok() {
        match fault {
            Some(Fault::Hang { ms }) => answer.delay += Duration::from_millis(ms),
            Some(Fault::Reset) => answer.transport = Transport::Reset,
            Some(Fault::SlowBody { ms }) => {
                answer.transport = Transport::Slow(Duration::from_millis(ms))
            }
            _ => {}
        }
    }
    answer
}

fn unsupported(method: &Method, node: &str) -> GraphFailure {
    GraphFailure::unsupported(&method.as_str().to_lowercase(), node)
}

/// Query and body parameters together; a JSON body's non-string values become their JSON text,
/// as Meta reads `payload` either way.
fn params(headers: &HeaderMap, query: HashMap<String, String>, body: &[u8]) -> Params {
    let mut out = query;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
            for (k, v) in map {
                out.insert(
                    k,
                    match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    },
                );
            }
        }
    } else {
        out.extend(form_pairs(body));
    }
    out
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("OAuth "))
        .map(|t| t.trim().to_owned())
}

fn usage_headers(headers: &mut HeaderMap, u: &Usage) {
    let buc = json!({ u.ad_account.clone(): [{
        "type": "custom_audience",
        "call_count": u.call_pct,
        "total_cputime": u.call_pct / 2,
        "total_time": u.call_pct / 2,
        "estimated_time_to_regain_access": u.regain_minutes,
    }]});
    let account = json!({ "acc_id_util_pct": u.call_pct, "reset_time_duration": u.reset_secs });
    let app = json!({ "call_count": u.call_pct / 4, "total_time": u.call_pct / 8, "total_cputime": u.call_pct / 8 });
    for (name, value) in [
        ("x-business-use-case-usage", buc),
        ("x-ad-account-usage", account),
        ("x-app-usage", app),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            headers.insert(name, v);
        }
    }
}

/// `application/x-www-form-urlencoded` pairs. Written out rather than through `serde_urlencoded`:
/// decoding a 900 KB add-users body byte by byte was half the emulator's time, and the emulator
/// must stay far faster than the fleet it measures. Pairs that are not UTF-8 are skipped.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    body.split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &pair[pair.len()..]),
            };
            Some((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

fn percent_decode(input: &[u8]) -> Option<String> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.iter().position(|b| *b == b'%' || *b == b'+') {
        out.extend_from_slice(&rest[..i]);
        if rest[i] == b'+' {
            out.push(b' ');
            rest = &rest[i + 1..];
            continue;
        }
        match (
            rest.get(i + 1).copied().and_then(hex),
            rest.get(i + 2).copied().and_then(hex),
        ) {
            (Some(high), Some(low)) => {
                out.push(high << 4 | low);
                rest = &rest[i + 3..];
            }
            _ => {
                out.push(b'%');
                rest = &rest[i + 1..];
            }
        }
    }
    out.extend_from_slice(rest);
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::form_pairs;

    #[test]
    fn form_bodies_decode_like_the_general_decoder() {
        let bodies: [&[u8]; 4] = [
            b"payload=%7B%22schema%22%3A%22EMAIL_SHA256%22%7D&access_token=EA%2Bb",
            b"a=1+2&b=%zz&c&=d&e=%C3%A4",
            b"",
            b"x=%2",
        ];
        for body in bodies {
            let general: Vec<(String, String)> =
                serde_urlencoded::from_bytes(body).expect("decodes");
            assert_eq!(
                form_pairs(body),
                general,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
