//! The SSE shapes on the session layer of `fawkes-http`: an event stream down; `POST`s up are
//! the layer's.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::{fmt, future::Future, pin::Pin, task::Context, task::Poll};

use bytes::Bytes;
use fawkes_channel::{Endpoint, Frame};
use fawkes_http::{CutWatch, HttpBody, HttpService, HttpTransport, Lookup, Read, ReadEvent, Sessions};
use futures_util::{StreamExt as _, stream};
use http::{HeaderValue, Request, Response, header, request::Parts};
use http_body::Body;
use http_body_util::{BodyExt as _, StreamBody};

use crate::SseOptions;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Frames one stream takes from the outbound queue at a time.
const BATCH: usize = 256;
/// Bytes of frames one stream takes from the outbound queue at a time (a larger frame goes
/// alone). What a stream has taken waits in the HTTP layer's buffer while the peer does not read:
/// small, so that a stalled reader holds little besides its queue.
const CHUNK_BYTES: usize = 32 * 1024;

/// A response body: a short JSON answer, or a session's event stream.
pub type SseBody = HttpBody;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The events a session sent recently, to resend after a reconnect: their frames (a broadcast's
/// is shared with every other subscriber) and ids, written out again when resent.
#[derive(Default)]
struct Replay {
    events: VecDeque<(u64, Frame)>,
    /// Bytes of the frames in `events`.
    bytes: usize,
    last_id: u64,
}

impl Replay {
    /// Numbers `frame`, writes its event to `out` and keeps it, within the window's bounds.
    fn push(&mut self, frame: Frame, options: &SseOptions, out: &mut Vec<u8>) {
        self.last_id += 1;
        write_event(out, self.last_id, &frame);
        self.bytes += frame.len();
        self.events.push_back((self.last_id, frame));
        while self.events.len() > options.replay_window || self.bytes > options.replay_window_bytes {
            let Some((_, old)) = self.events.pop_front() else { break };
            self.bytes -= old.len();
        }
    }
}

struct Sse {
    options: SseOptions,
}

impl HttpTransport for Sse {
    type State = Mutex<Replay>;
    const NAME: &'static str = "sse";
    const OWN_PARAMS: &'static [&'static str] = &["token", "last_event_id"];

    fn new_state(&self) -> Mutex<Replay> {
        Mutex::default()
    }

    async fn get(&self, sessions: &Sessions<Self>, mut parts: Parts) -> Response<HttpBody> {
        let token = fawkes_http::query_param(parts.uri.query(), "token");
        let header = parts.headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let last = header.or_else(|| fawkes_http::query_param(parts.uri.query(), "last_event_id"));
        let last = last.and_then(|v| v.trim().parse::<u64>().ok());
        // A stream cannot be forwarded: one that reaches another node than its session's starts
        // a new session there (its `phx_session` token differs, so the client rejoins).
        if let Lookup::Here(session) = sessions.lookup(token.as_deref()) {
            // Take the session's reads over first, then look at the window: events the stream
            // being replaced numbers in between are sent by this one, never lost between the two.
            let read = session.read();
            let window = lock(session.state());
            // A `last` past the latest id (forged) resumes from the latest, as no `last` does.
            let cursor = last.map_or(window.last_id, |last| last.min(window.last_id));
            let resumed = events_after(&window, cursor);
            drop(window);
            if let Some((replay, cursor)) = resumed {
                return self.attach(sessions, read, replay, cursor);
            }
            drop(read);
            sessions.end(&session); // events after `last` left the window: a new session starts
        }
        match sessions.open(&mut parts).await {
            Ok(session) => {
                let read = session.read();
                let cursor = lock(session.state()).last_id;
                self.attach(sessions, read, Vec::new(), cursor)
            }
            // EventSource sees only the HTTP status of a refused stream.
            Err(e) => e.answer().in_http_status().into_response(),
        }
    }
}

impl Sse {
    /// Streams the session of `read` (which ended the stream attached before): `replay`, then
    /// the events after `cursor`. The response carries a [`ConnectionCut`](fawkes_http::ConnectionCut),
    /// cut when the read ends (the session closed, or a newer stream took over): a stream whose
    /// peer stopped reading is never polled again, so it could not end by itself.
    fn attach(
        &self,
        sessions: &Sessions<Self>,
        read: Read<Mutex<Replay>>,
        replay: Vec<u8>,
        cursor: u64,
    ) -> Response<HttpBody> {
        let first = [event("event: phx_session", read.session().token()), replay.into()].concat();
        let (cut, watch) = read.cut_when_ended();
        let events = Events { sessions: sessions.clone(), read: Some(read), cursor, _watch: watch };
        let events = stream::unfold(events, |mut events| async move { Some((events.next().await?, events)) });
        let chunks = stream::iter([Bytes::from(first)]).chain(events);
        let mut res = Response::new(StreamBody::new(chunks.map(|c| Ok(http_body::Frame::data(c)))).boxed_unsync());
        res.extensions_mut().insert(cut);
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        res
    }
}

