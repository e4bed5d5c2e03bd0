//! What each connection sends: request kinds, user ids and bodies, drawn from the connection's
//! own seeded stream, so that a seed fixes every connection's sequence.

use std::{collections::HashSet, fmt::Write as _};

use http::{HeaderValue, Method, Uri};

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::{Config, Error, RequestKind, Scenario, config::Target, ids::IdSampler};

/// What every connection's requests have in common; each connection draws its own from it.
#[derive(Clone)]
pub(crate) struct RequestPlan {
    auth: Auth,
    kinds: Kinds,
    ids: IdSampler,
    base_path: String,
    authority: String,
    batch_size: usize,
    seed: u64,
}

/// The `Authorization` each request carries.
#[derive(Clone)]
enum Auth {
    /// None.
    None,
    /// The same token on every request.
    Fixed(std::sync::Arc<str>),
    /// A token minted per request with this HS256 key (about 3µs of CPU each).
    Mint(std::sync::Arc<jsonwebtoken::EncodingKey>),
}

#[derive(Debug, Clone)]
enum Kinds {
    One(RequestKind),
    Weighted {
        table: Vec<(RequestKind, u32)>,
        total: u32,
    },
}

impl RequestPlan {
    /// The plan for a validated configuration.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the URL's host is not a valid `Host` header or the distribution's
    /// parameters are out of range.
    pub(crate) fn new(config: &Config, target: &Target) -> Result<Self, Error> {
        let kinds = match config.scenario {
            Scenario::Dashboard => Kinds::One(RequestKind::Dashboard),
            Scenario::Batch => Kinds::One(RequestKind::Batch),
            Scenario::Recommendations => Kinds::One(RequestKind::Recommendations),
            Scenario::Mixed => {
                let mut running = 0u32;
                let table = config
                    .mix
                    .weights()
                    .iter()
                    .map(|(kind, weight)| {
                        running = running.saturating_add(*weight);
                        (*kind, running)
                    })
                    .collect();
                Kinds::Weighted {
                    table,
                    total: running,
                }
            }
        };
        // The authority goes out as the Host header: refuse one that is not a valid header value.
        HeaderValue::from_str(&target.authority).map_err(|_| Error::Config {
            field: "url",
            problem: format!("`{}` is not a valid Host header", target.authority),
        })?;
        let ids = IdSampler::new(config.distribution, config.users).map_err(|e| Error::Config {
            field: "distribution",
            problem: e.to_string(),
        })?;
        let auth = match (&config.token, &config.token_secret_file) {
            (Some(token), _) => Auth::Fixed(token.trim().into()),
            (None, Some(path)) => {
                let secret = std::fs::read_to_string(path).map_err(|e| Error::Config {
                    field: "token-secret-file",
                    problem: format!("cannot read {}: {e}", path.display()),
                })?;
                let key = jsonwebtoken::EncodingKey::from_secret(secret.trim().as_bytes());
                Auth::Mint(std::sync::Arc::new(key))
            }
            (None, None) => Auth::None,
        };
        let plan = Self {
            auth,
            kinds,
            ids,
            base_path: target.base_path.clone(),
            authority: target.authority.clone(),
            batch_size: config.batch_size,
            seed: config.seed,
        };
        // Build one request of each kind now, so a bad path prefix is a configuration error
        // rather than a run full of failures.
        let mut probe = plan.for_connection(0);
        for kind in [
            RequestKind::Dashboard,
            RequestKind::Batch,
            RequestKind::Recommendations,
        ] {
            probe.fill(kind);
            if Uri::try_from(probe.path.as_str()).is_err() {
                return Err(Error::Config {
                    field: "url",
                    problem: format!("`{}` does not make valid request paths", config.url()),
                });
            }
        }
        Ok(plan)
    }

    /// The request maker of connection `index`; the seed and the index fix its whole sequence.
    pub(crate) fn for_connection(&self, index: usize) -> Requests {
        // Spread the connection index over the seed's bits so neighbouring connections get
        // unrelated streams (the PCG seeding expands it further).
        let stream = self.seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Requests {
            rng: Pcg64Mcg::seed_from_u64(stream),
            plan: self.clone(),
            method: Method::GET,
            path: String::with_capacity(self.base_path.len() + 64),
            json: String::with_capacity(16 + self.batch_size * 8),
            seen: HashSet::with_capacity(self.batch_size),
            token: String::new(),
        }
    }
}

/// Makes one connection's requests: their kinds, ids and bodies, from its own seeded stream.
///
/// [`Requests::draw`] picks the next request and writes its path (and body) into buffers the
/// connection reuses; [`Requests::encode`] then writes the HTTP/1.1 bytes.
pub(crate) struct Requests {
    rng: Pcg64Mcg,
    plan: RequestPlan,
    method: Method,
    path: String,
    json: String,
    seen: HashSet<u64>,
    /// The drawn request's bearer token, empty for none.
    token: String,
}

