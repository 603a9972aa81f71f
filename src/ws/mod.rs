//! I/O-free WebSocket (RFC 6455): the upgrade handshake and the frame codec.
//!
//! - [`handshake`]: validates an upgrade [`crate::http::Request`] and writes the `101`
//!   answer (accept key from tungstenite's `derive_accept_key`).
//! - [`codec`]: a [`Decoder`] that turns bytes of a `BytesMut` read buffer into [`Event`]s
//!   (frame headers parsed by tungstenite's `FrameHeader`, payloads unmasked in place and
//!   split off without copying, fragmented messages reassembled), and `write_*` functions
//!   that append unmasked server frames to an output `BytesMut`.
//!
//! Like [`crate::http`], nothing here does I/O: the connection loop in [`crate::shard`] feeds
//! the buffers. A [`WsError`] from the decoder means "send a close frame with
//! [`WsError::close_code`] and drop the connection".

pub mod codec;
pub mod error;
pub mod handshake;

pub use codec::{
    write_binary, write_close, write_frame_header, write_ping, write_pong, write_text,
    write_text_header, Decoder, Event, MAX_CONTROL_PAYLOAD, MAX_MESSAGE_BYTES,
};
pub use error::WsError;
pub use handshake::{accept, write_101};
pub use tungstenite::protocol::frame::coding::OpCode;
pub use tungstenite::protocol::frame::Utf8Bytes;