/// Server-Sent Events for an [`Endpoint`]. Mount it at `{path}/sse`. Cheap to clone; clones
/// share sessions.
///
/// When the endpoint's [`PubSub`](fawkes_channel::PubSub) is clustered, a `POST` whose token
/// names a session on another node is forwarded to it, so a client's stream and its `POST`s may
/// reach different nodes (no sticky sessions). Every node must then share [`SseOptions::secret`].
#[derive(Clone)]
pub struct SseService(HttpService<Sse>);

impl fmt::Debug for SseService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseService").field("sessions", &self.sessions()).finish_non_exhaustive()
    }
}

impl SseService {
    /// A service for `endpoint` with default options.
    pub fn new(endpoint: Endpoint) -> SseService {
        SseService::with_options(endpoint, SseOptions::default())
    }

    /// A service for `endpoint` with `options`.
    pub fn with_options(endpoint: Endpoint, options: SseOptions) -> SseService {
        let shared = options.session_options();
        SseService(HttpService::new(Sse { options }, endpoint, shared))
    }

    /// Number of live SSE sessions on this node.
    pub fn sessions(&self) -> usize {
        self.0.sessions().len()
    }

    /// Handles one request.
    pub async fn handle<B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static>(
        &self,
        req: Request<B>,
    ) -> Response<SseBody> {
        self.0.handle(req).await
    }
}

impl<B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static> tower_service::Service<Request<B>> for SseService {
    type Response = Response<SseBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

/// The events after `cursor` from the replay window, and the id of the last; `None` when some of
/// them are no longer in it.
fn events_after(replay: &Replay, cursor: u64) -> Option<(Vec<u8>, u64)> {
    let oldest = replay.events.front().map_or(replay.last_id + 1, |(id, _)| *id);
    if cursor + 1 < oldest {
        return None;
    }
    let skip = usize::try_from(cursor + 1 - oldest).unwrap_or(usize::MAX);
    let mut events = Vec::new();
    for (id, frame) in replay.events.iter().skip(skip) {
        write_event(&mut events, *id, frame);
    }
    Some((events, replay.last_id))
}

/// One attached stream. It takes frames from the outbound queue only when polled, so a reader
/// that stops reading leaves them queued, where the endpoint's limit applies.
struct Events {
    sessions: Sessions<Sse>,
    /// Taken when the stream ends, so an ended stream holds no session.
    read: Option<Read<Mutex<Replay>>>,
    /// The id of the last event this stream sent. Events after it that a replaced stream
    /// numbered (it took them from the queue just before the takeover) go out with the next.
    cursor: u64,
    /// Watches for the read's end, to cut the connection; dropped with the stream.
    _watch: CutWatch,
}

impl Events {
    /// The next chunk of the stream: events, a keep-alive comment, or the close event; `None` once
    /// it ended. Events are numbered, and the last of them kept within the replay window.
    async fn next(&mut self) -> Option<Bytes> {
        let read = self.read.as_mut()?;
        let mut frames = Vec::new();
        let options = &self.sessions.transport().options;
        let idle = match read.next(&mut frames, BATCH, CHUNK_BYTES, options.keep_alive).await {
            ReadEvent::Frames => false,
            ReadEvent::Idle => true,
            ReadEvent::Released => {
                self.read = None;
                return None;
            }
            ReadEvent::Closed(reason) => {
                self.sessions.end(read.session());
                self.read = None;
                return Some(event("event: phx_socket_close", &reason.to_string()));
            }
        };
        let out = {
            let replay = &mut *lock(read.session().state());
            // First what a replaced stream numbered after this one's cursor (usually nothing).
            events_after(replay, self.cursor).map(|(mut out, _)| {
                for frame in frames {
                    replay.push(frame, options, &mut out);
                }
                self.cursor = replay.last_id;
                out
            })
        };
        match out {
            Some(out) if out.is_empty() && idle => Some(": keep-alive\n\n".into()),
            Some(out) => Some(out.into()),
            None => {
                // More than the window was numbered past this stream: the client rejoins.
                self.sessions.end(read.session());
                self.read = None;
                Some(event("event: phx_socket_close", "events lost between two streams"))
            }
        }
    }
}

/// One SSE event: `head` (its `event:` line), then `data`, one `data:` line per line.
fn event(head: &str, data: &str) -> Bytes {
    let mut out = Vec::new();
    write_lines(&mut out, head, data);
    out.into()
}

/// Writes the event of message `id` to `out`: its `id:` line, then the frame's `data:` lines.
fn write_event(out: &mut Vec<u8>, id: u64, frame: &Frame) {
    write_lines(out, &format!("id: {id}"), &String::from_utf8_lossy(frame.as_bytes()));
}

/// Writes `head`, then `data` as one `data:` line per line, then the blank line ending an event.
fn write_lines(out: &mut Vec<u8>, head: &str, data: &str) {
    out.extend_from_slice(head.as_bytes());
    for line in data.split('\n') {
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(line.as_bytes());
    }
    out.extend_from_slice(b"\n\n");
}
