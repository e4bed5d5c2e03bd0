//! Scenario `slow-clients`: hostile clients against an API with `server.client_request_timeout`
//! of 1 s, one worker and `server.max_connections_per_worker` of 64.
//!
//! Expected: headers dribbled a byte at a time and bodies sent a byte at a time are cut off by
//! the server within the request timeout (plus slack); oversized headers and bodies are refused
//! with 4xx; idle connections beyond the limit are not taken on (the API's open sockets stay
//! bounded) and every idle connection is closed by the server in the end.

use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Ctx;
use super::client::{self, Conn};
use super::report::{ScenarioReport, describe_latency, ms, percentiles};
use super::rig::Api;

/// `server.client_request_timeout` in this scenario.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// `server.max_connections_per_worker` in this scenario (with one worker).
const MAX_CONNECTIONS: usize = 64;
/// Slack on top of the timeout before a cut counts as late.
const SLACK: Duration = Duration::from_secs(1);
/// A slow client gives up (and counts the server as never cutting it) after this long.
const GIVE_UP: Duration = Duration::from_secs(10);

/// How a slow client's connection ended.
#[derive(Debug)]
enum Cut {
    /// The server answered (408, 4xx) and closed.
    Answered(u16, Duration),
    /// The server closed or reset the connection without an answer.
    Closed(Duration),
    /// The client gave up first: the server never cut it.
    Never,
    /// The client could not connect.
    NotConnected,
}

impl Cut {
    fn after(&self) -> Option<Duration> {
        match self {
            Cut::Answered(_, d) | Cut::Closed(d) => Some(*d),
            Cut::Never | Cut::NotConnected => None,
        }
    }

    fn label(&self, what: &str) -> String {
        match self {
            Cut::Answered(status, _) => format!("{what}: {status} then closed"),
            Cut::Closed(_) => format!("{what}: closed by the server"),
            Cut::Never => format!("{what}: never cut"),
            Cut::NotConnected => format!("{what}: not connected"),
        }
    }
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, report: &mut ScenarioReport) -> Result<()> {
    report.title =
        "slow headers and bodies, oversized headers and bodies, idle connections beyond the limit";
    let settings = [
        (
            "APP__SERVER__CLIENT_REQUEST_TIMEOUT",
            format!("{}ms", REQUEST_TIMEOUT.as_millis()),
        ),
        ("APP__SERVER__WORKERS", "1".to_owned()),
        (
            "APP__SERVER__MAX_CONNECTIONS_PER_WORKER",
            MAX_CONNECTIONS.to_string(),
        ),
    ];
    let (upstream, api) = ctx
        .stack("slow-clients", upstream::Config::default(), None, &settings)
        .await?;

    slow(&api, report, "slow headers", 16, |_| {
        (
            b"GET /healthz HTTP/1.1\r\nhost: chaos\r\nx-slow: ".to_vec(),
            b'a',
        )
    })
    .await;
    slow(&api, report, "slow body", 8, |_| {
        (
            format!("POST /api/users/batch HTTP/1.1\r\nhost: chaos\r\n{}content-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"user_ids\":[1", client::auth_line()).into_bytes(),
            b'1',
        )
    })
    .await;
    oversized(&api, report).await;
    connection_limit(&api, report).await;

    let (metrics, settle, quiet) = api
        .metrics_when(Duration::from_secs(5), |m| m.is_quiet())
        .await?;
    report.after = format!(
        "{}, open sockets {}",
        metrics.state_line(),
        api.open_sockets().map_or("?".to_owned(), |n| n.to_string())
    );
    report.check(
        "nothing left behind",
        quiet,
        format!("settled after {:.0} ms", ms(settle)),
    );
    super::stop_api(api, report).await?;
    upstream.shutdown().await;
    Ok(())
}

