//! The client side of the portal: each connection gets a knock sealed for
//! its own ClientHello and source port, rides in a TLS session pinned to the
//! gateway's certificate, and carries one local stream (a browser's, curl's,
//! ssh's stdio) to the upstream.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, copy_bidirectional},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tracing::{info, warn};
use tunnel::tls::{Fingerprint, PinMismatch, client_config};

use super::{
    client_hello::binding_nonce,
    stream::{Knocking, Seal},
};
use crate::{
    knock::{
        Carrier,
        send::{ClientError, Knocker, Request},
    },
    spec::{PortRange, Proto},
};

pub struct PortalClient {
    knocker: Arc<Knocker>,
    portal: SocketAddr,
    /// The host name sent as SNI (a relayed host picks its agent with
    /// it); none: the portal's address, which sends no SNI.
    sni: Option<ServerName<'static>>,
    connector: TlsConnector,
}

impl PortalClient {
    /// A client for the portal at `portal` whose certificate has `pin`,
    /// asking for `sni` (a DNS name) if given.
    pub fn new(
        knocker: Knocker,
        portal: SocketAddr,
        pin: Fingerprint,
        sni: Option<ServerName<'static>>,
    ) -> Result<PortalClient, ClientError> {
        Ok(PortalClient {
            knocker: Arc::new(knocker),
            portal,
            sni,
            connector: TlsConnector::from(client_config(pin)?),
        })
    }

    /// One authorized TLS session to the portal.
    pub async fn connect(&self) -> io::Result<TlsStream<Knocking<TcpStream>>> {
        let tcp = TcpStream::connect(self.portal).await?;
        tcp.set_nodelay(true)?;
        let local = tcp.local_addr()?;
        let request = Request {
            proto: Proto::Tcp,
            ports: PortRange {
                lo: self.portal.port(),
                hi: self.portal.port(),
            },
            source_port: None,
        };
        let payload = self.knocker.payload_from(self.portal.ip(), &request, local);
        let knocker = self.knocker.clone();
        // The knock sealed for this ClientHello, kept for the journal.
        let sealed = Arc::new(Mutex::new(None));
        let keep = sealed.clone();
        let seal: Seal = Box::new(move |record| {
            let packet = knocker
                .seal_with_nonce(&payload, &binding_nonce(record))
                .map_err(io::Error::other)?;
            *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some(packet.clone());
            Ok(packet)
        });
        let name = self
            .sni
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(self.portal.ip().into()));
        let session = self
            .connector
            .connect(name, Knocking::new(seal, tcp))
            .await
            .map_err(PinMismatch::explain);
        let packet = sealed.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(packet) = packet {
            let outcome = if session.is_ok() { "tls_established" } else { "failed" };
            self.knocker.record(
                &packet,
                Carrier::ClientHello,
                self.portal.to_string(),
                &request,
                outcome,
            );
        }
        session
    }

    /// Carries `local` to the upstream until both sides end; returns the
    /// bytes sent each way.
    pub async fn carry<S: AsyncRead + AsyncWrite + Unpin>(&self, mut local: S) -> io::Result<(u64, u64)> {
        let mut remote = self.connect().await?;
        copy_bidirectional(&mut local, &mut remote).await
    }

    /// Accepts local connections on `listener` and carries each, forever.
    pub async fn listen(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (local, from) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accepting a local connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let client = self.clone();
            tokio::spawn(async move {
                let _ = local.set_nodelay(true);
                match client.carry(local).await {
                    Ok((up, down)) => info!(%from, up, down, "connection carried"),
                    Err(e) => warn!(%from, portal = %client.portal, error = %e, "carrying a connection failed"),
                }
            });
        }
    }
}
