//! A small HTTP/1.1 client for the chaos runs, written on raw sockets.
//!
//! The chaos checks need what a load generator's aggregate report throws away: for every single
//! request, when it was sent, how long it took, its status and error code, and, when it got no
//! answer, exactly how it failed (refused, reset, closed before or after the first byte of the
//! answer, timed out). So the runs use this client rather than the `loadtest` crate's generator;
//! answers are read with the generator's codec (`loadtest::codec`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use loadtest::codec;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest response body kept (the API's bodies are far smaller).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Why a request got no complete answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// Nothing listened (connection refused).
    Refused,
    /// Connecting failed another way, or took longer than the timeout.
    Connect,
    /// The peer reset the connection.
    Reset,
    /// The peer closed the connection before the answer was complete.
    Closed,
    /// The timeout passed before the answer was complete.
    Timeout,
    /// The answer was not HTTP/1.1 as this client understands it.
    Protocol,
}

impl Failure {
    /// The failure's name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Connect => "connect_failed",
            Failure::Reset => "reset",
            Failure::Closed => "closed",
            Failure::Timeout => "timeout",
            Failure::Protocol => "protocol",
        }
    }

    fn of(error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::ConnectionRefused => Failure::Refused,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                Failure::Reset
            }
            ErrorKind::UnexpectedEof => Failure::Closed,
            _ => Failure::Protocol,
        }
    }
}

/// A complete HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// Whether the server said it closes the connection after this answer.
    pub close: bool,
    /// The `Retry-After` header's seconds, when there is one.
    pub retry_after: Option<u32>,
}

impl Answer {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `error.code` of a JSON error body, if there is one.
    pub fn error_code(&self) -> Option<String> {
        json_string_after(&self.text(), "\"code\":\"")
    }
}

/// The string value that follows `marker` in `text`, up to the next quote.
pub fn json_string_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let rest = &text[start..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// A request that got no complete answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    /// How it failed.
    pub failure: Failure,
    /// Whether any byte of the answer had arrived.
    pub answer_started: bool,
}

impl Lost {
    fn new(failure: Failure, answer_started: bool) -> Self {
        Self {
            failure,
            answer_started,
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects within `timeout`.
    ///
    /// # Errors
    ///
    /// [`Failure::Refused`] or [`Failure::Connect`].
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, Failure> {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(Self {
                    stream,
                    buf: Vec::with_capacity(4096),
                })
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(Failure::Refused)
            }
            Ok(Err(_)) | Err(_) => Err(Failure::Connect),
        }
    }

    /// The socket, for tests that write by hand.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Sends `request` and reads the whole answer, all within `timeout`.
    ///
    /// # Errors
    ///
    /// [`Lost`] saying how the exchange failed.
    pub async fn exchange(&mut self, request: &[u8], timeout: Duration) -> Result<Answer, Lost> {
        self.exchange_until(request, Instant::now() + timeout).await
    }

    /// Sends `request` and reads the whole answer, giving up at `deadline`.
    ///
    /// # Errors
    ///
    /// [`Lost`] saying how the exchange failed.
    pub async fn exchange_until(
        &mut self,
        request: &[u8],
        deadline: Instant,
    ) -> Result<Answer, Lost> {
        if let Err(e) = tokio::time::timeout_at(deadline, self.stream.write_all(request))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        {
            let failure = if e.kind() == std::io::ErrorKind::TimedOut {
                Failure::Timeout
            } else {
                Failure::of(&e)
            };
            return Err(Lost::new(failure, false));
        }
        self.read_answer(deadline).await
    }