/// `clients` connections that send `start` and then one `byte` every 100 ms, forever; each must
/// be cut by the server within the request timeout.
async fn slow(
    api: &Api,
    report: &mut ScenarioReport,
    what: &str,
    clients: usize,
    request: impl Fn(usize) -> (Vec<u8>, u8),
) {
    let mut tasks = JoinSet::new();
    for i in 0..clients {
        let (start, byte) = request(i);
        let addr = api.addr;
        tasks.spawn(async move { dribble(addr, start, byte).await });
    }
    let mut cuts = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        cuts.push(joined.unwrap_or(Cut::NotConnected));
    }
    for cut in &cuts {
        report.count_label(cut.label(what));
    }
    let times: Vec<Duration> = cuts.iter().filter_map(Cut::after).collect();
    let latest = percentiles(times.clone()).map(|(_, _, max)| max);
    report.figure(format!("{what}: cut after {}", describe_latency(times)));
    report.check(
        format!(
            "{what}: cut by the server within the request timeout ({} ms) + {} ms",
            REQUEST_TIMEOUT.as_millis(),
            SLACK.as_millis()
        ),
        cuts.iter().all(|c| c.after().is_some())
            && latest.is_some_and(|l| l <= REQUEST_TIMEOUT + SLACK),
        format!(
            "{} of {clients} cut, latest after {}",
            cuts.iter().filter(|c| c.after().is_some()).count(),
            latest.map_or("-".to_owned(), |l| format!("{:.0} ms", ms(l)))
        ),
    );
}

