//! An outbound channel: takes the connections applications make (to its
//! local service, or captured on their way to the real destination),
//! opens a channel to the peer for each, names the original connection in
//! a PROXY v2 header, and carries the bytes both ways.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use serde_json::json;
use thiserror::Error;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tracing::{debug, warn};

use super::{config, header::Origin, policy::suite_name};
use crate::{
    audit::Audit,
    error_chain,
    knock::{Carrier, send::Knocker},
};

/// How long dialing, knocking and the handshake may take together.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum OpenError {
    #[error("connecting to {0}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("{0} did not answer after two knocks: is the credential enrolled, and the channel's port in its policy?")]
    Unanswered(SocketAddr),
    #[error("knocking on {0}")]
    Knock(SocketAddr, #[source] crate::knock::send::ClientError),
    #[error("TLS handshake with {0}")]
    Handshake(SocketAddr, #[source] std::io::Error),
    #[error("opening the channel to {0} took longer than {OPEN_TIMEOUT:?}")]
    Timeout(SocketAddr),
}

pub struct Outbound {
    pub channel: config::Outbound,
    pub tls: TlsConnector,
    pub knocker: Option<Arc<Knocker>>,
    pub audit: Audit,
}

impl Outbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let name = self.channel.name.clone();
        super::accept_each(&name, listener, |app, client| self.clone().carry(app, client)).await
    }

    async fn carry(self: Arc<Self>, mut app: TcpStream, client: SocketAddr) {
        // A captured connection's local address is the one its client dialed.
        let Ok(destination) = app.local_addr() else { return };
        let origin = Origin { client, destination };
        let name = &self.channel.name;
        let mut tls = match tokio::time::timeout(OPEN_TIMEOUT, self.open()).await {
            Ok(Ok(tls)) => tls,
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => error_chain(&e),
                    _ => OpenError::Timeout(self.channel.connect).to_string(),
                };
                warn!(channel = %name, %reason, "channel not opened");
                let offered: Vec<String> = self
                    .tls
                    .config()
                    .crypto_provider()
                    .cipher_suites
                    .iter()
                    .map(|s| suite_name(s.suite()))
                    .collect();
                self.audit.event(
                    "channel_failed",
                    json!({"channel": name, "peer": self.channel.peer, "connect": self.channel.connect.to_string(),
                           "client": client.to_string(), "destination": destination.to_string(),
                           "policy": self.channel.policy.label(), "offered": offered, "reason": reason}),
                );
                return;
            }
        };
        let suite = tls.get_ref().1.negotiated_cipher_suite().map(|s| suite_name(s.suite()));
        self.audit.event(
            "channel_open",
            json!({"channel": name, "direction": "outbound", "peer": self.channel.peer,
                   "client": client.to_string(), "destination": destination.to_string(), "suite": suite}),
        );
        if let Err(e) = tls.write_all(&origin.encode()).await {
            debug!(channel = %name, error = %e, "sending the header");
            return;
        }
        let (up, down) = super::carry(&mut app, &mut tls).await;
        self.audit.event(
            "channel_closed",
            json!({"channel": name, "direction": "outbound", "client": client.to_string(), "up": up, "down": down}),
        );
    }

    async fn open(&self) -> Result<TlsStream<TcpStream>, OpenError> {
        let target = self.channel.connect;
        let tcp = match &self.knocker {
            None => TcpStream::connect(target)
                .await
                .map_err(|e| OpenError::Connect(target, e))?,
            Some(knocker) => {
                let knocker = knocker.clone();
                let knocked = tokio::task::spawn_blocking(move || {
                    knocker.knock_and_connect(target, Duration::from_secs(3), Carrier::Syn)
                })
                .await
                .map_err(|e| OpenError::Connect(target, std::io::Error::other(e)))?;
                let std = knocked
                    .map_err(|e| OpenError::Knock(target, e))?
                    .ok_or(OpenError::Unanswered(target))?;
                std.set_nonblocking(true).map_err(|e| OpenError::Connect(target, e))?;
                TcpStream::from_std(std).map_err(|e| OpenError::Connect(target, e))?
            }
        };
        let _ = tcp.set_nodelay(true);
        // Peers are pinned by certificate, so the name only fills the field.
        let name = ServerName::try_from("channel").expect("a valid DNS name");
        self.tls
            .connect(name, tcp)
            .await
            .map_err(|e| OpenError::Handshake(target, tunnel::tls::PinMismatch::explain(e)))
    }
}
