//! Authentication, authorization and rate limiting against the real server with real tokens:
//! HS256 with a shared secret, RS256 and ES256 from a JWKS file (`tests/keys`). Every refusal is
//! 401, 403 or 429 with the JSON error shape, never a 500, and costs nothing downstream.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use api::settings::{AuthMode, Settings};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{TestApp, spawn_app_with};

const SECRET: &str = "a-development-secret-of-at-least-32-bytes";

fn keys() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt_mode(settings: &mut Settings) {
    settings.auth.mode = AuthMode::Jwt;
    settings.auth.secret = Some(SECRET.to_owned());
    settings.auth.jwks_path = Some(keys().join("jwks.json"));
}

async fn spawn_jwt_app() -> TestApp {
    spawn_app_with(jwt_mode).await
}

/// Claims for user `sub`, valid for an hour, with `scope`.
fn claims(sub: &str, scope: &str) -> Value {
    json!({ "sub": sub, "exp": now() + 3600, "iat": now(), "scope": scope })
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn signed(claims: &Value, algorithm: Algorithm, kid: &str) -> String {
    let key = match algorithm {
        Algorithm::RS256 => {
            EncodingKey::from_rsa_der(&std::fs::read(keys().join("rsa.der")).unwrap())
        }
        _ => EncodingKey::from_ec_der(&std::fs::read(keys().join("ec.der")).unwrap()),
    };
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn get_with(app: &TestApp, path: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut request = app.http.get(app.url(path));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.unwrap()
}

async fn dashboard(app: &TestApp, user: u64, token: &str) -> reqwest::Response {
    get_with(
        app,
        &format!("/api/users/{user}/dashboard"),
        Some(&format!("Bearer {token}")),
    )
    .await
}

/// The status, the `WWW-Authenticate` header and the error code of a refusal, after checking
/// that its body is the JSON error shape.
async fn refusal(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "error", "{body}");
    let code = body["error"]["code"].as_str().unwrap().to_owned();
    assert!(body["error"]["message"].as_str().is_some(), "{body}");
    (status, challenge, code)
}

#[tokio::test]
async fn a_token_reads_its_own_users_dashboard_and_not_another() {
    let app = spawn_jwt_app().await;
    let token = hs256(&claims("1", ""), SECRET.as_bytes());
    let own = dashboard(&app, 1, &token).await;
    assert_eq!(own.status(), 200);
    assert_eq!(own.headers()["cache-control"], "no-store");

    let (status, challenge, code) = refusal(dashboard(&app, 2, &token).await).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    assert!(challenge.contains("dashboards:read"), "{challenge}");

    let reader = hs256(&claims("service-a", "dashboards:read"), SECRET.as_bytes());
    assert_eq!(dashboard(&app, 2, &reader).await.status(), 200);
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_against_the_jwks() {
    let app = spawn_jwt_app().await;
    let rs = signed(&claims("1", ""), Algorithm::RS256, "rsa-1");
    let es = signed(&claims("1", ""), Algorithm::ES256, "ec-1");
    assert_eq!(dashboard(&app, 1, &rs).await.status(), 200);
    assert_eq!(dashboard(&app, 1, &es).await.status(), 200);
    // The right key under the wrong kid does not verify.
    let swapped = signed(&claims("1", ""), Algorithm::ES256, "rsa-1");
    assert_eq!(refusal(dashboard(&app, 1, &swapped).await).await.0, 401);
    let unknown = signed(&claims("1", ""), Algorithm::RS256, "rsa-2");
    assert_eq!(refusal(dashboard(&app, 1, &unknown).await).await.0, 401);
}

#[tokio::test]
async fn forged_none_and_confused_tokens_are_refused() {
    let app = spawn_jwt_app().await;
    let forged = hs256(
        &claims("1", "dashboards:read"),
        b"another-secret-another-secret-another",
    );
    // alg none: a header and claims with an empty signature.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("1", "").to_string().as_bytes())
    );
    // Algorithm confusion: HS256 "signed" with the RSA public key as the secret, naming the RSA
    // key's kid (and without a kid, where the real HS256 secret is used).
    let public = std::fs::read(keys().join("rsa.pub.pem")).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".to_owned());
    let confused = jsonwebtoken::encode(
        &header,
        &claims("1", ""),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    let confused_no_kid = hs256(&claims("1", ""), &public);
    for token in [forged, none, confused, confused_no_kid] {
        let (status, challenge, code) = refusal(dashboard(&app, 1, &token).await).await;
        assert_eq!((status, code.as_str()), (401, "unauthorized"), "{token}");
        assert!(challenge.contains("invalid_token"), "{challenge}");
    }
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_refused_with_leeway() {
    let app = spawn_jwt_app().await;
    let mut expired = claims("1", "");
    expired["exp"] = json!(now() - 120);
    let mut within_leeway = claims("1", "");
    within_leeway["exp"] = json!(now() - 5);
    let mut early = claims("1", "");
    early["nbf"] = json!(now() + 600);
    let mut no_exp = claims("1", "");
    no_exp.as_object_mut().unwrap().remove("exp");
    for (token, says) in [
        (hs256(&expired, SECRET.as_bytes()), "expired"),
        (hs256(&early, SECRET.as_bytes()), "not valid yet"),
        (hs256(&no_exp, SECRET.as_bytes()), "required claim"),
    ] {
        let response = dashboard(&app, 1, &token).await;
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    let token = hs256(&within_leeway, SECRET.as_bytes());
    assert_eq!(dashboard(&app, 1, &token).await.status(), 200);
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let app = spawn_app_with(|settings| {
        jwt_mode(settings);
        settings.auth.issuer = Some("https://auth.example.com/".to_owned());
        settings.auth.audience = Some("dashboard".to_owned());
    })
    .await;
    let with = |iss: &str, aud: &str| {
        let mut c = claims("1", "");
        c["iss"] = json!(iss);
        c["aud"] = json!(aud);
        hs256(&c, SECRET.as_bytes())
    };
    let good = with("https://auth.example.com/", "dashboard");
    assert_eq!(dashboard(&app, 1, &good).await.status(), 200);
    for token in [
        with("https://evil.example.com/", "dashboard"),
        with("https://auth.example.com/", "billing"),
        hs256(&claims("1", ""), SECRET.as_bytes()),
    ] {
        assert_eq!(refusal(dashboard(&app, 1, &token).await).await.0, 401);
    }
}

#[tokio::test]
async fn missing_empty_foreign_and_malformed_headers_are_401_with_a_challenge() {
    let app = spawn_jwt_app().await;
    let long = format!("Bearer {}", "a".repeat(9 * 1024));
    for header in [
        None,
        Some(""),
        Some("Basic dXNlcjpwYXNz"),
        Some("Bearer"),
        Some("Bearer "),
        Some("Bearer not.a.jwt"),
        Some("Bearer a.b"),
        Some(long.as_str()),
    ] {
        let response = get_with(&app, "/api/users/1/dashboard", header).await;
        let (status, challenge, code) = refusal(response).await;
        assert_eq!((status, code.as_str()), (401, "unauthorized"), "{header:?}");
        assert!(
            challenge.starts_with("Bearer realm=\"dashboard\""),
            "{challenge}"
        );
    }
}

#[tokio::test]
async fn the_batch_needs_its_scope() {
    let app = spawn_jwt_app().await;
    let body = r#"{"user_ids":[1,2]}"#;
    let post = |token: String| {
        app.http
            .post(app.url("/api/users/batch"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let reader = hs256(&claims("svc", "dashboards:read"), SECRET.as_bytes());
    let (status, challenge, _) = refusal(post(reader).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(challenge.contains("users:batch"), "{challenge}");
    let batcher = hs256(&claims("svc", "users:batch"), SECRET.as_bytes());
    let response = post(batcher).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    // Without a token the body is not even read: 401, not a parse error.
    let anonymous = app
        .http
        .post(app.url("/api/users/batch"))
        .header("content-type", "application/json")
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(anonymous).await.0, 401);
}

#[tokio::test]
async fn a_refused_request_costs_nothing_downstream() {
    let app = spawn_jwt_app().await;
    let before = app.state.service.gauges();
    let upstream_before = app.upstream.stats().requests;
    let other = hs256(&claims("1", ""), SECRET.as_bytes());
    for user in 2..40 {
        assert_eq!(dashboard(&app, user, &other).await.status(), 403);
        assert_eq!(dashboard(&app, user, "garbage").await.status(), 401);
    }
    let after = app.state.service.gauges();
    assert_eq!(
        app.upstream.stats().requests,
        upstream_before,
        "no upstream call"
    );
    assert_eq!(after.pool_size, before.pool_size, "no connection opened");
    assert_eq!(after.slots_in_use, 0);
    assert_eq!(after.live_children, before.live_children, "no task spawned");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let ran: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("dashboard_source_duration_seconds_count") && !l.ends_with(" 0"))
        .collect();
    assert!(ran.is_empty(), "a source ran: {ran:?}");
}

#[tokio::test]
async fn tokens_never_reach_logs_metrics_or_error_messages() {
    // Every log line of this process, at debug level (nextest runs each test in a process of
    // its own, so this subscriber is the only one).
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let app = spawn_jwt_app().await;
    let good = hs256(&claims("1", ""), SECRET.as_bytes());
    let bad = hs256(&claims("1", ""), b"wrong-secret-wrong-secret-wrong-secret");
    let mut texts = Vec::new();
    for token in [&good, &bad] {
        for path in ["/api/users/1/dashboard", "/api/users/2/dashboard", "/nope"] {
            let response = get_with(&app, path, Some(&format!("Bearer {token}"))).await;
            texts.push(response.text().await.unwrap());
        }
    }
    texts.push(app.get("/metrics").await.text().await.unwrap());
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(!logs.is_empty(), "no log line was captured");
    for token in [&good, &bad] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!logs.contains(signature), "a token reached the logs");
        assert!(!logs.contains(SECRET), "the secret reached the logs");
        for text in &texts {
            assert!(
                !text.contains(signature),
                "a token reached a response: {text}"
            );
        }
    }
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after_per_subject() {
    let app = spawn_app_with(|settings| {
        jwt_mode(settings);
        settings.rate_limit.per_second = 1;
        settings.rate_limit.burst = 3;
    })
    .await;
    let one = hs256(&claims("1", ""), SECRET.as_bytes());
    let two = hs256(&claims("2", ""), SECRET.as_bytes());
    for _ in 0..3 {
        assert_eq!(dashboard(&app, 1, &one).await.status(), 200);
    }
    let limited = dashboard(&app, 1, &one).await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let (status, _, code) = refusal(limited).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    // Another subject has its own bucket.
    assert_eq!(dashboard(&app, 2, &two).await.status(), 200);
}

#[tokio::test]
async fn anonymous_clients_are_limited_by_address() {
    let app = spawn_app_with(|settings| {
        settings.rate_limit.per_second = 1;
        settings.rate_limit.burst = 2;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(app.get("/api/users/1/dashboard").await.status(), 200);
    }
    let limited = app.get("/api/users/1/dashboard").await;
    assert_eq!(refusal(limited).await.0, 429);
    // A forwarded address from an untrusted peer changes nothing.
    let spoofed = app
        .http
        .get(app.url("/api/users/1/dashboard"))
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), 429);
}

#[tokio::test]
async fn the_openapi_document_declares_the_bearer_scheme_in_jwt_mode() {
    let app = spawn_jwt_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let operation = &doc["paths"]["/api/users/{user_id}/dashboard"]["get"];
    assert_eq!(operation["security"][0]["bearer"], json!([]));
    for status in ["401", "403", "429"] {
        assert!(operation["responses"][status].is_object(), "{status}");
    }
    assert!(doc["paths"]["/api/users/batch"]["post"]["responses"]["403"].is_object());

    let open = support::spawn_app().await;
    let doc: Value = open.get("/openapi.json").await.json().await.unwrap();
    assert!(doc["components"]["securitySchemes"].is_null());
}

#[tokio::test]
async fn metrics_and_openapi_can_be_protected() {
    let app = spawn_app_with(|settings| {
        jwt_mode(settings);
        settings.auth.protect_metrics = true;
        settings.auth.protect_openapi = true;
    })
    .await;
    for path in ["/metrics", "/openapi.json"] {
        assert_eq!(refusal(get_with(&app, path, None).await).await.0, 401);
        let user = hs256(&claims("1", ""), SECRET.as_bytes());
        let response = get_with(&app, path, Some(&format!("Bearer {user}"))).await;
        assert_eq!(refusal(response).await.0, 403);
        let ops = hs256(&claims("prometheus", "ops:read"), SECRET.as_bytes());
        let response = get_with(&app, path, Some(&format!("Bearer {ops}"))).await;
        assert_eq!(response.status(), 200, "{path}");
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn cors_answers_only_configured_origins() {
    let app = spawn_app_with(|settings| {
        settings.cors.allowed_origins = vec!["https://app.example.com".to_owned()];
    })
    .await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/api/users/1/dashboard"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let other = preflight("https://evil.example.com").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let closed = support::spawn_app().await;
    let response = closed
        .http
        .get(closed.url("/api/users/1/dashboard"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn jwt_mode_without_a_key_does_not_start() {
    let mut settings = Settings::default();
    settings.auth.mode = AuthMode::Jwt;
    settings.server.port = 0;
    let error = api::Application::build(settings)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("needs a key"), "{error}");
    let mut settings = Settings::default();
    settings.auth.mode = AuthMode::Jwt;
    settings.auth.secret = Some("short".to_owned());
    let error = api::Application::build(settings)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("32 bytes"), "{error}");
}

#[tokio::test]
async fn a_verified_token_is_remembered_only_until_it_expires() {
    let app = spawn_app_with(|settings| {
        jwt_mode(settings);
        settings.auth.leeway = std::time::Duration::ZERO;
    })
    .await;
    let mut short = claims("1", "");
    short["exp"] = json!(now() + 2);
    let token = hs256(&short, SECRET.as_bytes());
    // Verified once, then served from the cache.
    assert_eq!(dashboard(&app, 1, &token).await.status(), 200);
    assert_eq!(dashboard(&app, 1, &token).await.status(), 200);
    // Past its expiry the remembered token is refused like any expired one.
    while now() <= short["exp"].as_u64().unwrap() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let response = dashboard(&app, 1, &token).await;
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
}
