//! Namespaces: the topics `fawkes serve` offers when its configuration declares
//! `[[namespace]]` entries, and what clients may do there.
//!
//! A topic belongs to the first namespace whose `pattern` it matches (an exact topic, or a
//! prefix followed by `*`); a topic in none is refused with `{"reason": "unmatched topic"}`.
//!
//! - **join**: `"anyone"`; `"authenticated"` (a socket with a user: a valid token, or a user
//!   named by the connect hook); `"claim"` (the token's `channels` claim matches the topic).
//!   Then the join hook, if configured. A refused join replies `{"reason": "unauthorized"}`.
//!   The ok reply is `{}`, or the join hook's `data`; on a topic with history it also carries
//!   `"pos"` (the position now) and `"recovered"` (see below).
//! - **publish**: with `publish = true`, a client push of event E with an object payload P
//!   broadcasts E with P plus `"user": <sub>` (set by the server, removed when the socket has no
//!   user) to every subscriber, the sender included, and replies ok `{}`. With `publish = false`
//!   the push replies `{"reason": "unauthorized"}`. Events named `phx_*`, `presence_state` and
//!   `presence_diff` are refused (`{"reason": "reserved event"}`), a payload that is not an
//!   object too (`{"reason": "payload must be an object"}`).
//! - **presence**: with `presence = true`, a joining user is tracked under their user id with
//!   meta `{"online_at": <unix ms>}` (plus `"data"` when the connect hook assigned some), and
//!   every joiner gets `presence_state` right after the join reply, then `presence_diff`s (its own
//!   entry in one or the other: changes go out once per presence window).
//! - **history**: with `history_size` and/or `history_age` (seconds), the topic keeps its last
//!   broadcasts; every broadcast's payload then carries `"pos"`, and a join with
//!   `{"since": POS}` gets every broadcast after POS right after its reply (`"recovered": true`),
//!   as the demo's `feed:*` topics do.
//! - **limits**: `max_message_size` (bytes of a push's JSON payload) answers
//!   `{"reason": "message too large"}`; `message_rate` pushes per second (bursts of
//!   `message_burst`, default the rate) per socket on a topic answer `{"reason": "rate limited"}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use fawkes::{Channel, HandleIn, HistoryOptions, Payload, Router, SocketRef, reason};

use crate::auth::Identity;
use crate::proxy::{JoinRequest, Proxy, ProxyError};

/// Who may join a namespace's topics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinPolicy {
    /// Anyone who connected.
    Anyone,
    /// Only clients with a valid token.
    #[default]
    Authenticated,
    /// Only clients whose token's `channels` claim matches the topic.
    Claim,
}

/// One namespace's rules, checked.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The topic pattern.
    pub pattern: String,
    /// Who may join.
    pub join: JoinPolicy,
    /// Whether clients may publish.
    pub publish: bool,
    /// Whether joins are tracked in Presence.
    pub presence: bool,
    /// The topics' history, if kept.
    pub history: Option<HistoryOptions>,
    /// Largest push payload, in bytes of JSON.
    pub max_message_size: Option<usize>,
    /// Pushes per second and burst, per socket on a topic.
    pub message_rate: Option<(u32, u32)>,
}

/// Counters of refused joins and pushes, for `/metrics`.
#[derive(Debug, Default)]
pub struct NamespaceStats {
    joins_unauthorized: AtomicU64,
    joins_hook_failed: AtomicU64,
    pushes_unauthorized: AtomicU64,
    pushes_too_large: AtomicU64,
    pushes_rate_limited: AtomicU64,
    pushes_invalid: AtomicU64,
    published: AtomicU64,
}

