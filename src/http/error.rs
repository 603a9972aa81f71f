//! The typed errors of the HTTP request parser, each mapped to the status and snake_case error
//! code the contract (`shared/protocol.md`) puts in the JSON error body.
//!
//! After any of these the caller answers once and closes the connection.

use thiserror::Error;

/// Why a request could not be parsed. See [`HttpError::status`] and [`HttpError::code`].
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// The head did not complete within the head limit (431).
    #[error("request head larger than {limit} bytes")]
    HeadTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// More header fields than [`crate::http::MAX_HEADERS`] (431).
    #[error("more than {limit} header fields")]
    TooManyHeaders {
        /// The limit in force.
        limit: usize,
    },
    /// The head is not valid HTTP/1.x syntax (400).
    #[error("malformed request: {0}")]
    Malformed(httparse::Error),
    /// A `Transfer-Encoding` header was sent (411). Chunked bodies are not supported: clients
    /// must send `Content-Length`.
    #[error("Transfer-Encoding is not supported, send the body with a Content-Length")]
    TransferEncoding,
    /// `Content-Length` is not a decimal number, overflows, or several disagree (400).
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// The announced body is larger than the body limit (413).
    #[error("request body of {length} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The announced `Content-Length`.
        length: u64,
        /// The limit in force.
        limit: usize,
    },
    /// HTTP/2 or another version than 1.0 and 1.1 (505).
    #[error("HTTP version not supported, use HTTP/1.1")]
    UnsupportedVersion,
    /// A path segment has a bad `%XX` escape or does not decode to UTF-8 (400).
    #[error("invalid percent-encoding in the request path")]
    BadPercentEncoding,
}

impl HttpError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge { .. } | HttpError::TooManyHeaders { .. } => 431,
            HttpError::Malformed(_)
            | HttpError::InvalidContentLength
            | HttpError::BadPercentEncoding => 400,
            HttpError::TransferEncoding => 411,
            HttpError::PayloadTooLarge { .. } => 413,
            HttpError::UnsupportedVersion => 505,
        }
    }

    /// The snake_case code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::HeadTooLarge { .. } | HttpError::TooManyHeaders { .. } => "header_too_large",
            HttpError::Malformed(_)
            | HttpError::InvalidContentLength
            | HttpError::BadPercentEncoding => "bad_request",
            HttpError::TransferEncoding => "length_required",
            HttpError::PayloadTooLarge { .. } => "payload_too_large",
            HttpError::UnsupportedVersion => "http_version_not_supported",
        }
    }
}
