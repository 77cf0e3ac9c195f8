//! The contract between Fawkes nodes, for PubSub adapter authors.
#![forbid(unsafe_code)]
