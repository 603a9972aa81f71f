//! I/O-free WebSocket: the upgrade handshake and the frame codec (tungstenite's frame header).
