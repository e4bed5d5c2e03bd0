//! The real server on port 0, against the test PostgreSQL and a real stand-in recommendation
//! server: the seed's endpoints, their errors, and what happens to abandoned and in-flight
//! requests.

#![allow(clippy::unwrap_used)] // A failed step is a failed test; unwrap says where.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{live_children_settled, spawn_app, spawn_app_with};
use tokio::io::AsyncWriteExt;
use upstream::{Fault, Reply};

async fn json(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

/// Asserts the JSON error shape and returns the code.
async fn error_code(response: reqwest::Response) -> String {
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/json");
    let body = json(response).await;
    assert_eq!(body["status"], "error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    body["error"]["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_dashboard_has_every_field() {
    let app = spawn_app().await;
    let response = app
        .http
        .get(app.url("/api/users/1/dashboard"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let timing = response.headers()["server-timing"]
        .to_str()
        .unwrap()
        .to_owned();
    for source in ["profile", "orders", "reviews", "recommendations"] {
        assert!(timing.contains(&format!("{source};dur=")), "{timing}");
    }
    let body = json(response).await;
    assert_eq!(body["status"], "success");
    let data = &body["data"];
    assert_eq!(
        data["profile"],
        serde_json::json!({"id": 1, "username": "ada", "email": "ada@example.com", "avatar": "https://img/ada.png"})
    );
    assert_eq!(data["orders"].as_array().unwrap().len(), 2);
    assert_eq!(data["orders"][0]["product"], "mouse");
    assert_eq!(data["orders"][0]["amount"], "0.10");
    assert_eq!(data["orders"][0]["created_at"], "2025-03-04T10:00:00Z");
    assert_eq!(data["reviews"][0]["rating"], 5);
    assert_eq!(data["recommendations"].as_array().unwrap().len(), 10);
    assert!(data["recommendations"][0]["product_id"].is_i64());
    assert_eq!(data["errors"], serde_json::json!([]));

    // Without an incoming id, one is made up and returned.
    let response = app.get("/api/users/2/dashboard").await;
    assert_eq!(response.headers()["x-request-id"].len(), 16);
}

#[tokio::test]
async fn an_unknown_user_is_404() {
    let app = spawn_app().await;
    app.upstream
        .set_user_reply(404, Reply::ok().after(Duration::from_secs(30)));
    let response = app.get("/api/users/404/dashboard").await;
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(response).await, "user_not_found");
    // The slow recommendation call was cancelled, not waited for.
    assert_eq!(live_children_settled().await, 0);
}

#[tokio::test]
async fn a_hanging_upstream_gives_200_with_a_recommendations_timeout() {
    let app = spawn_app().await;
    app.upstream.set_user_reply(1, Reply::fault(Fault::Hang));
    let response = app.get("/api/users/1/dashboard").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["server-timing"]
            .to_str()
            .unwrap()
            .contains("recommendations;dur=")
    );
    let body = json(response).await;
    assert_eq!(body["data"]["profile"]["id"], 1);
    assert_eq!(body["data"]["recommendations"], serde_json::json!([]));
    assert_eq!(
        body["data"]["errors"],
        serde_json::json!([{
            "source": "recommendations",
            "kind": "timeout",
            "error": "timed out after 300ms (recommendations timeout)"
        }])
    );
}

#[tokio::test]
async fn a_failing_query_gives_a_partial_200() {
    let app = spawn_app().await;
    let admin = repository::connect(&app.db.config()).await.unwrap();
    admin
        .batch_execute("ALTER TABLE reviews RENAME TO reviews_gone")
        .await
        .unwrap();
    let response = app.get("/api/users/1/dashboard").await;
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(body["data"]["orders"].as_array().unwrap().len(), 2);
    let errors = body["data"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["source"], "reviews");
    assert_eq!(errors[0]["kind"], "query");
    assert_eq!(errors[0]["error"], "database query failed (SQLSTATE 42P01)");
}

#[tokio::test]
async fn a_database_that_stops_answering_gives_503_with_retry_after() {
    let app = spawn_app_with(|settings| {
        settings.service.db_slot_wait = Duration::from_millis(500);
        settings.database.create_timeout = Duration::from_millis(500);
    })
    .await;
    // Refuse new connections to the test database and end the pooled ones.
    let admin = repository::connect(&app.db.admin_config()).await.unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{0}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}';",
            app.db.name()
        ))
        .await
        .unwrap();
    let mut last = None;
    // A connection killed under a request fails that request; within a few requests every
    // pooled connection is gone and each answer is a 503.
    for _ in 0..5 {
        let response = app.get("/api/users/1/dashboard").await;
        last = Some((
            response.status(),
            response.headers().get("retry-after").cloned(),
            error_code(response).await,
        ));
    }
    let (status, retry_after, code) = last.unwrap();
    assert_eq!(status, 503);
    assert_eq!(retry_after.unwrap(), "1");
    assert_eq!(code, "unavailable");

    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    assert_eq!(error_code(response).await, "unavailable");

    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            app.db.name()
        ))
        .await
        .unwrap();
    // The readiness check above found the database down, so reads fail fast; the failures made
    // the primary watched, and a background check finds it back within
    // database.health_check_interval (1 s), with no readiness request needed (bounded wait).
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while app.get("/api/users/1/dashboard").await.status() != 200 {
        assert!(std::time::Instant::now() < give_up, "reads never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.get("/readyz").await.status(), 200);
}

#[tokio::test]
async fn bad_user_ids_are_400() {
    let app = spawn_app().await;
    for id in [
        "abc",
        "-1",
        "0",
        "99999999999999999999",
        "1.5",
        "%20",
        "1e3",
        "+7",
        "01",
    ] {
        let response = app.get(&format!("/api/users/{id}/dashboard")).await;
        assert_eq!(response.status(), 400, "{id}");
        assert_eq!(error_code(response).await, "invalid_user_id", "{id}");
    }
}

#[tokio::test]
async fn bad_batches_are_4xx_with_the_json_shape() {
    let app = spawn_app().await;
    let thousand_and_one = format!("{{\"user_ids\":[{}]}}", vec!["1"; 1001].join(","));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("no ids", r#"{"user_ids":[]}"#.into(), 400, "invalid_batch"),
        ("1001 ids", thousand_and_one, 400, "invalid_batch"),
        (
            "strings",
            r#"{"user_ids":["1","2"]}"#.into(),
            400,
            "invalid_batch",
        ),
        (
            "nulls",
            r#"{"user_ids":[1,null]}"#.into(),
            400,
            "invalid_batch",
        ),
        (
            "floats",
            r#"{"user_ids":[1.5]}"#.into(),
            400,
            "invalid_batch",
        ),
        (
            "negative",
            r#"{"user_ids":[-3]}"#.into(),
            400,
            "invalid_batch",
        ),
        ("zero", r#"{"user_ids":[0]}"#.into(), 400, "invalid_batch"),
        (
            "too big",
            r#"{"user_ids":[99999999999999999999]}"#.into(),
            400,
            "invalid_batch",
        ),
        (
            "missing field",
            r#"{"ids":[1]}"#.into(),
            400,
            "invalid_batch",
        ),
        ("not an object", "[1,2]".into(), 400, "invalid_batch"),
        (
            "malformed",
            r#"{"user_ids":[1,"#.into(),
            400,
            "invalid_json",
        ),
        ("empty body", String::new(), 400, "invalid_json"),
        (
            "over the limit",
            format!("{{\"user_ids\":[{}]}}", vec!["1"; 40_000].join(",")),
            413,
            "payload_too_large",
        ),
    ];
    for (name, body, status, code) in cases {
        let response = app.post_json("/api/users/batch", &body).await;
        assert_eq!(response.status(), status, "{name}");
        assert_eq!(error_code(response).await, code, "{name}");
    }

    let response = app
        .http
        .post(app.url("/api/users/batch"))
        .header("content-type", "text/plain")
        .body(r#"{"user_ids":[1]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(error_code(response).await, "unsupported_media_type");
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_are_json() {
    let app = spawn_app().await;
    let response = app.get("/nope").await;
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(response).await, "not_found");
    let response = app.get("/api/users/batch").await;
    assert_eq!(response.status(), 405);
    assert_eq!(error_code(response).await, "method_not_allowed");
    let response = app
        .http
        .delete(app.url("/api/users/1/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, HEAD");
    assert_eq!(error_code(response).await, "method_not_allowed");
    let response = app.get("/api/users/batch").await;
    assert_eq!(response.headers()["allow"], "POST");
}

#[tokio::test]
async fn get_routes_answer_head_without_a_body() {
    let app = spawn_app().await;
    for path in ["/healthz", "/readyz", "/metrics", "/api/users/1/dashboard"] {
        let get = app.get(path).await;
        assert_eq!(get.status(), 200, "{path}");
        let head = app.http.head(app.url(path)).send().await.unwrap();
        assert_eq!(head.status(), 200, "{path}");
        assert_eq!(
            head.headers().get("content-type"),
            get.headers().get("content-type"),
            "{path}"
        );
        assert!(head.bytes().await.unwrap().is_empty(), "{path}");
    }
    let head = app
        .http
        .head(app.url("/api/users/77/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404);
}

/// Sends raw bytes on one connection and reads until the server closes it (or 10 s pass).
async fn raw_exchange(app: &support::TestApp, request: &[u8]) -> String {
    let mut tcp = tokio::net::TcpStream::connect(app.address).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt as _;
        tcp.read_to_end(&mut answer).await
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_request_framed_two_ways_is_refused_and_what_follows_it_is_not_served() {
    let app = spawn_app().await;
    let smuggled = "GET /api/users/1/dashboard HTTP/1.1\r\nhost: a\r\n\r\n";
    let body = format!("0\r\n\r\n{smuggled}");
    let request = format!(
        "POST /api/users/batch HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n\
         content-length: {}\r\ntransfer-encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_exchange(&app, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("ambiguous_framing"), "{answer}");
    assert_smuggled_request_not_run(&answer);
}

/// actix-http may still write an answer for a request it had read behind one that closes the
/// connection; that answer must be a refusal, not the request's result.
fn assert_smuggled_request_not_run(answer: &str) {
    assert!(!answer.contains(r#""status":"success""#), "{answer}");
    let answers = answer.matches("HTTP/1.1 ").count();
    assert!(
        answers == 1 || answer.contains("connection_closing"),
        "{answer}"
    );
}

#[tokio::test]
async fn requests_pipelined_after_a_connection_close_are_not_run() {
    let app = spawn_app().await;
    let answer = raw_exchange(
        &app,
        b"GET /healthz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n\
          GET /api/users/1/dashboard HTTP/1.1\r\nhost: a\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains(r#"{"status":"ok"}"#), "{answer}");
    assert_smuggled_request_not_run(&answer);
    // The series exists from the start (its handle is resolved once); no dashboard was counted.
    let metrics = app.state.metrics.render(&app.state.service, 0);
    let dashboards = metrics
        .lines()
        .find(|l| {
            l.starts_with("http_request_duration_seconds_count{")
                && l.contains("dashboard\",method=\"GET\",status=\"200\"")
        })
        .unwrap_or_else(|| panic!("no dashboard count in {metrics}"));
    assert!(dashboards.ends_with("} 0"), "{dashboards}");
}

#[tokio::test]
async fn an_encoded_body_is_refused_not_misread() {
    let app = spawn_app().await;
    for (encoding, status) in [("gzip", 415), ("br", 415), ("identity", 200)] {
        let response = app
            .http
            .post(app.url("/api/users/batch"))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(r#"{"user_ids":[1]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{encoding}");
        if status == 415 {
            assert_eq!(error_code(response).await, "unsupported_content_encoding");
        }
    }
}

#[tokio::test]
async fn an_http_1_1_request_needs_exactly_one_host() {
    let app = spawn_app().await;
    for request in [
        "GET /healthz HTTP/1.1\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
    ] {
        let answer = raw_exchange(&app, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{request:?}: {answer}");
        assert!(answer.contains("invalid_host"), "{answer}");
    }
    // HTTP/1.0 has no such rule.
    let answer = raw_exchange(&app, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200 "), "{answer}");
}

#[tokio::test]
async fn a_batch_answers_in_input_order() {
    let app = spawn_app().await;
    let response = app
        .post_json("/api/users/batch", r#"{"user_ids":[3,1,77,3]}"#)
        .await;
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(body["status"], "success");
    let results = body["data"]["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["user_id"], 3);
    assert_eq!(results[0]["order_count"], 1);
    assert_eq!(results[0]["total_amount"], "15.00");
    assert_eq!(results[1]["user_id"], 1);
    assert_eq!(results[1]["total_amount"], "50.09");
    assert_eq!(results[1]["profile"]["username"], "ada");
    assert_eq!(
        body["data"]["errors"],
        serde_json::json!([{"user_id": 77, "kind": "not_found", "error": "user not found"}])
    );
}

#[tokio::test]
async fn a_batch_that_summarised_nobody_because_of_overload_is_503_not_an_empty_success() {
    let app = spawn_app_with(|settings| {
        settings.service.batch.chunk_timeout = Duration::from_millis(300);
    })
    .await;
    // Every chunk's statement waits on the lock past the chunk timeout.
    let lock = testkit::TableLock::take(&app.db, "users").await;
    let response = app
        .post_json("/api/users/batch", r#"{"user_ids":[1,2,77]}"#)
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(error_code(response).await, "unavailable");
    lock.release().await;

    // Unknown users only are a plain answer, not overload.
    let response = app
        .post_json("/api/users/batch", r#"{"user_ids":[77,78]}"#)
        .await;
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(body["data"]["results"], serde_json::json!([]));
    assert_eq!(body["data"]["errors"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn two_workers_share_the_database_limit_and_return_every_slot() {
    let app = spawn_app_with(|settings| {
        settings.server.workers = 2;
        settings.database.max_size = 4;
        settings.service.db_concurrency = 3;
    })
    .await;
    let requests = (0..60).map(|i| {
        let http = app.http.clone();
        let url = app.url(&format!("/api/users/{}/dashboard", 1 + i % 3));
        async move { http.get(url).send().await.unwrap().status() }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let service = &app.state.service;
    assert_eq!(service.gauges().slots, 3);
    assert_eq!(service.gauges().lanes, 2);
    let gauges = service.gauges();
    assert_eq!(gauges.pool_max, 4);
    assert!(
        gauges.pool_size <= 3,
        "at most one connection per slot is ever needed: {gauges:?}"
    );
    // Released as the answers went out; the last ones may still be on their way back.
    for _ in 0..200 {
        if service.gauges().slots_in_use == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(service.gauges().slots_in_use, 0);
}

#[tokio::test]
async fn a_client_that_disconnects_leaves_no_live_children() {
    let app = spawn_app_with(|settings| {
        settings.service.dashboard.recommendations_timeout = Duration::from_secs(30);
        settings.service.dashboard.deadline = Duration::from_secs(30);
    })
    .await;
    app.upstream
        .set_user_reply(1, Reply::ok().after(Duration::from_secs(30)));
    let mut tcp = tokio::net::TcpStream::connect(app.address).await.unwrap();
    tcp.write_all(b"GET /api/users/1/dashboard HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    // Wait until the handler's group has children, then go away.
    for _ in 0..500 {
        if taskgroup::live_children() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(taskgroup::live_children() > 0, "the request never started");
    drop(tcp);
    assert_eq!(live_children_settled().await, 0);
    // The database slot goes with its connection, once the abandoned statements have settled
    // (or been cancelled): poll, with a bound.
    for _ in 0..300 {
        if app.state.service.gauges().slots_in_use == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.state.service.gauges().slots_in_use, 0);
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let app = spawn_app_with(|settings| {
        settings.service.dashboard.recommendations_timeout = Duration::from_secs(5);
    })
    .await;
    app.upstream
        .set_user_reply(1, Reply::ok().after(Duration::from_millis(500)));
    let request = tokio::spawn({
        let http = app.http.clone();
        let url = app.url("/api/users/1/dashboard");
        async move { http.get(url).send().await }
    });
    for _ in 0..500 {
        if taskgroup::live_children() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.handle.shutdown().await;
    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(
        body["data"]["recommendations"].as_array().unwrap().len(),
        10
    );
    assert!(body["data"]["errors"].as_array().unwrap().is_empty());
    app.server.await.unwrap().unwrap();
    assert!(app.state.service.gauges().pool_closed);
    // Once stopped, the port no longer accepts connections.
    assert!(tokio::net::TcpStream::connect(app.address).await.is_err());
}

#[tokio::test]
async fn shutdown_closes_keep_alive_connections_and_answers_what_they_sent() {
    // As on SIGTERM: the server stops through `run_until`. A keep-alive client must get its
    // in-flight answer in full, marked `Connection: close`, so that it sends nothing more on that
    // connection: under steady keep-alive load the drain would otherwise never see zero requests
    // in flight, and the grace period would end by cutting requests off.
    let app = spawn_app_with(|settings| {
        settings.service.dashboard.recommendations_timeout = Duration::from_secs(5);
    })
    .await;
    app.upstream
        .set_user_reply(1, Reply::ok().after(Duration::from_millis(500)));
    let before = app.get("/api/users/2/dashboard").await;
    assert_eq!(before.status(), 200);
    assert_ne!(
        before
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap()),
        Some("close")
    );
    let request = tokio::spawn({
        let http = app.http.clone();
        let url = app.url("/api/users/1/dashboard");
        async move { http.get(url).send().await }
    });
    for _ in 0..500 {
        if app.state.in_flight.get() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.state.in_flight.get(), 1);
    app.stop.notify_one();
    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["connection"], "close");
    let body = json(response).await;
    assert!(body["data"]["errors"].as_array().unwrap().is_empty());
    app.server.await.unwrap().unwrap();
    assert!(app.state.service.gauges().pool_closed);
    assert_eq!(app.state.in_flight.get(), 0);
}

#[tokio::test]
async fn a_body_sent_too_slowly_is_cut_off_with_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // actix times out slow headers but not slow bodies: the body gets the same limit.
    let app = spawn_app_with(|settings| {
        settings.server.client_request_timeout = Duration::from_millis(300);
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(app.address).await.unwrap();
    tcp.write_all(
        b"POST /api/users/batch HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"user_ids\":[1",
    )
    .await
    .unwrap();
    // The rest of the body never comes. The server answers and closes the connection; the
    // outer timeout only keeps a regression from hanging the test run.
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_string(&mut answer))
        .await
        .expect("the server never cut the slow body off")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert_eq!(live_children_settled().await, 0);
}

#[tokio::test]
async fn openapi_lists_every_route() {
    let app = spawn_app().await;
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    let document = json(response).await;
    let mut paths: Vec<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        vec![
            "/api/users/batch",
            "/api/users/{user_id}/dashboard",
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/readyz"
        ]
    );
    let dashboard = &document["paths"]["/api/users/{user_id}/dashboard"]["get"];
    for status in ["200", "400", "404", "503", "504"] {
        assert!(dashboard["responses"].get(status).is_some(), "{status}");
    }
    let schemas = document["components"]["schemas"].as_object().unwrap();
    for schema in [
        "Dashboard",
        "BatchSummary",
        "BatchRequest",
        "ErrorBody",
        "SourceFailure",
    ] {
        assert!(schemas.contains_key(schema), "{schema}");
    }
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["status"], "ok");
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["status"], "ready");
}

/// Checks every line against the text exposition format: comments, or
/// `name{label="value",...} number`.
fn assert_prometheus_text(text: &str) {
    let name_ok = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if line.is_empty() || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let keyword = words.next().unwrap();
            assert!(
                matches!(keyword, "HELP" | "TYPE" | "UNIT"),
                "bad comment: {line}"
            );
            assert!(name_ok(words.next().unwrap()), "bad name: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(
            value.parse::<f64>().is_ok() || matches!(value, "+Inf" | "-Inf" | "NaN"),
            "bad value: {line}"
        );
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap();
                for pair in labels.split("\",") {
                    let (key, value) = pair.split_once('=').unwrap();
                    assert!(name_ok(key), "bad label: {line}");
                    assert!(value.starts_with('"'), "bad label value: {line}");
                }
                name
            }
            None => series,
        };
        assert!(name_ok(name), "bad series: {line}");
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_promised_series() {
    let app = spawn_app().await;
    app.upstream.set_user_reply(1, Reply::fault(Fault::Hang));
    assert_eq!(app.get("/api/users/1/dashboard").await.status(), 200);
    assert_eq!(app.get("/api/users/x/dashboard").await.status(), 400);
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_prometheus_text(&text);
    for series in [
        r#"http_request_duration_seconds_count{route="/api/users/{user_id}/dashboard",method="GET",status="200"} 1"#,
        r#"http_request_duration_seconds_count{route="/api/users/{user_id}/dashboard",method="GET",status="400"} 1"#,
        r#"dashboard_source_duration_seconds_count{source="recommendations",status="timeout"} 1"#,
        r#"dashboard_source_duration_seconds_count{source="profile",status="ok"} 1"#,
        r#"dashboard_source_errors_total{source="recommendations",kind="timeout"} 1"#,
        "db_pool_max_size 20",
        "db_pool_idle ",
        "db_pool_waiting 0",
        "taskgroup_live_children ",
        "recommendations_breaker_state 0",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
}

#[tokio::test]
async fn secrets_never_reach_responses_or_metrics() {
    let app = spawn_app_with(|settings| {
        settings.database.password = Some(repository::Secret::new("hunter2-secret"));
    })
    .await;
    // The test cluster's real password travels in the URL.
    let url = app.db.url().to_owned();
    let real = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password.to_owned())
        .unwrap();
    assert!(real.len() >= 8);
    for path in [
        "/metrics",
        "/openapi.json",
        "/readyz",
        "/api/users/1/dashboard",
        "/nope",
    ] {
        let text = app.get(path).await.text().await.unwrap();
        assert!(
            !text.contains("hunter2-secret"),
            "{path} leaks the password"
        );
        assert!(!text.contains(&real), "{path} leaks the password");
    }
}

#[test]
fn sigterm_while_waiting_for_the_database_at_start_up_stops_the_process() {
    // A database address that accepts nothing; the start-up wait would last five minutes.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unused.local_addr().unwrap().port();
    drop(unused);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .env(
            "APP__DATABASE__URL",
            format!("postgres://x@127.0.0.1:{port}/x"),
        )
        .env("APP__STARTUP__DB_WAIT", "300s")
        .env("APP__SERVER__PORT", "0")
        .env(
            "APP_CONFIG_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../config"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let it reach the wait (it logs each failed attempt), bounded.
    let stdout = child.stdout.take().unwrap();
    let (waiting, reached) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            if let Ok(line) = line
                && line.contains("not answering")
            {
                let _ = waiting.send(line);
            }
        }
    });
    let line = reached
        .recv_timeout(Duration::from_secs(60))
        .expect("the API never reported waiting for its database");
    // Not a terminal: plain text, no colour codes for a log collector to store.
    assert!(!line.contains('\x1b'), "{line:?}");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Bounded: a process that ignored SIGTERM would still be waiting for its database.
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < give_up, "SIGTERM ignored");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
