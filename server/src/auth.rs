//! Who a socket is: JSON Web Tokens checked at connect, optionally the application's connect
//! hook ([`crate::proxy`]), and what that assigns to the socket ([`Identity`]).
//!
//! The token is the connect param `token` (every transport; phoenix.js `params: {token}`) or
//! phoenix.js's `authToken` (the `Sec-WebSocket-Protocol` bearer on WebSocket, the
//! `X-Phoenix-AuthToken` header on long-poll). Claims read:
//!
//! - `sub` (required, a string): the user id. It names the socket (so the application can
//!   disconnect every socket of a user) and is the user's Presence key.
//! - `exp` (required): tokens past it are refused, with [`LEEWAY`] for clocks that differ.
//! - `channels` (optional): a list of topic patterns (`"chat:*"`, `"room:42"`) this token may
//!   join in namespaces declared with `join = "claim"`.
//!
//! A token that is missing (unless `anonymous = true`), malformed, forged, expired or made with
//! another algorithm refuses the socket: 403 at connect on every transport, counted in
//! `fawkes_connects_refused_total` by reason.
//!
//! Database clients (the `db` transport: rows of `fawkes_inbox`) are not asked for a token nor
//! sent to the connect hook: whoever writes to the database is already on the server's side.
//! They connect with no user.
//!
//! ```
//! use fawkes_server::auth::JwtVerifier;
//!
//! let verifier = JwtVerifier::hs256(b"secret");
//! assert!(verifier.verify("not.a.token").is_err());
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fawkes::{Accept, ConnectError, ConnectInfo, SocketHandler};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::proxy::{ConnectRequest, Proxy, ProxyError};

/// Clock difference tolerated on `exp` (and `nbf` when present).
pub const LEEWAY: Duration = Duration::from_secs(10);

/// What the connect step assigned to a socket, readable in channels with
/// `socket.assign::<Identity>()`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// The user id (the token's `sub`, or the connect hook's `user`); `None` for anonymous
    /// sockets.
    pub user: Option<String>,
    /// The token's `channels` claim (or the connect hook's), if it had one.
    pub channels: Option<Vec<String>>,
    /// Data the connect hook assigned (`result.data`), if any.
    pub data: Option<Value>,
    /// The connect request's params, handed to the join hook.
    pub params: serde_json::Map<String, Value>,
    /// The connect request's headers that are passed to hooks ([`crate::proxy::FORWARDED_HEADERS`]).
    pub headers: serde_json::Map<String, Value>,
}

impl Identity {
    /// Whether the `channels` claim allows `topic`.
    pub fn claims(&self, topic: &str) -> bool {
        self.channels.as_ref().is_some_and(|patterns| patterns.iter().any(|p| topic_matches(p, topic)))
    }
}

/// Whether `topic` matches `pattern`: an exact topic, or a prefix followed by `*`.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// Checks JSON Web Tokens: HS256 with a shared secret, or RS256/ES256 with a public key.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("algorithms", &self.validation.algorithms).finish_non_exhaustive()
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or claims missing or of the wrong type (`sub`, `exp`, `channels`).
    #[error("malformed token")]
    Malformed,
    /// The signature does not verify, or the algorithm is not the configured one.
    #[error("forged token")]
    Forged,
    /// Past its `exp` (or before its `nbf`).
    #[error("expired token")]
    Expired,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    channels: Option<Vec<String>>,
}

impl JwtVerifier {
    /// HS256 with `secret`.
    pub fn hs256(secret: &[u8]) -> JwtVerifier {
        JwtVerifier::with(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// RS256 or ES256 (P-256), from a PEM public key (`-----BEGIN PUBLIC KEY-----` or
    /// `-----BEGIN RSA PUBLIC KEY-----`).
    pub fn from_pem(pem: &[u8]) -> Result<JwtVerifier, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(JwtVerifier::with(key, Algorithm::RS256));
        }
        match DecodingKey::from_ec_pem(pem) {
            Ok(key) => Ok(JwtVerifier::with(key, Algorithm::ES256)),
            Err(e) => Err(format!("not an RSA or EC (P-256) public key in PEM form: {e}")),
        }
    }

