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
