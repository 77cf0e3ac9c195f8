//! The `fawkes` server: wiring, metrics and the demo app.
#![forbid(unsafe_code)]