/// Sends `start`, then `byte` every 100 ms, until the server answers or closes.
async fn dribble(addr: std::net::SocketAddr, start: Vec<u8>, byte: u8) -> Cut {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return Cut::NotConnected;
    };
    let began = Instant::now();
    if stream.write_all(&start).await.is_err() {
        return Cut::Closed(began.elapsed());
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        if began.elapsed() > GIVE_UP {
            return Cut::Never;
        }
        tokio::select! {
            read = stream.read(&mut chunk) => match read {
                Ok(0) | Err(_) => {
                    return match status_of(&buf) {
                        Some(status) => Cut::Answered(status, began.elapsed()),
                        None => Cut::Closed(began.elapsed()),
                    };
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            _ = tick.tick() => {
                if !buf.is_empty() {
                    // An answer has started: the server has cut the request; wait for the close,
                    // but not for ever.
                    if let Some(status) = status_of(&buf) {
                        return Cut::Answered(status, began.elapsed());
                    }
                }
                if stream.write_all(&[byte]).await.is_err() {
                    return match status_of(&buf) {
                        Some(status) => Cut::Answered(status, began.elapsed()),
                        None => Cut::Closed(began.elapsed()),
                    };
                }
            }
        }
    }
}

/// The status code at the start of an answer.
fn status_of(buf: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(buf.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Writes `request` (ignoring a write cut short by the server) and reads the answer.
async fn refused(api: &Api, request: &[u8]) -> (Option<client::Answer>, Duration) {
    let began = Instant::now();
    let Ok(mut conn) = Conn::connect(api.addr, Duration::from_secs(2)).await else {
        return (None, began.elapsed());
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.stream().write_all(request)).await;
    let answer = conn
        .read_answer(Instant::now() + Duration::from_secs(5))
        .await
        .ok();
    (answer, began.elapsed())
}

async fn oversized(api: &Api, report: &mut ScenarioReport) {
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nhost: chaos\r\nx-big: {}\r\n\r\n",
        "a".repeat(256 * 1024)
    );
    let mut many_headers = String::from("GET /healthz HTTP/1.1\r\nhost: chaos\r\n");
    for i in 0..200 {
        many_headers.push_str(&format!("x-h{i}: {i}\r\n"));
    }
    many_headers.push_str("\r\n");
    let mut declared = format!("POST /api/users/batch HTTP/1.1\r\nhost: chaos\r\n{}content-type: application/json\r\ncontent-length: 10485760\r\n\r\n{{\"user_ids\":[", client::auth_line()).into_bytes();
    declared.extend(std::iter::repeat_n(b'1', 128 * 1024));
    let mut chunked = format!("POST /api/users/batch HTTP/1.1\r\nhost: chaos\r\n{}content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n", client::auth_line()).into_bytes();
    for _ in 0..4 {
        chunked.extend_from_slice(format!("{:x}\r\n", 32 * 1024).as_bytes());
        chunked.extend(std::iter::repeat_n(b'1', 32 * 1024));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let cases: [(&str, Vec<u8>, bool); 4] = [
        ("a 256 KiB header", big_header.into_bytes(), false),
        ("200 headers", many_headers.into_bytes(), false),
        ("a 10 MiB body (declared; 128 KiB sent)", declared, true),
        ("a 128 KiB chunked body", chunked, true),
    ];
    for (what, request, json) in cases {
        let (answer, took) = refused(api, &request).await;
        let status = answer.as_ref().map(|a| a.status);
        let code = answer.as_ref().and_then(client::Answer::error_code);
        report.count_label(format!(
            "{what}: {}",
            status.map_or("no answer".to_owned(), |s| s.to_string())
        ));
        let is_4xx = status.is_some_and(|s| (400..500).contains(&s));
        let shaped = !json || code.is_some();
        report.check(
            format!(
                "{what} refused with 4xx{}",
                if json { " (JSON error)" } else { "" }
            ),
            is_4xx && shaped,
            format!(
                "{}{} in {:.0} ms",
                status.map_or("no answer".to_owned(), |s| s.to_string()),
                code.map(|c| format!(" {c}")).unwrap_or_default(),
                ms(took)
            ),
        );
    }
}

/// Opens three times the connection limit of idle connections: the API must not hold more than
/// the limit, and must close them all in the end; a real request waits for a free slot.
async fn connection_limit(api: &Api, report: &mut ScenarioReport) {
    let baseline = api.open_sockets();
    let mut idle = Vec::new();
    for _ in 0..3 * MAX_CONNECTIONS {
        if let Ok(stream) = TcpStream::connect(api.addr).await {
            idle.push(stream);
        }
    }
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = api.open_sockets();
    // A real client behind them.
    let began = Instant::now();
    let answer = client::fetch(
        api.addr,
        &client::get("/healthz", false),
        Duration::from_secs(10),
    )
    .await;
    let waited = began.elapsed();
    report.count_label(match &answer {
        Ok(a) => format!("healthz behind idle connections: {}", a.status),
        Err(lost) => format!(
            "healthz behind idle connections: lost ({})",
            lost.failure.as_str()
        ),
    });
    if answer.is_err() {
        report.lost += 1;
    }
    report.figure(format!(
        "a /healthz behind {} idle connections answered after {:.0} ms",
        idle.len(),
        ms(waited)
    ));
    // Every idle connection must be closed by the server.
    let mut closers = JoinSet::new();
    for mut stream in idle {
        closers.spawn(async move {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(GIVE_UP, stream.read(&mut byte)).await {
                Ok(_) => Some(Instant::now()),
                Err(_) => None,
            }
        });
    }
    let mut closed = Vec::new();
    let mut never = 0;
    while let Some(joined) = closers.join_next().await {
        match joined.ok().flatten() {
            Some(at) => closed.push(at.saturating_duration_since(opened)),
            None => never += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = api.open_sockets();
    let held = match (baseline, during) {
        (Some(b), Some(d)) => Some(d.saturating_sub(b)),
        _ => None,
    };
    // Each accepted connection is two descriptors: the socket and the duplicate that watches
    // for the client going away.
    let bound = 2 * MAX_CONNECTIONS + 4;
    report.figure(format!(
        "API sockets: {baseline:?} before, {during:?} with {} idle connections open, {after:?} after",
        3 * MAX_CONNECTIONS
    ));
    report.check(
        format!("connections bounded (at most {MAX_CONNECTIONS} taken on: ≤ {bound} more sockets)"),
        held.is_some_and(|h| h <= bound),
        held.map_or("sockets unreadable".to_owned(), |h| {
            format!("{h} more sockets")
        }),
    );
    let last = closed.iter().max().copied();
    report.check(
        "every idle connection closed by the server",
        never == 0 && !closed.is_empty(),
        format!(
            "{} closed, last after {}, {never} never",
            closed.len(),
            last.map_or("-".to_owned(), |l| format!("{:.0} ms", ms(l)))
        ),
    );
    report.check(
        "a real request behind them is still answered",
        matches!(answer, Ok(ref a) if a.status == 200),
        format!("{:.0} ms", ms(waited)),
    );
}
