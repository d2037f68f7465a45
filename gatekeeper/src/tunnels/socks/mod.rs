//! SOCKS5 mode: an agent that publishes a private network, not one
//! service (`agent --socks5 --allow-dest CIDR:PORTS`). The work is split
//! where each side knows best: the gateway speaks SOCKS5 (RFC 1928, no
//! authentication, CONNECT only) to the visitor, who got there by knocking,
//! and audits every destination asked for; the agent resolves the name in
//! its own network, checks it against its allow list, connects, and
//! answers with one status byte before the stream carries data. A SOCKS5
//! library would do both halves in one place, so this is the protocol's
//! few bytes by hand.
//!
//! On the stream: the `Open` frame's payload is `socks5 VISITOR HOST:PORT`;
//! the agent's first byte is a SOCKS5 reply code ([`SUCCEEDED`],
//! [`NOT_ALLOWED`], [`UNREACHABLE`], [`REFUSED`]).
//!
//! - [`gateway`]: the visitor's side of the protocol, and the audit.
//! - [`agent`]: resolving, admitting and connecting in the private network.

pub mod agent;
#[cfg(feature = "gateway")]
pub mod gateway;

use std::time::Duration;

pub const SUCCEEDED: u8 = 0;
pub const NOT_ALLOWED: u8 = 2;
pub const UNREACHABLE: u8 = 4;
pub const REFUSED: u8 = 5;

/// How long a visitor may take for its SOCKS5 request, and the agent for
/// its answer.
const HANDSHAKE: Duration = Duration::from_secs(10);