impl Requests {
    fn kind(&mut self) -> RequestKind {
        match &self.plan.kinds {
            Kinds::One(kind) => *kind,
            Kinds::Weighted { table, total } => {
                let draw = self.rng.random_range(0..*total);
                table
                    .iter()
                    .find(|(_, upto)| draw < *upto)
                    .map_or(RequestKind::Dashboard, |(kind, _)| *kind)
            }
        }
    }

    /// Draws the next request; its path and body stay in place until the next draw.
    pub(crate) fn draw(&mut self) -> RequestKind {
        let kind = self.kind();
        self.fill(kind);
        kind
    }

    /// Writes the path and body of a request of the given kind, with the next ids.
    fn fill(&mut self, kind: RequestKind) {
        self.path.clear();
        self.path.push_str(&self.plan.base_path);
        self.json.clear();
        self.token.clear();
        self.method = match kind {
            RequestKind::Dashboard => {
                let id = self.plan.ids.sample(&mut self.rng);
                let _ = write!(self.path, "/api/users/{id}/dashboard");
                self.authorize(&id.to_string(), "");
                Method::GET
            }
            RequestKind::Recommendations => {
                let id = self.plan.ids.sample(&mut self.rng);
                let _ = write!(self.path, "/users/{id}/recommendations");
                Method::GET
            }
            RequestKind::Batch => {
                self.path.push_str("/api/users/batch");
                self.batch_body();
                self.authorize("loadtest", "users:batch");
                Method::POST
            }
        };
    }

    /// Sets the request's token: the fixed one, or one minted for `sub` with `scope`.
    fn authorize(&mut self, sub: &str, scope: &str) {
        match &self.plan.auth {
            Auth::None => {}
            Auth::Fixed(token) => self.token.push_str(token),
            Auth::Mint(key) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let claims = serde_json::json!({ "sub": sub, "exp": now + 3600, "scope": scope });
                let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
                if let Ok(token) = jsonwebtoken::encode(&header, &claims, key) {
                    self.token.push_str(&token);
                }
            }
        }
    }

    /// `{"user_ids":[...]}` with `batch_size` distinct ids.
    fn batch_body(&mut self) {
        self.seen.clear();
        self.json.push_str(r#"{"user_ids":["#);
        // Distinct ids: a skewed distribution repeats hot ids, so draw until the batch is full,
        // with a bound in case the distribution is too skewed to fill it in reasonable time.
        let mut attempts = 0usize;
        while self.seen.len() < self.plan.batch_size && attempts < self.plan.batch_size * 64 {
            attempts += 1;
            let id = self.plan.ids.sample(&mut self.rng);
            if self.seen.insert(id) {
                if self.seen.len() > 1 {
                    self.json.push(',');
                }
                let _ = write!(self.json, "{id}");
            }
        }
        self.json.push_str("]}");
    }

    /// The drawn request as raw HTTP/1.1 bytes, written over `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.plan.authority.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !self.token.is_empty() {
            out.extend_from_slice(b"authorization: Bearer ");
            out.extend_from_slice(self.token.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if self.method == Method::POST {
            let _ = write!(
                ByteWriter(out),
                "content-type: application/json\r\ncontent-length: {}\r\n",
                self.json.len()
            );
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.json.as_bytes());
    }
}

