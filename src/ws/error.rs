//! The typed errors of the WebSocket handshake and frame decoder.
//!
//! Handshake errors happen before the upgrade and are answered over HTTP
//! ([`WsError::status`]); decoder errors close the connection with
//! [`WsError::close_code`] (RFC 6455 §7.4.1).

use thiserror::Error;

/// Close code 1002: protocol error.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code 1007: invalid payload data (bad UTF-8).
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
/// Close code 1009: message too big.
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

/// A failed handshake or a WebSocket protocol violation by the client.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WsError {
    /// The upgrade request is not a `GET`.
    #[error("WebSocket upgrade must be a GET request")]
    NotGet,
    /// `Upgrade: websocket` / `Connection: upgrade` missing.
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` missing or not 13.
    #[error("unsupported WebSocket version, only 13 is supported")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing or not the base64 of 16 bytes.
    #[error("missing or invalid Sec-WebSocket-Key")]
    BadKey,
    /// A frame broke RFC 6455 framing rules (close code 1002).
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason is not valid UTF-8 (close code 1007).
    #[error("WebSocket text is not valid UTF-8")]
    InvalidUtf8,
    /// A message is larger than the decoder's limit (close code 1009).
    #[error("WebSocket message larger than {limit} bytes")]
    MessageTooBig {
        /// The limit in force.
        limit: usize,
    },
}

impl WsError {
    /// The close code to send before dropping the connection.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::InvalidUtf8 => CLOSE_INVALID_PAYLOAD,
            WsError::MessageTooBig { .. } => CLOSE_MESSAGE_TOO_BIG,
            WsError::NotGet
            | WsError::NotUpgrade
            | WsError::UnsupportedVersion
            | WsError::BadKey
            | WsError::Protocol(_) => CLOSE_PROTOCOL_ERROR,
        }
    }

    /// The HTTP status for a failed handshake: 426 for a wrong version (answer with
    /// `Sec-WebSocket-Version: 13`), 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            WsError::UnsupportedVersion => 426,
            _ => 400,
        }
    }

    /// A snake_case code for a JSON error body or an `ERROR` frame.
    pub fn code(&self) -> &'static str {
        match self {
            WsError::NotGet | WsError::NotUpgrade | WsError::BadKey => "bad_request",
            WsError::UnsupportedVersion => "upgrade_required",
            WsError::Protocol(_) => "protocol_error",
            WsError::InvalidUtf8 => "invalid_payload",
            WsError::MessageTooBig { .. } => "message_too_big",
        }
    }
}
