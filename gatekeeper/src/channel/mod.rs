//! The channel layer: unmodified applications on two devices talk through
//! a TLS 1.3 channel under a mandated cipher policy, and the backend can
//! see the original client's address.
//!
//! ```text
//! app ──▶ outbound (local service, or captured  ══ TLS, policy ══▶ inbound ──▶ backend
//!          on its way to the real destination)    PROXY v2 first    (from the client's
//!                                                                     address, if asked)
//! ```
//!
//! `gatekeeper channel run` is a process of its own, beside the gateway
//! daemon rather than inside it: a device that carries channels need not
//! be a gateway, and a gateway's gate must not depend on the channel
//! layer's health. An inbound channel's port is protected by the gate
//! like any other; an outbound channel knocks first when its config
//! names a credential.
//!
//! - [`config`]: the `channels.toml` file.
//! - [`credentials`]: the device's SM2 and ECDSA identities, pinned peers.
//! - [`policy`]: what each cipher policy may negotiate.
//! - [`header`]: the original connection, as the first bytes of a channel.
//! - [`outbound`], [`inbound`]: the two ends.
//! - [`divert`], [`transparent`]: the kernel side of capture and of
//!   re-originating from the client's address.

pub mod config;
pub mod credentials;
pub mod divert;
pub mod header;
pub mod inbound;
pub mod outbound;
pub mod policy;
pub mod transparent;

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;
use tracing::info;

use self::{
    config::{Channels, Entry, Source},
    credentials::CredentialsError,
    divert::{Captured, DivertError},
};
use crate::audit::Audit;

#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("channel {channel:?}")]
    Credentials {
        channel: String,
        #[source]
        source: CredentialsError,
    },
    #[error("channel {channel:?}: TLS configuration")]
    Tls {
        channel: String,
        #[source]
        source: rustls::Error,
    },
    #[error("channel {channel:?}: listening on {addr}")]
    Listen {
        channel: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("channel {channel:?}: the knock credential {}", path.display())]
    Knock {
        channel: String,
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("setting up capture and re-origination")]
    Divert(#[from] DivertError),
    #[error("opening the audit log {}", .0.display())]
    Audit(std::path::PathBuf, #[source] std::io::Error),
}

/// How much each direction of a carried connection reads at once: 64 KiB
/// reads fill four full 16 KiB TLS records per system call, where the
/// 8 KiB default makes half-size records and twice the calls.
const COPY_BUFFER: usize = 64 * 1024;

/// Copies both ways until both directions end; bytes (a to b, b to a).
async fn carry<A, B>(a: &mut A, b: &mut B) -> (u64, u64)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER)
        .await
        .unwrap_or_default()
}

/// Accepts connections on `listener` for ever, each carried by a task of
/// its own; a failed accept (out of descriptors) is logged and retried
/// after a pause rather than spun on.
async fn accept_each<F, Fut>(channel: &str, listener: TcpListener, mut carry: F)
where
    F: FnMut(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, from)) => {
                tokio::spawn(carry(tcp, from));
            }
            Err(e) => {
                tracing::warn!(channel, error = %e, "accepting a connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Where each channel listens, once all are up.
#[derive(Debug)]
pub struct Running {
    pub listening: Vec<(String, SocketAddr)>,
}

/// Sets every channel up, then carries connections until `stop`
/// resolves; capture rules are removed on the way out.
pub async fn run(
    channels: Channels,
    stop: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(&Running),
) -> Result<(), ChannelError> {
    let dir = &channels.credentials;
    let (audit, writer) = Audit::start(&channels.audit, Default::default())
        .map_err(|e| ChannelError::Audit(channels.audit.path.clone(), e))?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut captured = Vec::new();
    let mut listening = Vec::new();

    for ch in channels.outbound {
        let creds = |source| ChannelError::Credentials {
            channel: ch.name.clone(),
            source,
        };
        let identity = credentials::identity(dir, ch.policy.key_kind()).map_err(creds)?;
        let pins = credentials::pins(dir, &ch.peer).map_err(creds)?;
        let tls = ch
            .policy
            .client_config(&identity, pins)
            .map_err(|source| ChannelError::Tls {
                channel: ch.name.clone(),
                source,
            })?;
        let knocker = match &ch.knock {
            None => None,
            Some(path) => Some(Arc::new(knocker(path).map_err(|source| ChannelError::Knock {
                channel: ch.name.clone(),
                path: path.clone(),
                source,
            })?)),
        };
        let listen = |addr: SocketAddr, transparent: bool| {
            let bound = if transparent {
                transparent::listener(addr)
            } else {
                std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(TcpListener::from_std)
            };
            bound.map_err(|source| ChannelError::Listen {
                channel: ch.name.clone(),
                addr,
                source,
            })
        };
        let listener = match ch.entry {
            Entry::Listen(addr) => listen(addr, false)?,
            Entry::Capture(destination) => {
                let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)), true)?;
                let at = listener.local_addr().map_err(|source| ChannelError::Listen {
                    channel: ch.name.clone(),
                    addr: destination,
                    source,
                })?;
                captured.push(Captured {
                    destination,
                    listener: at,
                });
                listener
            }
        };
        if let Ok(at) = listener.local_addr() {
            listening.push((ch.name.clone(), at));
        }
        let outbound = Arc::new(outbound::Outbound {
            channel: ch,
            tls: TlsConnector::from(tls),
            knocker,
            audit: audit.clone(),
        });
        tasks.spawn(outbound.serve(listener));
    }

    let reoriginate = channels.inbound.iter().any(|ch| ch.source == Source::Client);
    for ch in channels.inbound {
        let creds = |source| ChannelError::Credentials {
            channel: ch.name.clone(),
            source,
        };
        let identity = credentials::identity(dir, ch.policy.key_kind()).map_err(creds)?;
        let mut peers = HashMap::new();
        for peer in &ch.peers {
            for pin in credentials::pins(dir, peer).map_err(creds)? {
                peers.insert(pin, peer.clone());
            }
        }
        let tls = ch
            .policy
            .server_config(&identity, peers.keys().copied().collect())
            .map_err(|source| ChannelError::Tls {
                channel: ch.name.clone(),
                source,
            })?;
        let listener = TcpListener::bind(ch.listen)
            .await
            .map_err(|source| ChannelError::Listen {
                channel: ch.name.clone(),
                addr: ch.listen,
                source,
            })?;
        listening.push((ch.name.clone(), ch.listen));
        let inbound = Arc::new(inbound::Inbound {
            channel: ch,
            tls,
            peers,
            audit: audit.clone(),
        });
        tasks.spawn(inbound.serve(listener));
    }

    let diverted = divert::install(&captured, reoriginate)?;
    let running = Running { listening };
    info!(channels = ?running.listening, "channels running");
    ready(&running);
    stop.await;
    drop(diverted);
    tasks.shutdown().await;
    audit.flush(std::time::Duration::from_secs(2));
    drop(audit);
    writer.join();
    Ok(())
}

fn knocker(path: &std::path::Path) -> Result<crate::knock::send::Knocker, Box<dyn std::error::Error + Send + Sync>> {
    let credential = crate::knock::credential::Credential::load(path)?;
    Ok(crate::knock::send::Knocker::new(credential)?)
}