impl NamespaceStats {
    /// Prometheus text for the counters.
    pub fn prometheus(&self) -> String {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "# HELP fawkes_namespace_joins_refused_total Joins refused by a namespace's rules or the join hook, by reason.\n\
             # TYPE fawkes_namespace_joins_refused_total counter\n\
             fawkes_namespace_joins_refused_total{{reason=\"unauthorized\"}} {}\n\
             fawkes_namespace_joins_refused_total{{reason=\"hook_failed\"}} {}\n\
             # HELP fawkes_client_publish_total Client pushes broadcast in namespaces with publish = true.\n\
             # TYPE fawkes_client_publish_total counter\n\
             fawkes_client_publish_total {}\n\
             # HELP fawkes_client_publish_refused_total Client pushes refused in namespaces, by reason.\n\
             # TYPE fawkes_client_publish_refused_total counter\n\
             fawkes_client_publish_refused_total{{reason=\"unauthorized\"}} {}\n\
             fawkes_client_publish_refused_total{{reason=\"too_large\"}} {}\n\
             fawkes_client_publish_refused_total{{reason=\"rate_limited\"}} {}\n\
             fawkes_client_publish_refused_total{{reason=\"invalid\"}} {}\n",
            n(&self.joins_unauthorized),
            n(&self.joins_hook_failed),
            n(&self.published),
            n(&self.pushes_unauthorized),
            n(&self.pushes_too_large),
            n(&self.pushes_rate_limited),
            n(&self.pushes_invalid),
        )
    }
}

/// The routes of `namespaces`, in order, each with its history; the join hook from `proxy`.
pub fn router(namespaces: &[Rules], proxy: Option<Proxy>, stats: Arc<NamespaceStats>) -> Router {
    let mut router = Router::new();
    for rules in namespaces {
        let rules = Arc::new(rules.clone());
        if let Some(history) = rules.history {
            router = router.history(&rules.pattern, history);
        }
        let (proxy, stats, pattern) = (proxy.clone(), stats.clone(), rules.pattern.clone());
        router = router.channel(&pattern, move || Topic::new(rules.clone(), proxy.clone(), stats.clone()));
    }
    router
}

/// A topic of a namespace, on one socket.
#[derive(Debug)]
pub struct Topic {
    rules: Arc<Rules>,
    proxy: Option<Proxy>,
    stats: Arc<NamespaceStats>,
    identity: Identity,
    tokens: f64,
    refilled: Instant,
}

impl Topic {
    fn new(rules: Arc<Rules>, proxy: Option<Proxy>, stats: Arc<NamespaceStats>) -> Topic {
        let tokens = rules.message_rate.map_or(0.0, |(_, burst)| f64::from(burst));
        Topic { rules, proxy, stats, identity: Identity::default(), tokens, refilled: Instant::now() }
    }

    fn may_join(&self, topic: &str) -> bool {
        match self.rules.join {
            JoinPolicy::Anyone => true,
            JoinPolicy::Authenticated => self.identity.user.is_some(),
            JoinPolicy::Claim => self.identity.user.is_some() && self.identity.claims(topic),
        }
    }

    /// Takes one push from the socket's bucket; false when it is empty.
    fn take_token(&mut self) -> bool {
        let Some((rate, burst)) = self.rules.message_rate else { return true };
        let now = Instant::now();
        let regained = now.duration_since(self.refilled).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + regained).min(f64::from(burst));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refuse_push(&self, counter: &AtomicU64, why: &str) -> HandleIn {
        counter.fetch_add(1, Ordering::Relaxed);
        HandleIn::error(reason(why))
    }
}

