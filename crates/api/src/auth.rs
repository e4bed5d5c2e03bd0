//! Who may read what: JWT bearer tokens, scopes, and a rate limit per client.
//!
//! In `jwt` mode every dashboard and batch request needs `Authorization: Bearer <JWT>`. The token
//! is checked before any other work (the [`guard`] middleware runs before the handler, its
//! extractors and the service), so a refused request costs no database or upstream call:
//!
//! - at most [`MAX_TOKEN`] bytes, else refused unparsed;
//! - signed with a configured key: HS256 with `auth.secret`, or RS256/ES256 with a key of the
//!   JWKS file chosen by the token's `kid`. The algorithm is the key's, never the token's choice:
//!   a token whose `alg` differs from its key's is refused (no `none`, no HS256 signed with an RSA
//!   public key);
//! - `exp` required, `nbf` checked when present (both with `auth.leeway`), `iss` and `aud` when
//!   configured.
//!
//! Then authorization: a dashboard is readable by the token whose `sub` is that user's id, or by
//! one with `auth.read_scope`; the batch needs `auth.batch_scope`; protected `/metrics` and
//! `/openapi.json` need `auth.ops_scope`. A missing or bad token is 401 with `WWW-Authenticate:
//! Bearer …`; a good token without the right is 403. Scopes come from the space-separated `scope`
//! claim (RFC 9068) or a `scp` array.
//!
//! The rate limit (GCRA, the `governor` crate) keys on the token's subject, or on the client's
//! address without a token; `X-Forwarded-For` is believed only from `rate_limit.trusted_proxies`.
//! It is per instance. Tokens never reach logs, metrics or error messages: refusals say what was
//! wrong, never what was sent.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};

use actix_web::HttpMessage as _;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::middleware::Next;
use actix_web::web;
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::AppState;
use crate::error::ApiError;
use crate::settings::{AuthMode, AuthSettings, RateLimitSettings};

/// The longest `Authorization` value read; a longer one is refused before any parsing.
pub const MAX_TOKEN: usize = 8 * 1024;

/// What a route needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `GET /api/users/{user_id}/dashboard`: that user's own token, or the read scope.
    Dashboard,
    /// `POST /api/users/batch`: the batch scope.
    Batch,
    /// A protected operations route: the ops scope.
    Ops,
}

/// Why a key set could not be loaded; start-up stops with it.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// `jwt` mode without any key.
    #[error("auth.mode = \"jwt\" needs a key: set APP__AUTH__SECRET (HS256) or auth.jwks_path")]
    NoKey,
    /// The JWKS file is unreadable or not a JWKS.
    #[error("auth.jwks_path {path}: {problem}")]
    Jwks {
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The HS256 secret is too short to be one.
    #[error("auth.secret must be at least 32 bytes")]
    WeakSecret,
}

/// One verification key, the one algorithm it verifies, and the claim checks (built once).
struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

/// The claim checks for tokens of `algorithm`: `exp` and `sub` required, `nbf` checked, `iss` and
/// `aud` when configured.
fn validation(algorithm: Algorithm, settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
        validation.required_spec_claims.insert("iss".to_owned());
    }
    match &settings.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".to_owned());
        }
        None => validation.validate_aud = false,
    }
    validation
}

/// The configured verifier; `None` mode lets everyone through.
pub struct Authenticator {
    mode: AuthMode,
    keys: Vec<Key>,
    settings: AuthSettings,
    /// Tokens verified recently, so that a client's repeated token is verified once. An ES256
    /// verification costs about 200µs of CPU on the RustCrypto backend: without this cache one
    /// ES256 token held 4 420 dashboards/s against 17 638 without authentication (`cargo xtask
    /// bench auth`, 2 cores). A hit is the same token, byte for byte, so it proves what the
    /// first verification proved; its expiry is checked again on every hit.
    verified: Mutex<HashMap<String, Verified>>,
}

/// A verified token's caller and expiry.
struct Verified {
    caller: Arc<Caller>,
    exp: u64,
}

