//! The TLS reverse tunnel, as a library the daemon embeds: an agent inside a
//! private network dials the gateway, and public connections to the gateway
//! are relayed to it. Independent of eBPF.
//!
//! - [`tls`]: the gateway's self-signed certificate, its renewal with the
//!   same key, and the agent's pinning of that key by SHA-256 (no CA).
//! - [`frame`]: the frames both sides exchange inside the session.
//! - [`record`]: the session's own record layer once TLS has agreed a
//!   secret: independent halves, many frames per record.
//! - [`mux`]: many streams over one session, each with its own window.
//! - [`splice`]: copying between a TCP connection and a stream.
//! - [`session`]: the agent handshake, and both ends relaying.

pub mod frame;
pub mod mux;
pub mod record;
pub mod session;
pub mod splice;
pub mod tls;
