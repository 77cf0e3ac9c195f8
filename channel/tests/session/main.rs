//! The socket state machine, [`fawkes_channel::Session`], driven in memory as a transport drives
//! it (connect, `handle_frame`, `outbound`), against the test router in `support`.
//!
//! Every test runs on tokio's paused clock: a timeout is reached by moving the clock
//! (`tokio::time::advance`, or a `timeout` that the runtime runs through at once when nothing
//! else can happen), never by waiting, so the suite is deterministic and takes no real time.

mod channels;
mod history;
mod lifecycle;
mod stats;
mod support;