impl Channel for Topic {
    async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        self.identity = socket.assign::<Identity>().cloned().unwrap_or_default();
        let topic = socket.topic().to_owned();
        if !self.may_join(&topic) {
            self.stats.joins_unauthorized.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(topic, user = ?self.identity.user, "join refused by the namespace");
            return Err(reason("unauthorized"));
        }
        let params = params.as_json().cloned().unwrap_or(Value::Null);
        let mut response = Map::new();
        if let Some(proxy) = self.proxy.as_ref().filter(|p| p.has_join()) {
            let request = JoinRequest {
                topic: &topic,
                params: &params,
                headers: &self.identity.headers,
                user: self.identity.user.as_deref(),
                data: self.identity.data.as_ref(),
            };
            match proxy.join(&request).await {
                Ok(result) => match result.data {
                    Some(Value::Object(data)) => response = data,
                    Some(Value::Null) | None => {}
                    Some(other) => {
                        response.insert("data".into(), other);
                    }
                },
                Err(e) => {
                    let counter = match e {
                        ProxyError::Denied(_) => &self.stats.joins_unauthorized,
                        _ => &self.stats.joins_hook_failed,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(topic, error = %e, "join refused by the hook");
                    return Err(reason("unauthorized"));
                }
            }
        }
        if self.rules.history.is_some() {
            // A `since` that is not a string is as good as a malformed one: not recovered.
            let since = match params.get("since") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.as_str()),
                Some(_) => Some(""),
            };
            let recovery = socket.recover(since).await.map_err(|e| {
                tracing::error!(topic, error = %e, "join without history");
                reason("history unavailable")
            })?;
            response.insert("pos".into(), json!(recovery.position.map(|p| p.to_string())));
            response.insert("recovered".into(), json!(recovery.recovered));
        }
        Ok(Value::Object(response))
    }

    async fn after_join(&mut self, socket: &mut SocketRef) {
        if !self.rules.presence {
            return;
        }
        if let Some(user) = self.identity.user.clone() {
            let online_at =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let mut meta = json!({ "online_at": online_at });
            if let Some(data) = &self.identity.data {
                meta["data"] = data.clone();
            }
            if let Err(e) = socket.track(user, meta) {
                tracing::warn!(error = %e, "presence not tracked");
            }
        }
        // The state as of the last presence window, shared by that window's joiners; this
        // user's own entry comes in it or in the next `presence_diff`.
        socket.push_presence_state();
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        if !self.rules.publish {
            return self.refuse_push(&self.stats.pushes_unauthorized, "unauthorized");
        }
        if event.starts_with("phx_") || event == "presence_state" || event == "presence_diff" {
            return self.refuse_push(&self.stats.pushes_invalid, "reserved event");
        }
        let Some(Value::Object(body)) = payload.as_json() else {
            return self.refuse_push(&self.stats.pushes_invalid, "payload must be an object");
        };
        if let Some(max) = self.rules.max_message_size {
            let size = serde_json::to_vec(body).map_or(usize::MAX, |v| v.len());
            if size > max {
                return self.refuse_push(&self.stats.pushes_too_large, "message too large");
            }
        }
        if !self.take_token() {
            return self.refuse_push(&self.stats.pushes_rate_limited, "rate limited");
        }
        let mut body = body.clone();
        match &self.identity.user {
            Some(user) => body.insert("user".into(), Value::String(user.clone())),
            None => body.remove("user"),
        };
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        if self.rules.history.is_some() {
            let sent = socket
                .broadcast_with_position(event, |pos| {
                    let mut body = body.clone();
                    body.insert("pos".into(), Value::String(pos.to_string()));
                    Value::Object(body).into()
                })
                .await;
            if let Err(e) = sent {
                tracing::error!(topic = socket.topic(), error = %e, "broadcast to history failed");
                return HandleIn::error(reason("history unavailable"));
            }
        } else {
            socket.broadcast(event, Value::Object(body));
        }
        HandleIn::ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn topic(rate: Option<(u32, u32)>) -> Topic {
        let rules = Rules {
            pattern: "chat:*".into(),
            join: JoinPolicy::Anyone,
            publish: true,
            presence: false,
            history: None,
            max_message_size: None,
            message_rate: rate,
        };
        Topic::new(Arc::new(rules), None, Arc::default())
    }

    #[tokio::test(start_paused = true)]
    async fn pushes_past_the_rate_wait_for_the_bucket_to_refill() {
        let mut t = topic(Some((2, 3)));
        assert!((0..3).all(|_| t.take_token()), "a burst of 3");
        assert!(!t.take_token());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(t.take_token(), "2 per second: one more after half a second");
        assert!(!t.take_token());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!((0..3).all(|_| t.take_token()), "never more than the burst");
        assert!(!t.take_token());
        let mut unlimited = topic(None);
        assert!((0..1000).all(|_| unlimited.take_token()));
    }

    #[test]
    fn joins_follow_the_policy() {
        let mut t = topic(None);
        let anonymous = Identity::default();
        let ann = Identity { user: Some("ann".into()), ..Identity::default() };
        let claimed =
            Identity { user: Some("bob".into()), channels: Some(vec!["chat:b*".into()]), ..Identity::default() };
        let cases = [
            (JoinPolicy::Anyone, &anonymous, true),
            (JoinPolicy::Authenticated, &anonymous, false),
            (JoinPolicy::Authenticated, &ann, true),
            (JoinPolicy::Claim, &ann, false),
            (JoinPolicy::Claim, &claimed, true),
        ];
        for (policy, identity, allowed) in cases {
            Arc::make_mut(&mut t.rules).join = policy;
            t.identity = identity.clone();
            assert_eq!(t.may_join("chat:bob"), allowed, "{policy:?} {identity:?}");
        }
    }
}
