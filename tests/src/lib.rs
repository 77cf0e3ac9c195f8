#![allow(missing_debug_implementations)]
//! Shared pieces of the cross-crate tests and the server the phoenix.js suite drives: the demo
//! routes plus the `test:*` channel.
//!
//! The `test:*` contract (also driven by the phoenix.js suite in `tests/js`):
//! - join params `{"refuse": R}` answer error `{"reason": R}`; `{"crash": true}` panics in join
//!   (error `{"reason": "join crashed"}`); `{"welcome": true}` pushes `welcome` right after the
//!   join reply; otherwise ok
//!   `{"topic": T, "token": <auth token or null>, "params": <connect params>}`.
//! - events: `crash` panics; `stop` replies ok then stops normally; `push`/`broadcast`/
//!   `broadcast_from` `{"event", "payload"}` do that and reply ok; `binary_push`/`binary_broadcast`
//!   send event `binary` with bytes `[1, 2, 3, 255]`; `noreply` answers nothing; `error_reply`
//!   replies error `{"reason": "requested"}`; `echo` replies ok with the payload; `deferred_push`
//!   replies ok, then another task pushes `deferred` with the payload; anything else
//!   replies error `{"reason": "unknown event"}`.
//! - connect is refused when the params contain `reject=true`.
//!
//! (The channel and the connect callback are `fawkes_testkit`'s.)

use fawkes::{Config, Endpoint, Router};

/// The `test:*` channel, its `binary` bytes and its connect callback live in the conformance kit.
pub use fawkes_testkit::{BINARY, TestChannel};

/// The demo routes plus `test:*`.
pub fn router() -> Router {
    fawkes_server::demo::router().channel("test:*", TestChannel::default)
}

/// An endpoint with the test routes and connect callback.
pub fn endpoint(config: Config) -> Endpoint {
    endpoint_with(router(), config)
}

/// An endpoint with `router` and the test connect callback.
pub fn endpoint_with(router: Router, config: Config) -> Endpoint {
    Endpoint::builder().router(router).config(config).on_connect(fawkes_testkit::connect).build()
}
