//! Sessions between HTTP requests, shared by the request/response transports (long-poll, SSE).
#![forbid(unsafe_code)]

mod answer;
mod forward;
mod ingest;
mod service;
mod sessions;
mod token;

pub use answer::{Answer, HttpBody, HttpError};
pub use service::{HttpService, HttpTransport, query_param};
pub use sessions::{DetachedSession, Lookup, Read, ReadEvent, Remote, SessionOptions, Sessions, connect_info};
pub use token::{MAX_TOKEN_PAYLOAD, SessionSigner, random_session_id};
