//! What Gatekeeper's tests, demo and benchmarks share:
//!
//! - [`lab`]: network namespaces wired into a small network, processes and
//!   sockets inside them, all removed again on drop.
//! - [`frames`]: Ethernet frames built byte by byte, and a seeded generator
//!   of well-formed and malformed ones.
//! - [`model`]: the reference tables that let `gatekeeper_common::decide`
//!   predict what the real XDP program must do.
//! - [`nmap`]: running nmap and reading what it found.
//! - [`redis`]: Redis servers and Sentinels of the lab's own, in a lab
//!   namespace.
//! - [`clients`]: the client-only builds, and Wine running the Windows one.
//! - [`channel`]: devices with paired channel identities, and the peers
//!   channel tests meet: OpenSSH, Tongsuo, tshark.
//! - [`cluster`]: gateway nodes started on the lab's Redis.
//! - [`fwknop`]: the stock fwknop client on a lab host.
//! - [`relay`]: a gateway serving relayed hosts, an agent host that
//!   reaches only Redis, and the private HTTP service behind it.
//! - [`traffic`]: line-rate floods from an XDP_TX program on live frames.
//! - [`tun`]: a tun device a test drives like a VPN daemon.
//! - [`pki`]: a certificate authority of a test's own.
//! - [`pebble`]: Pebble, an ACME CA, on a lab host.

pub mod channel;
pub mod clients;
pub mod cluster;
pub mod frames;
pub mod fwknop;
pub mod lab;
pub mod model;
pub mod nmap;
pub mod pebble;
pub mod pki;
pub mod redis;
pub mod relay;
pub mod traffic;
pub mod tun;