/// `fmt::Write` into a byte buffer.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Distribution;

    fn requests(scenario: Scenario, seed: u64, index: usize) -> Requests {
        let config = Config {
            url: Some("http://localhost:1/prefix".to_owned()),
            scenario,
            mix: "dashboard=3,batch=1".parse().unwrap(),
            distribution: Distribution::Zipf { exponent: 1.1 },
            users: 1000,
            batch_size: 20,
            seed,
            ..Config::default()
        };
        let target = config.validate().unwrap();
        RequestPlan::new(&config, &target)
            .unwrap()
            .for_connection(index)
    }

    /// A drawn request as it goes on the wire, taken apart again.
    struct Sent {
        method: String,
        path: String,
        host: String,
        body: Vec<u8>,
    }

    fn next(r: &mut Requests) -> (RequestKind, Sent) {
        let kind = r.draw();
        let mut out = Vec::new();
        r.encode(&mut out);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut request = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(head) = request.parse(&out).unwrap() else {
            panic!("incomplete request");
        };
        let host = request.headers.iter().find(|h| h.name == "host").unwrap();
        let sent = Sent {
            method: request.method.unwrap().to_owned(),
            path: request.path.unwrap().to_owned(),
            host: String::from_utf8(host.value.to_vec()).unwrap(),
            body: out[head..].to_vec(),
        };
        (kind, sent)
    }

    fn paths(mut r: Requests, n: usize) -> Vec<String> {
        (0..n).map(|_| next(&mut r).1.path).collect()
    }

    #[test]
    fn sequences_are_reproducible_per_connection() {
        let a = paths(requests(Scenario::Dashboard, 9, 0), 50);
        assert_eq!(a, paths(requests(Scenario::Dashboard, 9, 0), 50));
        assert_ne!(a, paths(requests(Scenario::Dashboard, 9, 1), 50));
        assert_ne!(a, paths(requests(Scenario::Dashboard, 10, 0), 50));
        assert!(a[0].starts_with("/prefix/api/users/"));
        assert!(a[0].ends_with("/dashboard"));
        let r = paths(requests(Scenario::Recommendations, 9, 0), 1);
        assert!(r[0].starts_with("/prefix/users/") && r[0].ends_with("/recommendations"));
    }

    #[test]
    fn mixes_follow_their_weights() {
        let mut r = requests(Scenario::Mixed, 1, 0);
        let mut batches = 0;
        for _ in 0..4000 {
            let (kind, request) = next(&mut r);
            if kind == RequestKind::Batch {
                batches += 1;
                assert_eq!(request.method, "POST");
                assert_eq!(request.path, "/prefix/api/users/batch");
                assert_eq!(request.host, "localhost:1");
            }
        }
        assert!((900..1100).contains(&batches), "{batches} batches of 4000");
    }

    #[test]
    fn batch_bodies_hold_distinct_ids() {
        let mut r = requests(Scenario::Batch, 1, 0);
        let request = next(&mut r).1;
        let value: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let ids: Vec<u64> = value["user_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let distinct: HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(ids.len(), 20);
        assert_eq!(distinct.len(), 20);
        assert!(ids.iter().all(|id| (1..=1000).contains(id)));
    }

    #[test]
    fn raw_requests_are_http_1_1() {
        let mut r = requests(Scenario::Recommendations, 1, 0);
        r.draw();
        let mut out = Vec::new();
        r.encode(&mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("GET /prefix/users/"), "{text}");
        assert!(
            text.ends_with(" HTTP/1.1\r\nhost: localhost:1\r\n\r\n"),
            "{text}"
        );
        let mut r = requests(Scenario::Batch, 1, 0);
        r.draw();
        r.encode(&mut out);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut request = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(head) = request.parse(&out).unwrap() else {
            panic!("incomplete request");
        };
        assert_eq!(request.method, Some("POST"));
        assert_eq!(request.path, Some("/prefix/api/users/batch"));
        let length: usize = request
            .headers
            .iter()
            .find(|h| h.name == "content-length")
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .unwrap();
        assert_eq!(out.len() - head, length);
        let body: serde_json::Value = serde_json::from_slice(&out[head..]).unwrap();
        assert_eq!(body["user_ids"].as_array().unwrap().len(), 20);
    }

    #[test]
    fn requests_carry_a_fixed_or_a_minted_token() {
        let dir = std::env::temp_dir().join(format!("loadtest-secret-{}", std::process::id()));
        std::fs::write(&dir, "a-secret-of-thirty-two-bytes-or-more\n").unwrap();
        let plan = |token: Option<&str>, secret: bool| {
            let config = Config {
                url: Some("http://localhost:1".to_owned()),
                scenario: Scenario::Mixed,
                mix: "dashboard=1,batch=1".parse().unwrap(),
                token: token.map(str::to_owned),
                token_secret_file: secret.then(|| dir.clone()),
                ..Config::default()
            };
            let target = config.validate().unwrap();
            RequestPlan::new(&config, &target)
                .unwrap()
                .for_connection(0)
        };
        let header = |r: &mut Requests| {
            let kind = r.draw();
            let mut out = Vec::new();
            r.encode(&mut out);
            let text = String::from_utf8(out).unwrap();
            let token = text
                .lines()
                .find_map(|l| l.strip_prefix("authorization: Bearer "))
                .map(str::to_owned);
            (kind, r.path.clone(), token)
        };
        assert_eq!(
            header(&mut plan(Some("abc"), false)).2.as_deref(),
            Some("abc")
        );
        assert_eq!(header(&mut plan(None, false)).2, None);
        let mut minted = plan(None, true);
        let key = jsonwebtoken::DecodingKey::from_secret(b"a-secret-of-thirty-two-bytes-or-more");
        let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        for _ in 0..20 {
            let (kind, path, token) = header(&mut minted);
            let claims =
                jsonwebtoken::decode::<serde_json::Value>(&token.unwrap(), &key, &validation)
                    .unwrap()
                    .claims;
            match kind {
                RequestKind::Dashboard => {
                    let id = path.split('/').nth(3).unwrap();
                    assert_eq!(claims["sub"], id);
                }
                _ => assert_eq!(claims["scope"], "users:batch"),
            }
        }
        let _ = std::fs::remove_file(&dir);
    }
}
