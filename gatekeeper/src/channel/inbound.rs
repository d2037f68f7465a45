//! An inbound channel: accepts channels from pinned peers under its
//! policy, reads the original connection's header, and connects to the
//! backend as the channel's `source` says. A peer that offers nothing of
//! the policy, or presents a certificate that is not pinned, is refused
//! and audited with what it offered or presented.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use rustls::{CipherSuite, ServerConfig, server::Acceptor};
use serde_json::json;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};
use tracing::{debug, warn};
use tunnel::tls::{Fingerprint, PinMismatch};

use super::{
    config::{self, Source},
    header::Origin,
    policy::suite_name,
    transparent,
};
use crate::{audit::Audit, error_chain};

/// How long a peer may take to finish its handshake and send its header.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    pub channel: config::Inbound,
    pub tls: Arc<ServerConfig>,
    /// Which paired peer each pinned certificate belongs to.
    pub peers: HashMap<Fingerprint, String>,
    pub audit: Audit,
}

impl Inbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let name = self.channel.name.clone();
        super::accept_each(&name, listener, |tcp, remote| self.clone().carry(tcp, remote)).await
    }

    /// Audits a refusal: `reason` a short code, `detail` the words. The
    /// sender is not proven, so a flood of refusals is summarized by the
    /// audit writer rather than written a line each.
    fn refuse(&self, remote: SocketAddr, reason: &'static str, detail: &str, offered: &[CipherSuite]) {
        debug!(channel = %self.channel.name, %remote, reason, detail, "channel refused");
        let offered: Vec<String> = offered.iter().map(|s| suite_name(*s)).collect();
        self.audit.refused(
            "channel_refused",
            reason,
            remote.ip(),
            json!({"channel": self.channel.name, "remote": remote.to_string(), "policy": self.channel.policy.label(),
                   "offered": offered, "detail": detail}),
        );
    }

    async fn carry(self: Arc<Self>, tcp: TcpStream, remote: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.accept(tcp, remote)).await;
        let Ok(Some((mut tls, origin))) = accepted else {
            if accepted.is_err() {
                let detail = format!("no handshake and header within {HANDSHAKE_TIMEOUT:?}");
                self.refuse(remote, "timeout", &detail, &[]);
            }
            return;
        };
        let name = &self.channel.name;
        let mut backend = match self.connect_backend(origin).await {
            Ok(backend) => backend,
            Err(e) => {
                warn!(channel = %name, backend = %self.channel.backend, error = %e, "backend unreachable");
                self.audit.event(
                    "channel_failed",
                    json!({"channel": name, "client": origin.client.to_string(), "backend": self.channel.backend.to_string(),
                           "reason": format!("connecting to the backend: {e}")}),
                );
                return;
            }
        };
        let (up, down) = super::carry(&mut tls, &mut backend).await;
        self.audit.event(
            "channel_closed",
            json!({"channel": name, "direction": "inbound", "client": origin.client.to_string(), "up": up, "down": down}),
        );
    }

    /// The handshake and the header; `None` once refused and audited.
    async fn accept(&self, tcp: TcpStream, remote: SocketAddr) -> Option<(TlsStream<TcpStream>, Origin)> {
        let start = match LazyConfigAcceptor::new(Acceptor::default(), tcp).await {
            Ok(start) => start,
            Err(e) => {
                self.refuse(remote, "not_tls", &format!("not a TLS ClientHello: {e}"), &[]);
                return None;
            }
        };
        let offered = start.client_hello().cipher_suites().to_vec();
        let ours = &self.tls.crypto_provider().cipher_suites;
        let admitted = offered.iter().any(|o| ours.iter().any(|s| s.suite() == *o));
        // Even a peer outside the policy gets its handshake_failure alert
        // from the handshake itself, so it learns why.
        let handshake = start.into_stream(self.tls.clone()).await;
        let mut tls = match (handshake, admitted) {
            (Ok(tls), true) => tls,
            (_, false) => {
                let detail = format!("the peer offered no suite of policy {:?}", self.channel.policy.label());
                self.refuse(remote, "policy", &detail, &offered);
                return None;
            }
            (Err(e), true) => {
                let reason = if PinMismatch::behind(&e).is_some() {
                    "unpinned"
                } else {
                    "handshake"
                };
                let e = PinMismatch::explain(e);
                self.refuse(remote, reason, &error_chain(&e), &offered);
                return None;
            }
        };
        let origin = match Origin::read(&mut tls).await {
            Ok(origin) => origin,
            Err(e) => {
                self.refuse(remote, "header", &error_chain(&e), &[]);
                return None;
            }
        };
        let session = tls.get_ref().1;
        let suite = session.negotiated_cipher_suite().map(|s| suite_name(s.suite()));
        let peer = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| self.peers.get(&Fingerprint::of(cert)));
        self.audit.event(
            "channel_open",
            json!({"channel": self.channel.name, "direction": "inbound", "peer": peer, "remote": remote.to_string(),
                   "client": origin.client.to_string(), "destination": origin.destination.to_string(), "suite": suite}),
        );
        debug!(channel = %self.channel.name, ?origin, "channel open");
        Some((tls, origin))
    }

    async fn connect_backend(&self, origin: Origin) -> std::io::Result<TcpStream> {
        let backend = self.channel.backend;
        match self.channel.source {
            Source::Channel => TcpStream::connect(backend).await,
            Source::Client => transparent::connect_from(origin.client, backend).await,
            Source::ProxyV2 => {
                let mut stream = TcpStream::connect(backend).await?;
                stream.write_all(&origin.encode()).await?;
                Ok(stream)
            }
        }
    }
}
