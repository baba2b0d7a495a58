//! The Graph API emulator's own contract: every answer checked on the wire with raw HTTP, not
//! through the fleet's client, so a bug shared by both cannot hide.

use audience_export_harness::emulator::{AdAccountSeed, Config, Emulator, Fault, Seed, TokenSeed};
use serde_json::{json, Value};

const TOKEN: &str = "EAAemulatortest";
const ACCOUNT: &str = "2002";

async fn emulator(config: Config) -> Emulator {
    let seed = Seed {
        tokens: vec![TokenSeed::user(TOKEN, &[ACCOUNT, "3003"])],
        ad_accounts: vec![
            AdAccountSeed::new(ACCOUNT),
            AdAccountSeed {
                id: "3003".into(),
                tos_accepted: false,
                budget: None,
            },
            AdAccountSeed::new("4004"),
        ],
    };
    Emulator::start(([127, 0, 0, 1], 0).into(), config, seed)
        .await
        .expect("emulator")
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    form: &[(&str, String)],
) -> Answer {
    let mut request = reqwest::Client::new().request(method, url).form(form);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.expect("the emulator answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

async fn create(e: &Emulator, account: &str, token: &str) -> Answer {
    let form = [
        ("name", "A".to_owned()),
        ("subtype", "CUSTOM".to_owned()),
        ("customer_file_source", "USER_PROVIDED_ONLY".to_owned()),
    ];
    call(
        reqwest::Method::POST,
        format!("{}/v27.0/act_{account}/customaudiences", e.base_url()),
        Some(token),
        &form,
    )
    .await
}

async fn users(
    e: &Emulator,
    method: reqwest::Method,
    audience: &str,
    schema: Value,
    data: Value,
) -> Answer {
    let payload = json!({"schema": schema, "data": data}).to_string();
    call(
        method,
        format!("{}/v27.0/{audience}/users", e.base_url()),
        Some(TOKEN),
        &[("payload", payload)],
    )
    .await
}

/// The common call: add single-key `EMAIL_SHA256` entries.
async fn add(e: &Emulator, audience: &str, data: Value) -> Answer {
    users(
        e,
        reqwest::Method::POST,
        audience,
        json!("EMAIL_SHA256"),
        data,
    )
    .await
}

fn code(a: &Answer) -> (i64, Option<i64>) {
    (
        a.body["error"]["code"].as_i64().unwrap_or(-1),
        a.body["error"]["error_subcode"].as_i64(),
    )
}

fn hash(i: usize) -> String {
    format!("{i:064x}")
}

#[tokio::test]
async fn tokens_are_checked_and_revocation_applies_to_the_next_call() {
    let e = emulator(Config::default()).await;
    assert_eq!(code(&create(&e, ACCOUNT, "nope").await), (190, None));
    let none = call(
        reqwest::Method::POST,
        format!("{}/v27.0/act_{ACCOUNT}/customaudiences", e.base_url()),
        None,
        &[],
    )
    .await;
    assert_eq!(code(&none), (104, None));
    let ok = create(&e, ACCOUNT, TOKEN).await;
    assert_eq!(ok.status, 200);
    assert!(ok.body["id"].as_str().is_some());

    assert!(e.revoke(TOKEN, 463));
    let revoked = create(&e, ACCOUNT, TOKEN).await;
    assert_eq!(revoked.status, 400);
    assert_eq!(code(&revoked), (190, Some(463)));
    assert_eq!(revoked.body["error"]["type"], "OAuthException");
    assert!(revoked.body["error"]["fbtrace_id"].is_string());
    assert_eq!(e.calls_after_revocation(TOKEN), 1);
}

#[tokio::test]
async fn accounts_terms_and_versions_are_enforced() {
    let e = emulator(Config::default()).await;
    assert_eq!(
        code(&create(&e, "4004", TOKEN).await),
        (200, None),
        "the token may not use 4004"
    );
    assert_eq!(
        code(&create(&e, "3003", TOKEN).await),
        (2655, Some(1_870_090)),
        "terms not accepted"
    );
    let tos = call(
        reqwest::Method::GET,
        format!("{}/v27.0/act_3003?fields=tos_accepted", e.base_url()),
        Some(TOKEN),
        &[],
    )
    .await;
    assert_eq!(tos.body["tos_accepted"], json!({}));
    let old = call(
        reqwest::Method::POST,
        format!("{}/v12.0/act_{ACCOUNT}/customaudiences", e.base_url()),
        Some(TOKEN),
        &[],
    )
    .await;
    assert_eq!(code(&old), (2635, None));
    let accounts = call(
        reqwest::Method::GET,
        format!("{}/v27.0/me/adaccounts", e.base_url()),
        Some(TOKEN),
        &[],
    )
    .await;
    assert_eq!(accounts.body["data"][0]["id"], "act_2002");
}

#[tokio::test]
async fn uploads_are_limited_validated_and_recorded() {
    let e = emulator(Config::default()).await;
    let audience = create(&e, ACCOUNT, TOKEN).await.body["id"]
        .as_str()
        .expect("id")
        .to_owned();

    let too_many: Vec<String> = (0..10_001).map(hash).collect();
    let refused = add(&e, &audience, json!(too_many)).await;
    assert_eq!(code(&refused), (100, None));
    assert!(
        e.audience(&audience).expect("audience").entries.is_empty(),
        "a refused request adds nothing"
    );

    let data = json!([
        hash(1),
        hash(2),
        "ABC",
        hash(0xabcdef).to_uppercase(),
        hash(3)
    ]);
    let answer = add(&e, &audience, data).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["num_received"], 5);
    assert_eq!(
        answer.body["num_invalid_entries"], 2,
        "not 64 lowercase hex"
    );
    assert_eq!(
        answer.body["invalid_entry_samples"]
            .as_object()
            .map(|m| m.len()),
        Some(2)
    );
    let entries = e.audience(&audience).expect("audience").entries;
    assert_eq!(entries.len(), 3);

    let multi = users(
        &e,
        reqwest::Method::POST,
        &audience,
        json!(["EMAIL_SHA256", "PHONE_SHA256"]),
        json!([[hash(7), ""], ["", hash(8)], ["", ""]]),
    )
    .await;
    assert_eq!(
        multi.body["num_invalid_entries"], 1,
        "an all-blank row is invalid"
    );

    let removed = users(
        &e,
        reqwest::Method::DELETE,
        &audience,
        json!("EMAIL_SHA256"),
        json!([hash(1)]),
    )
    .await;
    assert_eq!(removed.status, 200, "removal takes its payload in the body");
    assert!(!e
        .audience(&audience)
        .expect("audience")
        .entries
        .contains_key(&hash(1)));

    let gone = add(&e, "999", json!([hash(1)])).await;
    assert_eq!(code(&gone), (100, Some(33)));
}

#[tokio::test]
async fn a_lookalike_needs_a_seed_of_100() {
    let e = emulator(Config::default()).await;
    let seed = create(&e, ACCOUNT, TOKEN).await.body["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let lookalike = |origin: String| async {
        let form = [
            ("name", "LAL".to_owned()),
            ("subtype", "LOOKALIKE".to_owned()),
            ("origin_audience_id", origin),
            (
                "lookalike_spec",
                json!({"country": "US", "ratio": 0.01}).to_string(),
            ),
        ];
        call(
            reqwest::Method::POST,
            format!("{}/v27.0/act_{ACCOUNT}/customaudiences", e.base_url()),
            Some(TOKEN),
            &form,
        )
        .await
    };
    let _ = add(&e, &seed, json!((0..99).map(hash).collect::<Vec<_>>())).await;
    assert_eq!(code(&lookalike(seed.clone()).await).0, 2654);
    let _ = add(&e, &seed, json!([hash(500)])).await;
    assert_eq!(lookalike(seed).await.status, 200);
}

#[tokio::test]
async fn usage_rises_with_calls_throttles_past_the_budget_and_recovers() {
    let config = Config {
        default_budget: 4,
        window_secs: 0.5,
        ..Config::default()
    };
    let e = emulator(config).await;
    let mut percents = Vec::new();
    for _ in 0..4 {
        let a = create(&e, ACCOUNT, TOKEN).await;
        assert_eq!(a.status, 200);
        let usage: Value = serde_json::from_str(
            a.headers["x-business-use-case-usage"]
                .to_str()
                .expect("ascii"),
        )
        .expect("json");
        percents.push(
            usage[ACCOUNT][0]["call_count"]
                .as_u64()
                .expect("call_count"),
        );
        assert!(
            a.headers.contains_key("x-ad-account-usage") && a.headers.contains_key("x-app-usage")
        );
    }
    assert_eq!(percents, vec![25, 50, 75, 100]);
    let throttled = create(&e, ACCOUNT, TOKEN).await;
    assert_eq!(
        (throttled.status, code(&throttled).0),
        (400, 80003),
        "throttling is HTTP 400, as Meta does"
    );
    let usage: Value = serde_json::from_str(
        throttled.headers["x-business-use-case-usage"]
            .to_str()
            .expect("ascii"),
    )
    .expect("json");
    assert!(usage[ACCOUNT][0]["estimated_time_to_regain_access"].as_u64() >= Some(1));
    assert_eq!(e.account_stats(ACCOUNT), (5, 1));

    let recovered =
        audience_export_harness::app::eventually(std::time::Duration::from_secs(5), || async {
            (create(&e, ACCOUNT, TOKEN).await.status == 200).then_some(())
        })
        .await;
    assert!(
        recovered.is_some(),
        "the budget recovers once the window has passed"
    );
}

#[tokio::test]
async fn random_faults_are_reproducible_from_the_seed() {
    async fn outcomes(seed: u64) -> Vec<u16> {
        let config = Config {
            seed,
            error_rate_5xx: 0.3,
            error_rate_transient: 0.2,
            ..Config::default()
        };
        let e = emulator(config).await;
        let audience = create(&e, ACCOUNT, TOKEN).await.body["id"]
            .as_str()
            .expect("id")
            .to_owned();
        let mut out = Vec::new();
        for i in 0..40 {
            let a = add(&e, &audience, json!([hash(i)])).await;
            out.push(a.status * 10 + code(&a).0.max(0) as u16 % 10);
        }
        out
    }
    let first = outcomes(7).await;
    assert_eq!(first, outcomes(7).await, "same seed, same answers");
    assert_ne!(first, outcomes(8).await, "another seed, other answers");
    assert!(first.contains(&5001) && first.contains(&4002) && first.contains(&2000));
}

#[tokio::test]
async fn scripted_faults_come_in_order() {
    let e = emulator(Config::default()).await;
    let audience = create(&e, ACCOUNT, TOKEN).await.body["id"]
        .as_str()
        .expect("id")
        .to_owned();
    e.inject([
        Fault::HtmlBadGateway,
        Fault::Error {
            http: 400,
            code: 613,
            subcode: Some(1_487_742),
            message: "Calls limit".into(),
        },
    ]);
    let html = add(&e, &audience, json!([hash(1)])).await;
    assert_eq!(
        (html.status, html.body.clone()),
        (502, Value::Null),
        "an HTML page, not JSON"
    );
    let throttled = add(&e, &audience, json!([hash(1)])).await;
    assert_eq!(code(&throttled), (613, Some(1_487_742)));
    assert_eq!(add(&e, &audience, json!([hash(1)])).await.status, 200);
}

#[tokio::test]
async fn oauth_codes_give_short_tokens_that_exchange_for_long_lived_ones() {
    let config = Config {
        app_secret: Some("s3cret".into()),
        ..Config::default()
    };
    let e = emulator(config).await;
    e.authorize("code-1", TokenSeed::user("EAAshort", &[ACCOUNT]));
    let url = format!("{}/v27.0/oauth/access_token", e.base_url());
    let get = |query: String| call(reqwest::Method::GET, format!("{url}?{query}"), None, &[]);
    let app = "client_id=1000000000000001&redirect_uri=https%3A%2F%2Fapp%2Fcb";

    assert_eq!(
        code(&get(format!("{app}&client_secret=wrong&code=code-1")).await),
        (101, None)
    );
    let short = get(format!("{app}&client_secret=s3cret&code=code-1")).await;
    assert_eq!(short.body["access_token"], "EAAshort", "{}", short.body);
    assert_eq!(short.body["expires_in"], 7200);
    let reused = get(format!("{app}&client_secret=s3cret&code=code-1")).await;
    assert_eq!(code(&reused), (100, Some(36007)), "a code works once");

    let long = get("client_id=1000000000000001&client_secret=s3cret&grant_type=fb_exchange_token&fb_exchange_token=EAAshort".to_owned()).await;
    let long_token = long.body["access_token"]
        .as_str()
        .expect("long-lived token")
        .to_owned();
    assert_ne!(long_token, "EAAshort");
    let debug = call(
        reqwest::Method::GET,
        format!(
            "{}/v27.0/debug_token?input_token={long_token}",
            e.base_url()
        ),
        Some(&long_token),
        &[],
    )
    .await;
    let data = &debug.body["data"];
    assert_eq!(data["is_valid"], true);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(data["expires_at"].as_u64().expect("expiry") > now + 59 * 24 * 3600);
    assert!(data["scopes"]
        .as_array()
        .expect("scopes")
        .contains(&json!("ads_management")));
    assert_eq!(
        create(&e, ACCOUNT, &long_token).await.status,
        200,
        "the long-lived token keeps the grants"
    );
}

#[tokio::test]
async fn the_oauth_dialog_redirects_back_with_a_code_or_a_refusal() {
    let e = emulator(Config::default()).await;
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let dialog = |client_id: &str| {
        format!(
            "{}/v27.0/dialog/oauth?client_id={client_id}&redirect_uri=https%3A%2F%2Fapp%2Fcb&state=s1&scope=ads_management",
            e.base_url()
        )
    };
    let location = |r: &reqwest::Response| {
        url::Url::parse(
            r.headers()[reqwest::header::LOCATION]
                .to_str()
                .expect("ascii"),
        )
        .expect("url")
    };
    let param = |u: &url::Url, k: &str| {
        u.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };

    let declined = browser
        .get(dialog("1000000000000001"))
        .send()
        .await
        .expect("dialog");
    assert_eq!(declined.status().as_u16(), 302);
    let back = location(&declined);
    assert_eq!(param(&back, "error").as_deref(), Some("access_denied"));
    assert_eq!(param(&back, "state").as_deref(), Some("s1"));
    let unknown_app = browser.get(dialog("42")).send().await.expect("dialog");
    assert_eq!(unknown_app.status().as_u16(), 400);

    e.approve_next_dialog(TokenSeed::user("EAAdialog", &[ACCOUNT]));
    let approved = browser
        .get(dialog("1000000000000001"))
        .send()
        .await
        .expect("dialog");
    let back = location(&approved);
    assert!(back.as_str().starts_with("https://app/cb?"));
    let dialog_code = param(&back, "code").expect("code");
    let exchange = |redirect: &str| {
        call(
            reqwest::Method::GET,
            format!(
                "{}/v27.0/oauth/access_token?client_id=1000000000000001&client_secret=x&redirect_uri={redirect}&code={dialog_code}",
                e.base_url()
            ),
            None,
            &[],
        )
    };
    assert_eq!(
        code(&exchange("https%3A%2F%2Fother%2Fcb").await),
        (100, Some(36008)),
        "the exchange must name the dialog's redirect_uri"
    );
    let token = exchange("https%3A%2F%2Fapp%2Fcb").await;
    assert_eq!(token.body["access_token"], "EAAdialog", "{}", token.body);
}

#[tokio::test]
async fn appsecret_proof_is_checked_when_the_app_requires_it() {
    let config = Config {
        app_secret: Some("s3cret".into()),
        require_appsecret_proof: true,
        ..Config::default()
    };
    let e = emulator(config).await;
    let url = format!("{}/v27.0/act_{ACCOUNT}/customaudiences", e.base_url());
    let form = |proof: Option<String>| {
        let mut f = vec![
            ("name", "A".to_owned()),
            ("customer_file_source", "USER_PROVIDED_ONLY".to_owned()),
        ];
        if let Some(p) = proof {
            f.push(("appsecret_proof", p));
        }
        f
    };
    assert_eq!(
        code(&call(reqwest::Method::POST, url.clone(), Some(TOKEN), &form(None)).await).0,
        100
    );
    assert_eq!(
        code(
            &call(
                reqwest::Method::POST,
                url.clone(),
                Some(TOKEN),
                &form(Some("00".into()))
            )
            .await
        )
        .0,
        100
    );
    let proof = {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").expect("key");
        mac.update(TOKEN.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    };
    assert_eq!(
        call(reqwest::Method::POST, url, Some(TOKEN), &form(Some(proof)))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn hangs_resets_and_slow_bodies_behave_like_a_bad_network() {
    let e = emulator(Config::default()).await;
    let audience = create(&e, ACCOUNT, TOKEN).await.body["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .expect("client");
    let post = |entry: String| {
        let payload = json!({"schema": "EMAIL_SHA256", "data": [entry]}).to_string();
        client
            .post(format!("{}/v27.0/{audience}/users", e.base_url()))
            .bearer_auth(TOKEN)
            .form(&[("payload", payload)])
            .send()
    };
    let received = || e.audience(&audience).expect("audience").entries;

    e.inject([Fault::Hang { ms: 5_000 }]);
    let hung = post(hash(1)).await.expect_err("the client times out");
    assert!(hung.is_timeout(), "{hung}");
    assert!(
        received().contains_key(&hash(1)),
        "a hung call was applied: the client cannot know"
    );

    e.inject([Fault::Reset]);
    let reset = match post(hash(2)).await {
        Ok(response) => response.bytes().await.expect_err("the body is cut"),
        Err(e) => e,
    };
    assert!(!reset.is_timeout(), "{reset}");
    assert!(
        !received().contains_key(&hash(2)),
        "a reset call was not applied"
    );

    e.inject([Fault::SlowBody { ms: 150 }]);
    let started = std::time::Instant::now();
    let slow = post(hash(3))
        .await
        .expect("headers arrive")
        .json::<Value>()
        .await
        .expect("the whole body arrives");
    assert_eq!(slow["num_received"], 1);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(150),
        "the body took its time"
    );
}

#[tokio::test]
async fn a_token_past_its_user_budget_gets_code_17() {
    let config = Config {
        user_budget: 2,
        ..Config::default()
    };
    let e = emulator(config).await;
    assert_eq!(create(&e, ACCOUNT, TOKEN).await.status, 200);
    assert_eq!(create(&e, ACCOUNT, TOKEN).await.status, 200);
    let limited = create(&e, ACCOUNT, TOKEN).await;
    assert_eq!(
        (limited.status, code(&limited)),
        (400, (17, Some(2_446_079)))
    );
}

#[tokio::test]
async fn an_audience_reads_back_with_approximate_bounds_only() {
    let e = emulator(Config::default()).await;
    let audience = create(&e, ACCOUNT, TOKEN).await.body["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let _ = add(
        &e,
        &audience,
        json!((0..2000).map(hash).collect::<Vec<_>>()),
    )
    .await;
    let read = call(reqwest::Method::GET, format!("{}/v27.0/{audience}?fields=approximate_count_lower_bound,approximate_count_upper_bound", e.base_url()), Some(TOKEN), &[]).await;
    let (lower, upper) = (
        read.body["approximate_count_lower_bound"]
            .as_u64()
            .expect("lower"),
        read.body["approximate_count_upper_bound"]
            .as_u64()
            .expect("upper"),
    );
    assert!(lower < 2000 && 2000 < upper, "{}", read.body);
}

/// Creates a customer-list audience named `name` with `description` and returns its id.
async fn create_named(e: &Emulator, account: &str, name: &str, description: &str) -> String {
    let form = [
        ("name", name.to_owned()),
        ("description", description.to_owned()),
        ("subtype", "CUSTOM".to_owned()),
        ("customer_file_source", "USER_PROVIDED_ONLY".to_owned()),
    ];
    let created = call(
        reqwest::Method::POST,
        format!("{}/v27.0/act_{account}/customaudiences", e.base_url()),
        Some(TOKEN),
        &form,
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    created.body["id"].as_str().expect("id").to_owned()
}

/// `GET /act_{account}/customaudiences?{query}` with `token` in the header.
async fn list(e: &Emulator, account: &str, token: &str, query: &str) -> Answer {
    call(
        reqwest::Method::GET,
        format!(
            "{}/v27.0/act_{account}/customaudiences?{query}",
            e.base_url()
        ),
        Some(token),
        &[],
    )
    .await
}

/// The `field` of every listed audience, in order.
fn listed(a: &Answer, field: &str) -> Vec<String> {
    a.body["data"]
        .as_array()
        .expect("a data array")
        .iter()
        .map(|x| x[field].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn listing_gives_the_accounts_audiences_newest_first_with_the_requested_fields() {
    let e = emulator(Config::default()).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(create_named(&e, ACCOUNT, &format!("A{i}"), &format!("audience {i}")).await);
    }
    ids.reverse();
    let calls_before = e.account_stats(ACCOUNT).0;

    let read = list(&e, ACCOUNT, TOKEN, "fields=name,description,time_created").await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(listed(&read, "id"), ids, "newest first");
    assert_eq!(listed(&read, "name"), ["A2", "A1", "A0"]);
    assert_eq!(listed(&read, "description")[0], "audience 2");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    for audience in read.body["data"].as_array().expect("data") {
        let mut keys: Vec<&str> = audience
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(keys, ["description", "id", "name", "time_created"]);
        let created = audience["time_created"].as_u64().expect("unix seconds");
        assert!(created <= now && now - created < 600, "{audience}");
    }
    assert!(
        read.body["paging"].get("next").is_none(),
        "one page holds 3"
    );
    assert_eq!(
        e.account_stats(ACCOUNT).0,
        calls_before + 1,
        "a listing counts against the ad account's budget"
    );
    assert!(read.headers.contains_key("x-business-use-case-usage"));
    assert!(read.headers.contains_key("x-ad-account-usage"));

    let bare = list(&e, ACCOUNT, TOKEN, "").await;
    assert_eq!(
        bare.body["data"][0],
        json!({ "id": ids[0] }),
        "without fields, ids only"
    );
    let unknown = list(&e, ACCOUNT, TOKEN, "fields=name,secret").await;
    assert_eq!((unknown.status, code(&unknown)), (400, (100, None)));
}

#[tokio::test]
async fn pagination_walks_every_audience_once() {
    let e = emulator(Config::default()).await;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(create_named(&e, ACCOUNT, &format!("P{i}"), "paged").await);
    }
    created.reverse();

    // Following `next` as it comes: it carries the token, so no header is needed.
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut page = list(&e, ACCOUNT, TOKEN, "fields=name&limit=3").await;
    loop {
        assert_eq!(page.status, 200, "{}", page.body);
        let ids = listed(&page, "id");
        sizes.push(ids.len());
        seen.extend(ids);
        match page.body["paging"]["next"].as_str() {
            Some(next) => {
                assert!(
                    next.contains("limit=3") && next.contains("fields=name"),
                    "{next}"
                );
                page = call(reqwest::Method::GET, next.to_owned(), None, &[]).await;
            }
            None => break,
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen, created, "every audience once, newest first");

    // The same walk by the `after` cursor, the token in the header.
    let mut by_cursor = Vec::new();
    let mut query = "limit=2".to_owned();
    loop {
        let page = list(&e, ACCOUNT, TOKEN, &query).await;
        by_cursor.extend(listed(&page, "id"));
        if page.body["paging"].get("next").is_none() {
            break;
        }
        let after = page.body["paging"]["cursors"]["after"]
            .as_str()
            .expect("an after cursor");
        query = format!("limit=2&after={}", urlencode(after));
    }
    assert_eq!(by_cursor, created);

    let forged = list(&e, ACCOUNT, TOKEN, &format!("after={}", created[0])).await;
    assert_eq!(code(&forged), (100, None), "a cursor is opaque, not an id");
}

/// Percent-encodes a cursor for a query string (base64 holds `+`, `/` and `=`).
fn urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[tokio::test]
async fn another_accounts_audiences_are_not_listed() {
    let e = emulator(Config::default()).await;
    e.add_ad_account(AdAccountSeed::new("5005"));
    e.add_token(TokenSeed::user(TOKEN, &[ACCOUNT, "3003", "5005"]));
    let ours = create_named(&e, ACCOUNT, "ours", "2002's").await;
    let theirs = create_named(&e, "5005", "theirs", "5005's").await;

    let listing = list(&e, ACCOUNT, TOKEN, "fields=name").await;
    assert_eq!(
        listing.body["data"],
        json!([{ "id": ours, "name": "ours" }])
    );
    let other = list(&e, "5005", TOKEN, "fields=name").await;
    assert_eq!(
        other.body["data"],
        json!([{ "id": theirs, "name": "theirs" }])
    );

    let foreign_cursor = other.body["paging"]["cursors"]["after"]
        .as_str()
        .expect("a cursor")
        .to_owned();
    let crossed = list(
        &e,
        ACCOUNT,
        TOKEN,
        &format!("after={}", urlencode(&foreign_cursor)),
    )
    .await;
    assert_eq!(
        code(&crossed),
        (100, None),
        "a cursor of another account's listing"
    );

    e.add_ad_account(AdAccountSeed::new("6006"));
    e.add_token(TokenSeed::user(TOKEN, &[ACCOUNT, "6006"]));
    assert_eq!(
        list(&e, "6006", TOKEN, "").await.body,
        json!({ "data": [] }),
        "no audiences, no paging"
    );
}

#[tokio::test]
async fn listing_an_account_the_token_may_not_use_is_refused_like_other_account_calls() {
    let e = emulator(Config::default()).await;
    e.add_token(TokenSeed::user("EAAother", &["4004"]));
    let _theirs = create_named(&e, ACCOUNT, "not yours", "").await;
    let (calls_before, _) = e.account_stats(ACCOUNT);

    let refused = list(&e, ACCOUNT, "EAAother", "fields=name").await;
    assert_eq!((refused.status, code(&refused)), (400, (200, None)));
    assert!(refused.body.get("data").is_none(), "{}", refused.body);
    assert_eq!(
        e.account_stats(ACCOUNT).0,
        calls_before,
        "a refused call is not charged to the account"
    );
    assert_eq!(
        code(&list(&e, "9999", TOKEN, "").await),
        (200, None),
        "an account that does not exist"
    );
    assert_eq!(code(&list(&e, ACCOUNT, "nope", "").await), (190, None));
    let old = call(
        reqwest::Method::GET,
        format!("{}/v12.0/act_{ACCOUNT}/customaudiences", e.base_url()),
        Some(TOKEN),
        &[],
    )
    .await;
    assert_eq!(code(&old), (2635, None));
}

#[tokio::test]
async fn listing_checks_appsecret_proof_and_carries_it_in_next() {
    let config = Config {
        app_secret: Some("s3cret".into()),
        require_appsecret_proof: true,
        ..Config::default()
    };
    let e = emulator(config).await;
    let proof = {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").expect("key");
        mac.update(TOKEN.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    };
    for i in 0..3 {
        let form = [
            ("name", format!("S{i}")),
            ("customer_file_source", "USER_PROVIDED_ONLY".to_owned()),
            ("appsecret_proof", proof.clone()),
        ];
        let url = format!("{}/v27.0/act_{ACCOUNT}/customaudiences", e.base_url());
        assert_eq!(
            call(reqwest::Method::POST, url, Some(TOKEN), &form)
                .await
                .status,
            200
        );
    }
    assert_eq!(code(&list(&e, ACCOUNT, TOKEN, "").await), (100, None));
    let first = list(
        &e,
        ACCOUNT,
        TOKEN,
        &format!("limit=2&appsecret_proof={proof}"),
    )
    .await;
    let next = first.body["paging"]["next"].as_str().expect("a next link");
    let second = call(reqwest::Method::GET, next.to_owned(), None, &[]).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(listed(&second, "id").len(), 1);
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_listed() {
    let e = emulator(Config::default()).await;
    e.inject_on_create([Fault::Hang { ms: 5_000 }]);
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .expect("client");
    let lost = client
        .post(format!(
            "{}/v27.0/act_{ACCOUNT}/customaudiences",
            e.base_url()
        ))
        .bearer_auth(TOKEN)
        .form(&[
            ("name", "lost answer"),
            ("customer_file_source", "USER_PROVIDED_ONLY"),
        ])
        .send()
        .await
        .expect_err("the client times out");
    assert!(lost.is_timeout(), "{lost}");

    let found =
        audience_export_harness::app::eventually(std::time::Duration::from_secs(5), || async {
            let page = list(&e, ACCOUNT, TOKEN, "fields=name").await;
            listed(&page, "name")
                .contains(&"lost answer".to_owned())
                .then_some(())
        })
        .await;
    assert!(
        found.is_some(),
        "a hung create was applied: the listing shows it"
    );
    assert_eq!(e.audiences().len(), 1);
    assert_eq!(
        create(&e, ACCOUNT, TOKEN).await.status,
        200,
        "the fault was for one create only"
    );
}

#[tokio::test]
async fn create_faults_that_are_errors_or_resets_create_nothing() {
    let e = emulator(Config::default()).await;
    e.inject_on_create([Fault::Http500, Fault::Reset]);
    let failed = create(&e, ACCOUNT, TOKEN).await;
    assert_eq!((failed.status, code(&failed)), (500, (1, None)));
    let reset = reqwest::Client::new()
        .post(format!(
            "{}/v27.0/act_{ACCOUNT}/customaudiences",
            e.base_url()
        ))
        .bearer_auth(TOKEN)
        .form(&[
            ("name", "cut"),
            ("customer_file_source", "USER_PROVIDED_ONLY"),
        ])
        .send()
        .await;
    let cut = match reset {
        Ok(response) => response.bytes().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(cut.is_err(), "the connection is cut");
    assert!(e.audiences().is_empty());
    assert_eq!(
        list(&e, ACCOUNT, TOKEN, "").await.body,
        json!({ "data": [] })
    );
}
