//! I/O-free HTTP/1.1: request-head parsing (httparse), bodies by Content-Length, and response writing.