    fn with(key: DecodingKey, algorithm: Algorithm) -> JwtVerifier {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        JwtVerifier { key, validation }
    }

    /// The algorithm tokens must be signed with.
    pub fn algorithm(&self) -> Algorithm {
        self.validation.algorithms[0]
    }

    /// Verifies `token`: the user id (`sub`) and the `channels` claim.
    pub fn verify(&self, token: &str) -> Result<(String, Option<Vec<String>>), TokenError> {
        match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => Ok((data.claims.sub, data.claims.channels)),
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => TokenError::Expired,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => TokenError::Forged,
                _ => TokenError::Malformed,
            }),
        }
    }
}

/// Counters of refused connects, by reason, for `/metrics`.
#[derive(Debug, Default)]
pub struct AuthStats {
    missing: AtomicU64,
    malformed: AtomicU64,
    forged: AtomicU64,
    expired: AtomicU64,
    hook_denied: AtomicU64,
    hook_failed: AtomicU64,
}

impl AuthStats {
    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text for the counters.
    pub fn prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP fawkes_connects_refused_total Sockets refused at connect by token auth or the connect hook, by reason.\n\
             # TYPE fawkes_connects_refused_total counter\n",
        );
        for (reason, n) in [
            ("missing_token", &self.missing),
            ("malformed_token", &self.malformed),
            ("forged_token", &self.forged),
            ("expired_token", &self.expired),
            ("hook_denied", &self.hook_denied),
            ("hook_failed", &self.hook_failed),
        ] {
            out.push_str(&format!(
                "fawkes_connects_refused_total{{reason=\"{reason}\"}} {}\n",
                n.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// The connect step of `fawkes serve`: the token, then the connect hook, each when configured.
/// Without either, every socket connects anonymously.
#[derive(Debug, Clone)]
pub struct Auth {
    jwt: Option<JwtVerifier>,
    anonymous: bool,
    proxy: Option<Proxy>,
    stats: Arc<AuthStats>,
}

impl Auth {
    /// Token checks with `jwt` (none: tokens are not read); `anonymous` lets sockets without a
    /// token connect; `proxy` asks the application's connect hook.
    pub fn new(jwt: Option<JwtVerifier>, anonymous: bool, proxy: Option<Proxy>) -> Auth {
        Auth { jwt, anonymous, proxy, stats: Arc::default() }
    }

    /// The refusal counters.
    pub fn stats(&self) -> Arc<AuthStats> {
        self.stats.clone()
    }

    fn refuse(&self, counter: &AtomicU64, transport: &str, why: &str) -> ConnectError {
        self.stats.count(counter);
        tracing::info!(transport, reason = why, "connect refused");
        ConnectError::refused(why)
    }
}

impl SocketHandler for Auth {
    async fn connect(&self, info: &ConnectInfo) -> Result<Accept, ConnectError> {
        let s = &self.stats;
        if info.transport == "db" {
            return Ok(Accept::new().assign(Identity::default()));
        }
        let mut identity = Identity {
            params: info.params.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect(),
            headers: crate::proxy::forwarded_headers(&info.headers),
            ..Identity::default()
        };
        if let Some(jwt) = &self.jwt {
            let token = info.params.get("token").filter(|t| !t.is_empty()).or(info.auth_token.as_ref());
            match token {
                Some(token) => match jwt.verify(token) {
                    Ok((sub, channels)) => {
                        identity.user = Some(sub);
                        identity.channels = channels;
                    }
                    Err(e) => {
                        let counter = match e {
                            TokenError::Malformed => &s.malformed,
                            TokenError::Forged => &s.forged,
                            TokenError::Expired => &s.expired,
                        };
                        return Err(self.refuse(counter, info.transport, &e.to_string()));
                    }
                },
                None if self.anonymous => {}
                None => return Err(self.refuse(&s.missing, info.transport, "no token")),
            }
        }
        // The token's own param is no business of the hook's.
        identity.params.remove("token");
        if let Some(proxy) = &self.proxy
            && proxy.has_connect()
        {
            let request = ConnectRequest {
                transport: info.transport,
                params: &identity.params,
                headers: &identity.headers,
                user: identity.user.as_deref(),
            };
            match proxy.connect(&request).await {
                Ok(result) => {
                    if identity.user.is_none() {
                        identity.user = result.user;
                    }
                    if result.channels.is_some() {
                        identity.channels = result.channels;
                    }
                    identity.data = result.data;
                }
                Err(ProxyError::Denied(why)) => return Err(self.refuse(&s.hook_denied, info.transport, &why)),
                Err(e) => return Err(self.refuse(&s.hook_failed, info.transport, &e.to_string())),
            }
        }
        // With a connect hook and no JWT the hook names the user; `anonymous` still decides
        // whether a socket left without one may connect.
        let checked = self.jwt.is_some() || self.proxy.as_ref().is_some_and(Proxy::has_connect);
        if identity.user.is_none() && !self.anonymous && checked {
            return Err(self.refuse(&s.missing, info.transport, "no user"));
        }
        let mut accept = Accept::new();
        if let Some(user) = &identity.user {
            accept = accept.id(user.clone());
        }
        Ok(accept.assign(identity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }

    fn hs(claims: Value, secret: &[u8]) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).expect("encode")
    }

    #[test]
    fn hs256_tokens_are_told_apart_by_why_they_fail() {
        let v = JwtVerifier::hs256(b"k");
        let ok = hs(json!({"sub": "ann", "exp": now() + 60, "channels": ["chat:*"]}), b"k");
        assert_eq!(v.verify(&ok), Ok(("ann".into(), Some(vec!["chat:*".into()]))));
        assert_eq!(v.verify(&hs(json!({"sub": "ann", "exp": now() + 60}), b"other")), Err(TokenError::Forged));
        assert_eq!(v.verify(&hs(json!({"sub": "ann", "exp": now() - 60}), b"k")), Err(TokenError::Expired));
        assert_eq!(v.verify(&hs(json!({"sub": "ann", "exp": now() - 5}), b"k")).map(|u| u.0), Ok("ann".into()));
        assert_eq!(v.verify(&hs(json!({"sub": "ann"}), b"k")), Err(TokenError::Malformed), "exp is required");
        assert_eq!(v.verify(&hs(json!({"exp": now() + 60}), b"k")), Err(TokenError::Malformed), "sub is required");
        assert_eq!(v.verify(&hs(json!({"sub": 7, "exp": now() + 60}), b"k")), Err(TokenError::Malformed));
        assert_eq!(v.verify("garbage"), Err(TokenError::Malformed));
    }

    fn info(transport: &'static str, query: &str) -> ConnectInfo {
        ConnectInfo::new(transport, false).with_query(Some(query))
    }

    #[tokio::test]
    async fn database_clients_need_no_token_and_others_do() {
        let auth = Auth::new(Some(JwtVerifier::hs256(b"k")), false, None);
        assert!(matches!(auth.connect(&info("websocket", "vsn=2.0.0")).await, Err(ConnectError::Refused(_))));
        let db = auth.connect(&info("db", "vsn=2.0.0&client_id=bot")).await.expect("a database client connects");
        drop(db);
        let token = hs(json!({"sub": "ann", "exp": now() + 60}), b"k");
        auth.connect(&info("websocket", &format!("vsn=2.0.0&token={token}"))).await.expect("a token connects");
        assert!(auth.stats().prometheus().contains("fawkes_connects_refused_total{reason=\"missing_token\"} 1"));

        let anonymous = Auth::new(Some(JwtVerifier::hs256(b"k")), true, None);
        anonymous.connect(&info("websocket", "vsn=2.0.0")).await.expect("no token, anonymous = true");
        let forged = hs(json!({"sub": "ann", "exp": now() + 60}), b"other");
        let refused = anonymous.connect(&info("websocket", &format!("vsn=2.0.0&token={forged}"))).await;
        assert!(
            matches!(refused, Err(ConnectError::Refused(_))),
            "a bad token is refused even when anonymous is allowed"
        );
    }

    #[test]
    fn channel_patterns_match_as_namespace_patterns_do() {
        let id = Identity { channels: Some(vec!["chat:*".into(), "room:1".into()]), ..Identity::default() };
        assert!(id.claims("chat:a"));
        assert!(id.claims("room:1"));
        assert!(!id.claims("room:12"));
        assert!(!Identity::default().claims("chat:a"));
    }
}