/// Tokens remembered at most; the cache is emptied when it is full (a simple bound: a working set
/// larger than this is verified again, never wrong).
const MAX_VERIFIED: usize = 10_000;

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// The claims this service reads.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Required (checked by the validation); optional here so its absence is reported as such.
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `none` mode: nobody is asked.
    Anonymous,
    /// A verified token.
    Token {
        /// Its `sub`.
        subject: String,
        /// Its scopes.
        scopes: HashSet<String>,
    },
}

impl Authenticator {
    /// Builds the verifier from the settings, loading the JWKS file once.
    ///
    /// # Errors
    ///
    /// [`AuthSetupError`] when `jwt` mode has no usable key.
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthSetupError> {
        let mut keys = Vec::new();
        if settings.mode == AuthMode::Jwt {
            if let Some(secret) = &settings.secret {
                if secret.len() < 32 {
                    return Err(AuthSetupError::WeakSecret);
                }
                keys.push(Key {
                    kid: None,
                    algorithm: Algorithm::HS256,
                    key: DecodingKey::from_secret(secret.as_bytes()),
                    validation: validation(Algorithm::HS256, settings),
                });
            }
            if let Some(path) = &settings.jwks_path {
                keys.extend(load_jwks(path, settings)?);
            }
            if keys.is_empty() {
                return Err(AuthSetupError::NoKey);
            }
        }
        Ok(Self {
            mode: settings.mode,
            keys,
            settings: settings.clone(),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Whether requests need a token.
    pub fn enabled(&self) -> bool {
        self.mode == AuthMode::Jwt
    }

    /// Verifies the `Authorization` header.
    ///
    /// # Errors
    ///
    /// A 401 [`ApiError`] with its `WWW-Authenticate` challenge.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Caller>, ApiError> {
        if self.mode == AuthMode::None {
            return Ok(Arc::new(Caller::Anonymous));
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                None,
                "this endpoint needs an Authorization: Bearer token",
            ));
        };
        if value.len() > MAX_TOKEN {
            return Err(unauthorized(
                Some("invalid_token"),
                "the token is longer than 8 KiB",
            ));
        }
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                unauthorized(
                    Some("invalid_request"),
                    "the Authorization header must be `Bearer <token>`",
                )
            })?;
        let now = jsonwebtoken::get_current_timestamp();
        let leeway = self.settings.leeway.as_secs();
        if let Ok(verified) = self.verified.lock()
            && let Some(hit) = verified.get(token)
            && now <= hit.exp.saturating_add(leeway)
        {
            return Ok(Arc::clone(&hit.caller));
        }
        let claims = self.verify(token)?;
        let exp = claims.exp.unwrap_or(0);
        let mut scopes: HashSet<String> = claims
            .scope
            .as_deref()
            .unwrap_or_default()
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect();
        scopes.extend(claims.scp.unwrap_or_default());
        let caller = Arc::new(Caller::Token {
            subject: claims.sub,
            scopes,
        });
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            let entry = Verified {
                caller: Arc::clone(&caller),
                exp,
            };
            verified.insert(token.to_owned(), entry);
        }
        Ok(caller)
    }

    fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let invalid = |message: &str| unauthorized(Some("invalid_token"), message);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("the token is not a signed JWT this service accepts"))?;
        let key = self
            .keys
            .iter()
            .find(|key| match (&header.kid, &key.kid) {
                (Some(wanted), Some(kid)) => wanted == kid,
                (Some(_), None) => false,
                (None, _) => key.algorithm == header.alg,
            })
            .ok_or_else(|| invalid("the token's key is not one this service trusts"))?;
        if key.algorithm != header.alg {
            return Err(invalid("the token's algorithm is not its key's"));
        }
        jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map(|data| data.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                invalid(match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
                    ErrorKind::InvalidIssuer => "the token's issuer is not accepted",
                    ErrorKind::InvalidAudience => "the token's audience is not this service",
                    ErrorKind::InvalidSignature => "the token's signature does not verify",
                    ErrorKind::MissingRequiredClaim(_) => {
                        "the token lacks a required claim (exp, sub, and iss/aud when configured)"
                    }
                    _ => "the token is not a valid JWT",
                })
            })
    }

    /// Whether `caller` may do what `access` needs (`user_id` for a dashboard).
    ///
    /// # Errors
    ///
    /// A 403 [`ApiError`] naming the scope that would do.
    pub fn authorize(
        &self,
        caller: &Caller,
        access: Access,
        user_id: Option<&str>,
    ) -> Result<(), ApiError> {
        let Caller::Token { subject, scopes } = caller else {
            return Ok(());
        };
        let scope = match access {
            Access::Dashboard => &self.settings.read_scope,
            Access::Batch => &self.settings.batch_scope,
            Access::Ops => &self.settings.ops_scope,
        };
        let own = access == Access::Dashboard && user_id.is_some_and(|id| id == subject);
        if own || scopes.contains(scope) {
            return Ok(());
        }
        let message = match access {
            Access::Dashboard => {
                format!("this token reads only its own user's dashboard, or needs scope {scope}")
            }
            _ => format!("this endpoint needs scope {scope}"),
        };
        Err(
            ApiError::new(actix_web::http::StatusCode::FORBIDDEN, "forbidden", message)
                .with_challenge(format!(
                    "Bearer realm=\"dashboard\", error=\"insufficient_scope\", scope=\"{scope}\""
                )),
        )
    }
}