    /// Reads one whole answer, giving up at `deadline`.
    ///
    /// # Errors
    ///
    /// [`Lost`] saying how the read failed.
    pub async fn read_answer(&mut self, deadline: Instant) -> Result<Answer, Lost> {
        let mut started = !self.buf.is_empty();
        loop {
            if let Some(parsed) = parse(&self.buf).map_err(|f| Lost::new(f, true))? {
                let (answer, used) = parsed;
                self.buf.drain(..used);
                return Ok(answer);
            }
            if self.buf.len() > codec::MAX_HEAD + MAX_BODY {
                return Err(Lost::new(Failure::Protocol, true));
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await;
            match read {
                Err(_) => return Err(Lost::new(Failure::Timeout, started)),
                Ok(Ok(0)) => {
                    // A body framed by the end of the connection ends here.
                    if let Some((answer, _)) = parse_at_eof(&self.buf) {
                        self.buf.clear();
                        return Ok(answer);
                    }
                    return Err(Lost::new(Failure::Closed, started));
                }
                Ok(Ok(n)) => {
                    started = true;
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Ok(Err(e)) => return Err(Lost::new(Failure::of(&e), started)),
            }
        }
    }
}

/// A complete answer at the start of `buf` and the bytes it used, or `None` when more must be
/// read.
fn parse(buf: &[u8]) -> Result<Option<(Answer, usize)>, Failure> {
    let parsed = codec::parse_response(buf, false, MAX_BODY).map_err(|_| Failure::Protocol)?;
    Ok(parsed.map(|(head, body, used)| (answer(&head, &buf[..head.len], body), used)))
}

/// The answer in `buf` when the connection has ended, for bodies framed by the close.
fn parse_at_eof(buf: &[u8]) -> Option<(Answer, usize)> {
    let (head, body, used) = codec::parse_response(buf, true, MAX_BODY).ok()??;
    Some((answer(&head, &buf[..head.len], body), used))
}

fn answer(head: &codec::Head, head_bytes: &[u8], body: Vec<u8>) -> Answer {
    Answer {
        status: head.status,
        body,
        close: !head.keep_alive,
        retry_after: header(head_bytes, "retry-after").and_then(|v| v.parse().ok()),
    }
}

/// The value of the header `name` (lower case) in an answer's head, trimmed.
fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head)
        .lines()
        .skip(1)
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
}

/// A `GET` request for `path`.
pub fn get(path: &str, keep_alive: bool) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let auth = auth_line();
    format!("GET {path} HTTP/1.1\r\nhost: chaos\r\n{auth}connection: {connection}\r\n\r\n")
        .into_bytes()
}

/// The bearer token every request of this run carries (`cargo xtask chaos --auth`).
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes every request of this process carry `token`.
pub fn use_token(token: String) {
    let _ = TOKEN.set(token);
}

/// `authorization: Bearer …\r\n` when the run has a token, else nothing.
pub fn auth_line() -> String {
    TOKEN
        .get()
        .map(|token| format!("authorization: Bearer {token}\r\n"))
        .unwrap_or_default()
}

/// A keep-alive `POST` of a JSON body.
pub fn post_json(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: chaos\r\n{}connection: keep-alive\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        auth_line(),
        body.len()
    )
    .into_bytes()
}

/// Sends one request on a connection of its own.
///
/// # Errors
///
/// [`Lost`] (with `answer_started` false for connect failures).
pub async fn fetch(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<Answer, Lost> {
    let deadline = Instant::now() + timeout;
    let mut conn = Conn::connect(addr, timeout)
        .await
        .map_err(|f| Lost::new(f, false))?;
    conn.exchange(request, deadline.saturating_duration_since(Instant::now()))
        .await
}

/// What became of one request of a load.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it was sent (or the connection attempted), since the load's start.
    pub sent: Duration,
    /// How long until it was answered or failed.
    pub latency: Duration,
    /// A batch request (else a dashboard).
    pub batch: bool,
    /// Its answer, or how it failed.
    pub outcome: Outcome,
}

impl Record {
    /// When it ended, since the load's start.
    pub fn ended(&self) -> Duration {
        self.sent + self.latency
    }

