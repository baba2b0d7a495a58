//! The control API under `/_emulator/`, kept apart from the Graph paths: what the demo, the
//! benchmarks and out-of-process tests use to seed, break and inspect the emulator.

use super::faults::Fault;
use super::seed::{AdAccountSeed, Config, TokenSeed};
use super::state::State;
use axum::extract::{Path, State as AxState};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

type Shared = Arc<Mutex<State>>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/_emulator/audiences", get(audiences))
        .route("/_emulator/audiences/{id}/entries", get(entries))
        .route("/_emulator/tokens", post(add_token))
        .route("/_emulator/dialog/approvals", post(approve_dialog))
        .route("/_emulator/tokens/{token}/revoke", post(revoke))
        .route(
            "/_emulator/tokens/{token}/ad_accounts/{id}",
            post(grant_access).delete(remove_access),
        )
        .route("/_emulator/ad_accounts/{id}/status", post(account_status))
        .route("/_emulator/ad_accounts", post(add_account))
        .route("/_emulator/ad_accounts/{id}", get(account))
        .route("/_emulator/ad_accounts/{id}/budget", post(budget))
        .route("/_emulator/faults", post(faults))
        .route("/_emulator/faults/create_audience", post(create_faults))
        .route("/_emulator/config", get(config).post(set_config))
        .with_state(state)
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().expect("emulator state lock")
}

async fn audiences(AxState(state): AxState<Shared>) -> Json<Value> {
    let views = lock(&state).audience_views();
    let list: Vec<Value> = views
        .iter()
        .map(|a| {
            json!({
                "id": a.id, "ad_account": a.ad_account, "name": a.name,
                "description": a.description, "subtype": a.subtype,
                "customer_file_source": a.customer_file_source, "time_created": a.time_created,
                "distinct_entries": a.entries.len(), "calls": a.calls,
                "entries_sent": a.entries.values().map(|n| *n as u64).sum::<u64>(),
            })
        })
        .collect();
    Json(json!({ "data": list }))
}

async fn entries(AxState(state): AxState<Shared>, Path(id): Path<String>) -> Json<Value> {
    let view = lock(&state)
        .audience_views()
        .into_iter()
        .find(|a| a.id == id);
    Json(json!({ "entries": view.map(|v| v.entries).unwrap_or_default() }))
}

async fn add_token(AxState(state): AxState<Shared>, Json(seed): Json<TokenSeed>) -> Json<Value> {
    lock(&state).add_token(seed);
    Json(json!({ "ok": true }))
}

/// The next OAuth dialog is approved by the person whose token this seed describes.
async fn approve_dialog(
    AxState(state): AxState<Shared>,
    Json(seed): Json<TokenSeed>,
) -> Json<Value> {
    lock(&state).dialog_approvals.push_back(seed);
    Json(json!({ "ok": true }))
}

#[derive(Deserialize)]
struct Revoke {
    subcode: i64,
}

async fn revoke(
    AxState(state): AxState<Shared>,
    Path(token): Path<String>,
    Json(r): Json<Revoke>,
) -> Json<Value> {
    Json(json!({ "revoked": lock(&state).revoke(&token, r.subcode) }))
}

/// `DELETE /_emulator/tokens/{token}/ad_accounts/{id}`: the token loses the account.
async fn remove_access(
    AxState(state): AxState<Shared>,
    Path((token, id)): Path<(String, String)>,
) -> Json<Value> {
    Json(json!({ "removed": lock(&state).remove_access(&token, &id) }))
}

/// `POST /_emulator/tokens/{token}/ad_accounts/{id}`: the token may use the account (again).
async fn grant_access(
    AxState(state): AxState<Shared>,
    Path((token, id)): Path<(String, String)>,
) -> Json<Value> {
    Json(json!({ "granted": lock(&state).grant_access(&token, &id) }))
}

#[derive(Deserialize)]
struct AccountStatus {
    account_status: i64,
}

/// `POST /_emulator/ad_accounts/{id}/status` `{"account_status": 2}`: disables (or enables) it.
async fn account_status(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Json(a): Json<AccountStatus>,
) -> Json<Value> {
    Json(json!({ "ok": lock(&state).set_account_status(&id, a.account_status) }))
}

async fn add_account(
    AxState(state): AxState<Shared>,
    Json(seed): Json<AdAccountSeed>,
) -> Json<Value> {
    lock(&state).add_ad_account(seed);
    Json(json!({ "ok": true }))
}

async fn account(AxState(state): AxState<Shared>, Path(id): Path<String>) -> Json<Value> {
    let s = lock(&state);
    match s.ad_accounts.get(&id) {
        Some(a) => Json(
            json!({ "id": id, "calls": a.total_calls, "throttled": a.throttled, "budget": a.budget, "tos_accepted": a.tos_accepted, "account_status": a.status }),
        ),
        None => Json(json!({ "error": "unknown ad account" })),
    }
}

#[derive(Deserialize)]
struct Budget {
    calls_per_window: u64,
}

/// Changes an ad account's budget, keeping its window (a budget halved mid-export).
async fn budget(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Json(b): Json<Budget>,
) -> Json<Value> {
    let mut s = lock(&state);
    match s.ad_accounts.get_mut(&id) {
        Some(a) => {
            a.budget = b.calls_per_window;
            Json(json!({ "ok": true }))
        }
        None => Json(json!({ "error": "unknown ad account" })),
    }
}

/// Faults for the next add-users calls, in order.
async fn faults(AxState(state): AxState<Shared>, Json(list): Json<Vec<Fault>>) -> Json<Value> {
    lock(&state).scripted_faults.extend(list);
    Json(json!({ "ok": true }))
}

/// Faults for the next create-audience calls, in order.
async fn create_faults(
    AxState(state): AxState<Shared>,
    Json(list): Json<Vec<Fault>>,
) -> Json<Value> {
    lock(&state).create_faults.extend(list);
    Json(json!({ "ok": true }))
}

async fn config(AxState(state): AxState<Shared>) -> Json<Config> {
    Json(lock(&state).config.clone())
}

async fn set_config(AxState(state): AxState<Shared>, Json(config): Json<Config>) -> Json<Value> {
    lock(&state).config = config;
    Json(json!({ "ok": true }))
}
