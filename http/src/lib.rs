//! Sessions between HTTP requests, shared by the request/response transports.
#![forbid(unsafe_code)]
