//! Published services: issuing and revoking tunnels, and the tokens their
//! agents carry. A token holds everything an agent needs (where and how to
//! knock, the pin of the gateway's TLS key, the tunnel secret); the
//! gateway keeps only a hash of the secret, in the tunnel's record in the
//! store.
//!
//! - [`gateway`]: the daemon's side: the TLS listener for agents, one
//!   published port per connected tunnel.
//! - [`manage`]: the operator's side: issue, pause, update, re-issue,
//!   revoke.
//! - [`agent`]: the private network's side.
//! - [`socks`]: SOCKS5 mode, an agent publishing a private network.

pub mod agent;
#[cfg(feature = "gateway")]
pub mod gateway;
#[cfg(feature = "gateway")]
pub mod manage;
pub mod socks;

use std::net::IpAddr;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tunnel::tls::{Fingerprint, TlsError};

#[cfg(feature = "gateway")]
use crate::store::StoreError;
use crate::{knock::credential::Credential, spec::PortRange};

const TOKEN_PREFIX: &str = "gkt1.";

/// The gateway's TLS listener for agents, unless `[tunnel] port` says otherwise.
pub const DEFAULT_TUNNEL_PORT: u16 = 7443;

/// The ALPN name of a connection that ends its tunnel's session on the
/// agent operator's behalf (`gatekeeper agent --stop`).
pub const STOP_ALPN: &[u8] = b"gatekeeper-agent-stop/1";

#[derive(Debug, Error)]
pub enum TunnelError {
    #[cfg(feature = "gateway")]
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no enrolled client named {0:?}: enroll it first with `gatekeeper client add`")]
    NoSuchClient(String),
    #[error("port {0} is already published by tunnel {1:?}")]
    PortTaken(u16, String),
    #[error("every port in {0} is leased: widen [tunnel] ports in gatekeeper.toml")]
    NoFreePort(PortRange),
    #[error("tunnel {0:?} is revoked or expired: issue a new one")]
    NotLive(String),
    #[error("bad token: {0}. A token starts with {TOKEN_PREFIX}; copy it whole from `gatekeeper tunnel issue`")]
    BadToken(String),
}

/// What `gatekeeper tunnel issue` prints, for the agent's operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub name: String,
    pub token_id: String,
    /// Hex.
    pub secret: String,
    pub gateway: Vec<IpAddr>,
    /// In a cluster: every node's own address. The agent keeps a session
    /// to each, so a visitor is served by whichever node the shared
    /// address hands them to. Empty: one session, to the first `gateway`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<IpAddr>,
    pub tunnel_port: u16,
    /// SHA-256 pin of the gateway's TLS public key, hex (of its whole
    /// certificate in tokens from before key pins).
    pub fingerprint: String,
    /// The agent's own knock credential.
    pub credential: Credential,
}

impl Token {
    pub fn encode(&self) -> String {
        // Strings, numbers and addresses: always serializable.
        let json = serde_json::to_vec(self).expect("a token serializes to JSON");
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn decode(text: &str) -> Result<Token, TunnelError> {
        let body = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| TunnelError::BadToken("the prefix is missing".into()))?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TunnelError::BadToken(format!("not base64url ({e})")))?;
        serde_json::from_slice(&json).map_err(|e| TunnelError::BadToken(format!("not a v1 token ({e})")))
    }

    pub fn fingerprint(&self) -> Result<Fingerprint, TunnelError> {
        Ok(self.fingerprint.parse()?)
    }

    pub fn secret_bytes(&self) -> Result<Vec<u8>, TunnelError> {
        crate::hex::decode(&self.secret).ok_or_else(|| TunnelError::BadToken("the secret is not hex".into()))
    }
}
