//! I/O-free HTTP/1.1: request-head parsing (httparse), bodies by Content-Length, and response
//! writing.
//!
//! Nothing here touches a socket. The connection loop (in [`crate::shard`]) reads into a
//! `bytes::BytesMut`, calls [`parse_request`] until it returns `Ok(None)` ("need more bytes"),
//! dispatches each [`Request`], and appends answers to an output `BytesMut` with the writers in
//! [`response`]. A parse error means the caller answers with [`HttpError::status`] /
//! [`HttpError::code`] (via [`write_json_error`]) and closes the connection; the parser never
//! tries to resynchronise.
//!
//! Pipelining falls out of the design: a complete request is split off the front of the buffer
//! and whatever follows stays there for the next call. The body is a zero-copy `Bytes` slice of
//! the read buffer.
//!
//! Memory note for callers: a body `Bytes` (and a WebSocket payload from [`crate::ws`]) keeps
//! the whole allocation of the read buffer it came from alive. Anything stored for long (a
//! message waiting in a queue) should be copied out (`Bytes::copy_from_slice`) or accounted
//! for at the size of the read chunk, not of the body.
//!
//! [`json`] holds the tiny JSON string escaper used for error bodies (and reused for WebSocket
//! frames).

pub mod error;
pub mod json;
pub mod request;
pub mod response;

pub use error::HttpError;
pub use request::{
    needs_continue, parse_request, percent_decode, Limits, Method, Request, Version,
    MAX_BODY_BYTES, MAX_HEADERS, MAX_HEAD_BYTES,
};
pub use response::{
    reason_phrase, write_continue, write_json_error, write_no_content, write_response,
};
