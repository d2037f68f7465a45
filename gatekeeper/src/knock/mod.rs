//! Single-packet authorization, knock format v1: both ends of it.
//!
//! - [`keys`]: X25519 key pairs, key ids, and the per-client AEAD key.
//! - [`wire`]: the packet layout (see `docs/knock-v1.md`): sealing on the
//!   client, opening on the gateway.
//! - [`payload`]: the JSON a knock carries.
//! - [`credential`]: what a device keeps to knock: its credential and key file.
//! - [`fwknop`]: the stock fwknop client's packets, read on the gateway.
//! - [`enrollment`]: the one-line request a device sends and the credential it gets back.
//! - [`note`]: how a device learns the gateway's knock key after a rotation.
//! - [`verify`]: every check a knock must pass, and what it opens.
//! - [`ask`]: the question a listener that finds knocks outside the XDP
//!   ring (the portal) puts to the daemon's knock service, and its answer.
//! - [`send`]: the client side: sealing, sending, knock-then-connect.
//! - [`journal`]: the device's record of the knocks it sent.

#[cfg(feature = "gateway")]
pub mod ask;
pub mod credential;
pub mod enrollment;
#[cfg(feature = "gateway")]
pub mod fwknop;
pub mod journal;
pub mod keys;
pub mod note;
pub mod payload;
pub mod send;
#[cfg(feature = "gateway")]
pub mod verify;
pub mod wire;

/// How a knock travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Carrier {
    /// A TCP SYN to the port to open, from the port the client connects from.
    /// (fwknop's client also sends TCP to the knock port: a SYN with its
    /// packet, or its packet in a connection, which arrive as this carrier.)
    Syn,
    /// A UDP datagram to the gateway's knock port.
    Udp,
    /// An ICMP (or ICMPv6) echo request (fwknop's client sends replies).
    Icmp,
    /// An extension of a TLS ClientHello, to the portal.
    #[value(skip)]
    ClientHello,
}

impl Carrier {
    /// The name the audit log records.
    pub const fn name(self) -> &'static str {
        match self {
            Carrier::Syn => "tcp",
            Carrier::Udp => "udp",
            Carrier::Icmp => "icmp",
            Carrier::ClientHello => "tls_client_hello",
        }
    }
}