    /// The report label: the outcome's, with `batch` in front for batch requests.
    pub fn label(&self) -> String {
        if self.batch {
            format!("batch {}", self.outcome.label())
        } else {
            self.outcome.label()
        }
    }
}

/// An answer's gist, or a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A complete answer.
    Answered {
        /// Its status.
        status: u16,
        /// A 200 whose body lists no errors (`"errors":[]`: no failed source, no failed id).
        clean: bool,
        /// The JSON error code of an error answer.
        code: Option<String>,
        /// The JSON error message of an error answer.
        message: Option<String>,
        /// Its `Retry-After` seconds, if any.
        retry_after: Option<u32>,
    },
    /// No connection could be made; nothing was sent.
    NotConnected(Failure),
    /// Sent, and no complete answer came back.
    Lost(Lost),
}

impl Outcome {
    /// The report label: the status code, or the failure's name.
    pub fn label(&self) -> String {
        match self {
            Outcome::Answered {
                status: 200,
                clean: false,
                ..
            } => "200 with errors listed".to_owned(),
            Outcome::Answered { status, .. } => status.to_string(),
            Outcome::NotConnected(failure) => format!("not connected ({})", failure.as_str()),
            Outcome::Lost(lost) => format!("lost ({})", lost.failure.as_str()),
        }
    }

    /// Whether this is a 200 with nothing missing.
    pub fn is_clean(&self) -> bool {
        matches!(self, Outcome::Answered { clean: true, .. })
    }

