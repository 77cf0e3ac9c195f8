//! The tower `Service` glue: dispatch by method, `POST` for every transport, CORS.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use fawkes_channel::Endpoint;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, header};
use http_body::Body;
use tower_http::cors::{AllowHeaders, AllowOrigin, Cors, CorsLayer};
use tower_layer::Layer as _;
use tower_service::Service;

use crate::ingest::{BodyKind, read_body};
use crate::{Answer, HttpBody, HttpError, HttpTransport, Lookup, SessionOptions, Sessions, query_param};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A transport as a tower `Service`: `GET` goes to the transport, `POST` to the session (on this
/// node or forwarded to its owner), `OPTIONS` is a CORS preflight, and every answer allows any
/// origin (the endpoint checks `Origin` itself at connect). Cheap to clone; clones share sessions.
pub struct HttpService<T: HttpTransport> {
    sessions: Sessions<T>,
    cors: Cors<Dispatch<T>>,
}

impl<T: HttpTransport> Clone for HttpService<T> {
    fn clone(&self) -> Self {
        HttpService { sessions: self.sessions.clone(), cors: self.cors.clone() }
    }
}

impl<T: HttpTransport> fmt::Debug for HttpService<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpService").field("sessions", &self.sessions).finish_non_exhaustive()
    }
}

/// PROTOCOL.md §4: any origin, requested headers echoed, cached an hour. tower-http writes
/// `access-control-allow-methods` only as `Method` tokens joined by `,`; Phoenix's (and ours) is
/// `get, post, options`, so that one header is added by [`HttpService::handle`].
fn cors_layer() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(std::time::Duration::from_secs(3600))
}

impl<T: HttpTransport> HttpService<T> {
    /// A service for `transport`'s sessions on `endpoint`.
    pub fn new(transport: T, endpoint: Endpoint, options: SessionOptions) -> HttpService<T> {
        let sessions = Sessions::new(transport, endpoint, options);
        crate::forward::serve(&sessions);
        let cors = cors_layer().layer(Dispatch(sessions.clone()));
        HttpService { sessions, cors }
    }

    /// The sessions.
    pub fn sessions(&self) -> &Sessions<T> {
        &self.sessions
    }

    /// Handles one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<HttpBody>
    where
        B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
    {
        self.sessions.start_reaper();
        let preflight = req.method() == Method::OPTIONS;
        let mut res = match self.cors.clone().call(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
        if preflight {
            let methods = HeaderValue::from_static("get, post, options");
            res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
        }
        res
    }
}

impl<T: HttpTransport, B> Service<Request<B>> for HttpService<T>
where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
{
    type Response = Response<HttpBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

/// The service inside the CORS layer: dispatch by method.
struct Dispatch<T: HttpTransport>(Sessions<T>);

impl<T: HttpTransport> Clone for Dispatch<T> {
    fn clone(&self) -> Self {
        Dispatch(self.0.clone())
    }
}

impl<T: HttpTransport, B> Service<Request<B>> for Dispatch<T>
where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
{
    type Response = Response<HttpBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let sessions = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            Ok(match parts.method {
                Method::GET => sessions.transport().get(&sessions, parts).await,
                Method::POST => sessions.post(&parts, body).await.into_response(),
                _ => HttpError::MethodNotAllowed.answer().into_response(),
            })
        })
    }
}

impl<T: HttpTransport> Sessions<T> {
    /// Answers a `POST`: its messages go to the session, here or on the node that owns it.
    async fn post<B>(&self, parts: &Parts, body: B) -> Answer
    where
        B: Body<Data = Bytes, Error: Into<BoxError>>,
    {
        let token = query_param(parts.uri.query(), "token");
        let lookup = self.lookup(token.as_deref());
        if let Lookup::Gone = lookup {
            return HttpError::SessionGone.answer();
        }
        let kind = BodyKind::of(&parts.headers);
        let body = match read_body(body, self.options().max_body_size).await {
            Ok(body) => body,
            Err(e) => return e.answer(),
        };
        match lookup {
            Lookup::Here(session) => self.post_here(&session, kind, body).await,
            Lookup::Elsewhere(remote) => self.forward_post(&remote, kind, &body).await,
            Lookup::Gone => HttpError::SessionGone.answer(),
        }
    }
}