fn unauthorized(error: Option<&str>, message: &str) -> ApiError {
    let challenge = match error {
        None => "Bearer realm=\"dashboard\"".to_owned(),
        Some(error) => format!(
            "Bearer realm=\"dashboard\", error=\"{error}\", error_description=\"{message}\""
        ),
    };
    ApiError::new(
        actix_web::http::StatusCode::UNAUTHORIZED,
        "unauthorized",
        message,
    )
    .with_challenge(challenge)
}

/// The keys of a JWKS file: RSA keys verify RS256, P-256 keys ES256 (or the JWK's own `alg`
/// when it names one of those).
fn load_jwks(path: &Path, settings: &AuthSettings) -> Result<Vec<Key>, AuthSetupError> {
    let bad = |problem: String| AuthSetupError::Jwks {
        path: path.display().to_string(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| bad(format!("not a JWKS: {e}")))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => {
                return Err(bad(
                    "only RSA (RS256) and P-256 (ES256) keys are accepted".into()
                ));
            }
        };
        if let Some(named) = jwk.common.key_algorithm
            && named.to_string() != format!("{algorithm:?}")
        {
            return Err(bad(format!(
                "a key says alg {named}, which is not {algorithm:?}"
            )));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("unusable key: {e}")))?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            algorithm,
            key,
            validation: validation(algorithm, settings),
        });
    }
    if keys.is_empty() {
        return Err(bad("the set has no keys".into()));
    }
    Ok(keys)
}

/// Requests per client, per instance.
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<String>,
    trusted_proxies: Vec<ipnet::IpNet>,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

/// Clients remembered at most; beyond it, the ones back to a full bucket are forgotten.
const MAX_CLIENTS: usize = 100_000;

impl RateLimit {
    /// The limit the settings describe, or `None` when it is off.
    pub fn new(settings: &RateLimitSettings) -> Option<Self> {
        let rate = NonZeroU32::new(settings.per_second)?;
        let burst = NonZeroU32::new(settings.burst).unwrap_or(rate);
        Some(Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            trusted_proxies: settings.trusted_proxies.clone(),
        })
    }

    /// Counts one request of `client`.
    ///
    /// # Errors
    ///
    /// A 429 [`ApiError`] with `Retry-After` when the client is over its rate.
    pub fn check(&self, client: String) -> Result<(), ApiError> {
        if self.limiter.len() > MAX_CLIENTS {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            let seconds = u32::try_from(wait.as_secs()).unwrap_or(u32::MAX).max(1);
            ApiError::too_many_requests(seconds)
        })
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the last address
    /// in `X-Forwarded-For` that is not one of the trusted proxies.
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        let trusted = |address: &IpAddr| self.trusted_proxies.iter().any(|n| n.contains(address));
        if !trusted(&peer) {
            return Some(peer);
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse().ok())
            .collect();
        Some(
            forwarded
                .into_iter()
                .rev()
                .find(|hop| !trusted(hop))
                .unwrap_or(peer),
        )
    }
}

