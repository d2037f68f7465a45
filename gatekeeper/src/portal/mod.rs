//! The portal: a TLS listener that authorizes a connection by a knock
//! carried inside its ClientHello, and shows everyone else a guidance page.
//!
//! - [`client_hello`]: finding, removing and inserting the knock extension
//!   in the raw ClientHello record, so both rustls peers hash the same bytes.
//! - [`stream`]: the stream shims that do so on live connections.

pub mod client_hello;
pub mod stream;
