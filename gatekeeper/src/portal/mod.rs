//! The portal: a TLS listener that authorizes a connection by a knock
//! carried inside its ClientHello, and shows everyone else a guidance page.
//!
//! - [`client_hello`]: finding, removing and inserting the knock extension
//!   in the raw ClientHello record, so both rustls peers hash the same bytes,
//!   and the nonce that binds a knock to its ClientHello.
//! - [`stream`]: the stream shims that do so on live connections.
//! - [`guidance`]: the one page every unauthorized request gets.
//! - [`listener`]: the daemon's side: limits, read, ask, handshake, then
//!   relay or guide.
//! - [`connector`]: the client's side, for `gatekeeper portal` and
//!   `connect --portal`.
//! - [`acme`]: the portal's certificate from an ACME CA.

#[cfg(feature = "gateway")]
pub mod acme;
pub mod client_hello;
pub mod connector;
#[cfg(feature = "gateway")]
pub mod guidance;
#[cfg(feature = "gateway")]
pub mod listener;
pub mod stream;