/// The middleware of a route that needs `access`: authenticate, authorize, count against the
/// rate limit, and only then run the handler.
pub async fn guard(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
    access: Access,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(state) = request.app_data::<web::Data<AppState>>().cloned() else {
        return Err(ApiError::internal().into());
    };
    let caller = state.auth.authenticate(request.headers())?;
    let user_id = request.match_info().get("user_id");
    state.auth.authorize(&caller, access, user_id)?;
    if let Some(limit) = &state.rate_limit {
        let client = match caller.as_ref() {
            Caller::Token { subject, .. } => format!("sub:{subject}"),
            Caller::Anonymous => {
                let peer = request.peer_addr().map(|a| a.ip());
                match limit.client_address(peer, request.headers()) {
                    Some(address) => format!("ip:{address}"),
                    None => "ip:unknown".to_owned(),
                }
            }
        };
        limit.check(client)?;
    }
    request.extensions_mut().insert(caller);
    next.call(request).await
}

/// A value for the `WWW-Authenticate` header (quotes in messages are never sent: they are ours).
pub(crate) fn challenge_value(challenge: &str) -> HeaderValue {
    HeaderValue::from_str(challenge).unwrap_or(HeaderValue::from_static("Bearer"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_client_address_comes_from_forwarded_for_only_behind_a_trusted_proxy() {
        let limit = RateLimit::new(&RateLimitSettings {
            per_second: 1,
            burst: 1,
            // One address, and a range (the pods of an ingress controller, say).
            trusted_proxies: vec![
                "10.0.0.2/32".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
        })
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.1.7.7, 10.0.0.2"),
        );
        let proxy = Some("10.0.0.2".parse().unwrap());
        let pod = Some("10.1.3.4".parse().unwrap());
        let stranger = Some("198.51.100.1".parse().unwrap());
        for peer in [proxy, pod] {
            assert_eq!(
                limit.client_address(peer, &headers),
                Some("203.0.113.9".parse().unwrap())
            );
        }
        assert_eq!(limit.client_address(stranger, &headers), stranger);
        assert_eq!(limit.client_address(proxy, &HeaderMap::new()), proxy);
    }

    #[test]
    fn a_client_over_its_rate_is_told_when_to_come_back_and_recovers() {
        use governor::clock::FakeRelativeClock;
        let clock = FakeRelativeClock::default();
        let quota =
            Quota::per_second(NonZeroU32::new(2).unwrap()).allow_burst(NonZeroU32::new(2).unwrap());
        let limiter = governor::RateLimiter::dashmap_with_clock(quota, clock.clone());
        // Two at once (the burst), the third refused with a wait of half a second.
        assert!(limiter.check_key(&"sub:1").is_ok());
        assert!(limiter.check_key(&"sub:1").is_ok());
        let refused = limiter.check_key(&"sub:1").unwrap_err();
        assert_eq!(
            refused.wait_time_from(clock.now()),
            Duration::from_millis(500)
        );
        // Another client is not affected.
        assert!(limiter.check_key(&"sub:2").is_ok());
        clock.advance(Duration::from_millis(500));
        assert!(limiter.check_key(&"sub:1").is_ok());
        assert!(limiter.check_key(&"sub:1").is_err());
    }

    #[test]
    fn no_limit_when_off() {
        assert!(RateLimit::new(&RateLimitSettings::default()).is_none());
    }
}
