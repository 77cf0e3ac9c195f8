//! Topic patterns to channel constructors.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use crate::channel::Channel;
use crate::task::{self, JoinRequest};

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Builds the task of one joined channel.
pub(crate) trait Starter: Send + Sync {
    fn start(&self, request: JoinRequest) -> BoxFuture;
}

struct FnStarter<F, C>(F, PhantomData<fn() -> C>);

impl<F, C> Starter for FnStarter<F, C>
where
    F: Fn() -> C + Send + Sync,
    C: Channel,
{
    fn start(&self, request: JoinRequest) -> BoxFuture {
        Box::pin(task::run((self.0)(), request))
    }
}

struct Route {
    pattern: Box<str>,
    starter: Arc<dyn Starter>,
}

/// Maps topic patterns to channels, tried in the order they were added. A pattern is an exact
/// topic (`"lobby"`) or a prefix followed by `*` (`"room:*"`).
///
/// ```
/// use fawkes_channel::{Channel, HandleIn, Payload, Router, SocketRef};
/// use serde_json::{json, Value};
///
/// struct Echo;
/// impl Channel for Echo {
///     async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> { Ok(json!({})) }
///     async fn handle_in(&mut self, _: &str, payload: Payload, _: &mut SocketRef) -> HandleIn {
///         HandleIn::Reply(fawkes_serializer::ReplyStatus::Ok, payload)
///     }
/// }
///
/// let router = Router::new().channel("echo:*", || Echo);
/// assert!(router.matches("echo:42"));
/// assert!(!router.matches("other:1"));
/// ```
#[derive(Default, Clone)]
pub struct Router {
    routes: Vec<Arc<Route>>,
    pub(crate) histories: Vec<(Box<str>, crate::HistoryOptions)>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.routes.iter().map(|r| &r.pattern)).finish()
    }
}

impl Router {
    /// An empty router: every join is answered `unmatched topic`.
    pub fn new() -> Router {
        Router::default()
    }

    /// Routes topics matching `pattern` to channels made by `make`, one per join.
    pub fn channel<C, F>(mut self, pattern: &str, make: F) -> Router
    where
        C: Channel,
        F: Fn() -> C + Send + Sync + 'static,
    {
        self.routes.push(Arc::new(Route { pattern: pattern.into(), starter: Arc::new(FnStarter(make, PhantomData)) }));
        self
    }

    /// Topics matching `pattern` keep a history of their broadcasts (see
    /// [`History`](crate::History)); the same as [`EndpointBuilder::history`](crate::EndpointBuilder::history),
    /// next to the channel that serves them.
    pub fn history(mut self, pattern: &str, options: crate::HistoryOptions) -> Router {
        self.histories.push((pattern.into(), options));
        self
    }

    /// True when some route matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.route(topic).is_some()
    }

    pub(crate) fn route(&self, topic: &str) -> Option<Arc<dyn Starter>> {
        self.routes
            .iter()
            .find(|r| match r.pattern.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => *r.pattern == *topic,
            })
            .map(|r| r.starter.clone())
    }
}
