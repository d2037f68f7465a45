//! The portal's question to the daemon's knock service, which owns the
//! verifier, the replay cache and the audit trail: what may this TLS
//! connection reach?

use tokio::sync::oneshot;

use super::{verify::Knock, wire::NONCE_LEN};

/// One connection, as the portal saw it.
pub struct Ask {
    /// The TCP connection, with the knock from its ClientHello (if any) as
    /// the payload.
    pub knock: Knock,
    /// What the knock's nonce must be for its ClientHello; `None`: the
    /// ClientHello carried no knock.
    pub binding: Option<[u8; NONCE_LEN]>,
    pub reply: oneshot::Sender<Verdict>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Authorized, as the client with this id: relay to `addr`
    /// (`HOST:PORT`), or to the relayed host the session asks for.
    Upstream { addr: String, client: u32 },
    /// Everyone else: the guidance page.
    Guidance,
}
