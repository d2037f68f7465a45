//! How a device learns the gateway's knock key after `gatekeeper
//! rotate-key`, without anyone handing it a new credential: it knocks for
//! the gateway's tunnel listener and opens TLS there with the ALPN name
//! [`ALPN`]; the gateway, authenticated by the certificate the credential
//! pins, answers with a [`KeyNote`] and closes. Only public keys travel;
//! the knock keeps the listener invisible to everyone else.

use std::{
    io::Read,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tunnel::tls::{Fingerprint, TlsError, client_config};

use super::{
    Carrier,
    keys::{self, ServerKeys},
    send::{ClientError, Knocker},
};

/// The ALPN name that asks the tunnel listener for the key note.
pub const ALPN: &[u8] = b"gatekeeper-key-note/1";

/// A note is a few hundred bytes; more is not a note.
const MAX_NOTE: u64 = 4096;

/// What the gateway tells a device about its knock keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyNote {
    /// The key knocks should be sealed for from now on (base64).
    pub server_public_key: String,
    /// Until when (unix seconds) the key it replaced is still accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_accepted_until: Option<u64>,
}

impl KeyNote {
    pub fn of(keys: &ServerKeys) -> KeyNote {
        KeyNote {
            server_public_key: keys::encode(keys.public().as_bytes()),
            previous_accepted_until: keys.previous.as_ref().map(|p| p.accepted_until),
        }
    }
}

#[derive(Debug, Error)]
pub enum NoteError {
    #[error(transparent)]
    Knock(#[from] ClientError),
    #[error(
        "the credential pins no gateway certificate (tls_fingerprint), so the note could not be trusted: have the device enrolled again"
    )]
    NoPin,
    #[error(
        "the gateway's tunnel listener {0} did not answer after two knocks: is the gateway up, and is this device enrolled and enabled?"
    )]
    NoAnswer(SocketAddr),
    #[error("TLS setup")]
    Tls(#[from] TlsError),
    #[error("reading the key note from {at}")]
    Io {
        at: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gateway at {at} sent no usable key note ({reason}): is it older than this client?")]
    Unreadable { at: SocketAddr, reason: String },
}

/// What a device learns from its gateway: the knock keys, and the pin of
/// the key the gateway's certificate has, seen over the pinned connection
/// (a credential from before key pins pins the whole certificate, which
/// the next renewal changes).
#[derive(Debug)]
pub struct Fetched {
    pub note: KeyNote,
    pub tls_pin: Option<Fingerprint>,
}

/// Knocks for the tunnel listener at `server` and reads the key note
/// there, trusting only the certificate the credential pins.
pub fn fetch(k: &Knocker, server: IpAddr, timeout: Duration) -> Result<Fetched, NoteError> {
    let pin = k.tls_fingerprint().ok_or(NoteError::NoPin)?;
    let pin: Fingerprint = pin.parse()?;
    let at = SocketAddr::new(server, k.tunnel_port());
    let tcp = k
        .knock_and_connect(at, timeout, Carrier::Udp)?
        .ok_or(NoteError::NoAnswer(at))?;
    let io = |source| NoteError::Io { at, source };
    tcp.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut config = (*client_config(pin)?).clone();
    config.alpn_protocols = vec![ALPN.to_vec()];
    let name = ServerName::try_from("gatekeeper").expect("a valid DNS name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(TlsError::from)?;
    let mut text = Vec::new();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    (&mut stream)
        .take(MAX_NOTE)
        .read_to_end(&mut text)
        .map_err(|e| io(tunnel::tls::PinMismatch::explain(e)))?;
    let tls_pin = stream
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(Fingerprint::of_key);
    let note = serde_json::from_slice(&text).map_err(|e| NoteError::Unreadable {
        at,
        reason: e.to_string(),
    })?;
    Ok(Fetched { note, tls_pin })
}