    /// The status, when answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Answered { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The gist of an answer.
pub fn outcome_of(answer: &Answer) -> Outcome {
    let clean = answer.status == 200 && {
        let text = answer.text();
        text.contains("\"errors\":[]") || !text.contains("\"errors\"")
    };
    let error = answer.status >= 400;
    Outcome::Answered {
        status: answer.status,
        clean,
        code: error.then(|| answer.error_code()).flatten(),
        message: error
            .then(|| json_string_after(&answer.text(), "\"message\":\""))
            .flatten(),
        retry_after: answer.retry_after,
    }
}

/// A closed-loop load: `connections` keep-alive connections, each sending its next request (a
/// dashboard, or a batch of [`BATCH_IDS`] ids for `batch_percent` of them) when the last answer
/// arrives, until `stop` is set.
#[derive(Debug, Clone)]
pub struct Load {
    /// The API's address.
    pub addr: SocketAddr,
    /// Concurrent connections (requests in flight).
    pub connections: usize,
    /// User ids are drawn uniformly from `1..=users`.
    pub users: u64,
    /// Limit on one request, connect included.
    pub timeout: Duration,
    /// Seed of the id draws.
    pub seed: u64,
    /// Share of batch requests, in percent.
    pub batch_percent: u32,
}

/// A [`Load`] running in the background until [`Running::finish`].
pub struct Running {
    start: Instant,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Record>>,
}

impl Running {
    /// Time since the load started (the origin of every record's `sent`).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stops the load, lets each connection finish its request, and returns every record.
    ///
    /// # Errors
    ///
    /// When the load task panicked.
    pub async fn finish(self) -> anyhow::Result<Vec<Record>> {
        self.stop.store(true, Ordering::Relaxed);
        anyhow::Context::context(self.task.await, "the load task failed")
    }
}

/// Ids per batch request of a [`Load`].
pub const BATCH_IDS: usize = 20;

impl Load {
    /// Starts the load in the background.
    pub fn start(self) -> Running {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move { self.run(start, stop).await }
        });
        Running { start, stop, task }
    }

    /// Runs until `stop` is set, then lets each connection finish its request; returns every
    /// request's record, timed from `start`.
    pub async fn run(&self, start: Instant, stop: Arc<AtomicBool>) -> Vec<Record> {
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..self.connections {
            let load = self.clone();
            let stop = Arc::clone(&stop);
            tasks.spawn(async move { load.connection(index as u64, start, &stop).await });
        }
        let mut records = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(mut part) = joined {
                records.append(&mut part);
            }
        }
        records.sort_by_key(|r| r.sent);
        records
    }

    async fn connection(&self, index: u64, start: Instant, stop: &AtomicBool) -> Vec<Record> {
        let mut rng = Pcg64Mcg::seed_from_u64(self.seed ^ index.wrapping_mul(0x9e37_79b9));
        let mut records = Vec::new();
        // Connected before the first request, so that the burst of connects at the start (where
        // the kernel may drop a SYN and the client retry it a second later) is not charged to
        // the first request's latency. A failed connect is retried and recorded in the loop.
        let mut conn: Option<Conn> = Conn::connect(self.addr, self.timeout).await.ok();
        while !stop.load(Ordering::Relaxed) {
            let batch = rng.random_range(0..100) < self.batch_percent;
            let request = if batch {
                let ids: Vec<String> = (0..BATCH_IDS)
                    .map(|_| rng.random_range(1..=self.users).to_string())
                    .collect();
                post_json(
                    "/api/users/batch",
                    &format!("{{\"user_ids\":[{}]}}", ids.join(",")),
                )
            } else {
                let user = rng.random_range(1..=self.users);
                get(&format!("/api/users/{user}/dashboard"), true)
            };
            let sent_at = Instant::now();
            let sent = sent_at - start;
            let mut current = match conn.take() {
                Some(c) => c,
                None => match Conn::connect(self.addr, self.timeout).await {
                    Ok(c) => c,
                    Err(failure) => {
                        records.push(Record {
                            sent,
                            latency: sent_at.elapsed(),
                            batch,
                            outcome: Outcome::NotConnected(failure),
                        });
                        // Nothing listens: do not spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let remaining = self.timeout.saturating_sub(sent_at.elapsed());
            let outcome = match current.exchange(&request, remaining).await {
                Ok(answer) => {
                    if !answer.close {
                        conn = Some(current);
                    }
                    outcome_of(&answer)
                }
                Err(lost) => Outcome::Lost(lost),
            };
            records.push(Record {
                sent,
                latency: sent_at.elapsed(),
                batch,
                outcome,
            });
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_close_framed_answers() {
        let input = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\nretry-after: 1\r\n\r\n{}extra";
        let (answer, used) = parse(input).unwrap().unwrap();
        // The bytes after the body belong to the next answer.
        assert_eq!((answer.status, used), (503, input.len() - "extra".len()));
        assert_eq!(answer.retry_after, Some(1));
        assert_eq!(answer.body, b"{}");
        assert!(!answer.close);

        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (answer, used) = parse(chunked).unwrap().unwrap();
        assert_eq!(answer.body, b"abcde");
        assert_eq!(used, chunked.len());
        assert!(parse(&chunked[..chunked.len() - 1]).unwrap().is_none());

        let eof = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\r\nbye";
        assert!(parse(eof).unwrap().is_none());
        let (answer, _) = parse_at_eof(eof).unwrap();
        assert_eq!((answer.status, answer.body.as_slice()), (408, &b"bye"[..]));
        assert!(parse(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn reads_error_codes_and_clean_dashboards() {
        let answer = Answer {
            status: 503,
            body: br#"{"status":"error","error":{"code":"unavailable","message":"x"}}"#.to_vec(),
            close: false,
            retry_after: Some(1),
        };
        assert_eq!(answer.error_code().as_deref(), Some("unavailable"));
        assert_eq!(
            outcome_of(&answer),
            Outcome::Answered {
                status: 503,
                clean: false,
                code: Some("unavailable".to_owned()),
                message: Some("x".to_owned()),
                retry_after: Some(1),
            }
        );
        let ok = Answer {
            status: 200,
            body: br#"{"status":"success","data":{"errors":[]}}"#.to_vec(),
            close: false,
            retry_after: None,
        };
        assert!(outcome_of(&ok).is_clean());
    }
}
