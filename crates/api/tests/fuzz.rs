//! Property test of the whole request surface against the real server: random methods, paths,
//! ids, query strings, headers and bodies, sent as well-formed HTTP/1.1 over a raw socket. Whatever
//! the request, the server never answers 5xx, and every 4xx carries the JSON error shape.
//!
//! Requests that are not HTTP at all (a broken request line, a header with control characters)
//! are refused by actix-http's parser before the application sees them, with an empty 400; they
//! are out of scope here.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<String>,
}

fn id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (1i64..200_000).prop_map(|n| n.to_string()),
        "[0-9]{1,30}",
        "[-+.eE0-9]{1,12}",
        "[A-Za-z0-9._~%-]{0,24}",
        Just("%00".to_owned()),
        Just("%2F..%2F".to_owned()),
        Just("1%20OR%201%3D1".to_owned()),
        Just("1';DROP%20TABLE%20users;--".to_owned()),
    ]
}

fn path() -> impl Strategy<Value = String> {
    let segment = "[A-Za-z0-9._~%-]{0,16}";
    prop_oneof![
        id_text().prop_map(|id| format!("/api/users/{id}/dashboard")),
        Just("/api/users/batch".to_owned()),
        Just("/healthz".to_owned()),
        Just("/readyz".to_owned()),
        Just("/metrics".to_owned()),
        Just("/openapi.json".to_owned()),
        prop::collection::vec(segment, 0..5).prop_map(|s| format!("/{}", s.join("/"))),
        (id_text(), segment).prop_map(|(id, tail)| format!("/api/users/{id}/{tail}")),
    ]
}

fn query() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9=&%._~-]{0,40}".prop_map(|q| format!("?{q}")),
    ]
}

fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        Just("null".to_owned()),
        Just("true".to_owned()),
        "[a-z'\";-]{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("99999999999999999999999".to_owned()),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z_]{1,9}", inner), 0..4).prop_map(|kv| {
                let fields: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

fn body() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        prop::collection::vec(
            prop_oneof![
                (1i64..1000).prop_map(|n| n.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                Just("null".to_owned()),
                Just("\"7\"".to_owned()),
                Just("1.5".to_owned()),
            ],
            0..40
        )
        .prop_map(|ids| Some(format!("{{\"user_ids\":[{}]}}", ids.join(",")))),
        json_value().prop_map(Some),
        "[ -~]{0,64}".prop_map(Some),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let method = prop_oneof![
        Just("GET".to_owned()),
        Just("POST".to_owned()),
        Just("PUT".to_owned()),
        Just("DELETE".to_owned()),
        Just("PATCH".to_owned()),
        Just("OPTIONS".to_owned()),
        "[A-Z]{1,10}",
    ];
    let header = prop_oneof![
        "[ -~]{0,60}".prop_map(|v| ("x-request-id".to_owned(), v.trim().to_owned())),
        prop_oneof![
            Just("application/json"),
            Just("text/plain"),
            Just("application/json; charset=utf-8"),
            Just("application/x-www-form-urlencoded"),
            Just("*/*"),
        ]
        .prop_map(|v| ("content-type".to_owned(), v.to_owned())),
        ("x-[a-z]{1,10}", "[!-~]{0,40}"),
        Just(("accept".to_owned(), "text/html".to_owned())),
    ];
    (
        method,
        path(),
        query(),
        prop::collection::vec(header, 0..4),
        body(),
    )
        .prop_map(|(method, path, query, headers, body)| Request {
            method,
            path: format!("{path}{query}"),
            headers,
            body,
        })
}

/// Sends one request on a fresh connection and returns the status and body.
async fn send(address: std::net::SocketAddr, request: &Request) -> (u16, String, String) {
    let mut text = format!(
        "{} {} HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n",
        request.method, request.path
    );
    for (name, value) in &request.headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = request.body.clone().unwrap_or_default();
    text.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    tcp.write_all(text.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut answer))
        .await
        .expect("the server did not answer within 15 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[test]
fn no_request_gets_a_5xx_and_every_4xx_is_json() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = runtime.block_on(support::spawn_app());
    let address = app.address;
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&request(), |request| {
        let (status, content_type, body) = runtime.block_on(send(address, &request));
        prop_assert!(status != 0, "no status line for {request:?}");
        prop_assert!(status < 500, "{status} for {request:?}: {body}");
        if (400..500).contains(&status) {
            prop_assert_eq!(
                &content_type,
                "application/json",
                "{} for {:?}",
                status,
                request
            );
            let json: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| TestCaseError::fail(format!("{e}: {body} for {request:?}")))?;
            prop_assert_eq!(&json["status"], "error");
            prop_assert!(json["error"]["code"].is_string(), "{body}");
            prop_assert!(json["error"]["message"].is_string(), "{body}");
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    // Nothing the requests did leaked a child or a database slot.
    runtime.block_on(async {
        assert_eq!(support::live_children_settled().await, 0);
        // A slot is released with its connection, after any abandoned statement settled.
        for _ in 0..300 {
            if app.state.service.gauges().slots_in_use == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert_eq!(app.state.service.gauges().slots_in_use, 0);
}
