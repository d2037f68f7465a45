//! The portal listener in the daemon. Per connection: check the source's
//! limits, read the first record, ask the knock service (which owns the
//! verifier, the replay cache and the audit trail) what it is worth,
//! finish the TLS handshake either way, then relay to the upstream or
//! answer with the guidance page.
//!
//! The portal's port is the one the world may reach, so it guards its own
//! resources: each source (an IPv4 address, an IPv6 /64) may hold a few
//! sessions at once and open a few per second, and a connection has one
//! deadline for everything before its session is up. Idle connections
//! cannot hold the slots real clients need.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gatekeeper_common::{maps::KnockBucket, ratelimit};
use serde_json::json;
use thiserror::Error;
use tokio::{
    io::{AsyncWriteExt, copy_bidirectional},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
    time::timeout,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use tunnel::tls::{Fingerprint, LiveCertificate, TlsError, acme};

use super::{
    guidance::{Guidance, GuidanceError},
    stream::{Replayed, read_opening},
};
use crate::{
    audit::Audit,
    clock,
    knock::{
        Carrier,
        ask::{Ask, Verdict},
        verify::Knock,
        wire::NONCE_LEN,
    },
    relay::gateway::RelayGateway,
    store::config::{PortalCertificate, PortalSettings},
};

/// How long connecting to the upstream may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Sessions served at once; further connections wait in the listen queue.
const MAX_SESSIONS: usize = 4096;
/// Sources remembered for their limits before idle ones are forgotten.
const MAX_SOURCES: usize = 1 << 16;

#[derive(Debug, Error)]
pub enum PortalError {
    #[error("portal: binding {addr} (is another server on that port?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("portal")]
    Guidance(#[from] GuidanceError),
    #[error("portal TLS configuration")]
    Config(#[source] TlsError),
}

/// What one source holds and may still open.
struct Source {
    sessions: u32,
    bucket: KnockBucket,
}

/// Per-source limits, shared by every connection.
struct Sources {
    by_source: Mutex<HashMap<IpAddr, Source>>,
    sessions_per_source: u32,
    per_sec: u32,
}

/// Why a connection was turned away before anything else.
enum OverLimit {
    Sessions,
    Rate,
}

/// The key limits are kept under: IPv4 addresses, IPv6 /64s (one host can
/// hold a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

impl Sources {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Source>> {
        // Counters only: a panic cannot leave them inconsistent.
        self.by_source.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a session slot for `ip`, or says which limit it is over.
    fn admit(&self, ip: IpAddr) -> Result<(), OverLimit> {
        let mut map = self.map();
        if map.len() >= MAX_SOURCES {
            map.retain(|_, s| s.sessions > 0);
        }
        let s = map.entry(source_key(ip)).or_insert(Source {
            sessions: 0,
            bucket: KnockBucket::default(),
        });
        if s.sessions >= self.sessions_per_source {
            return Err(OverLimit::Sessions);
        }
        let (bucket, ok) = ratelimit::take(Some(s.bucket), clock::now_ns(), self.per_sec, self.per_sec * 2);
        s.bucket = bucket;
        if !ok {
            return Err(OverLimit::Rate);
        }
        s.sessions += 1;
        Ok(())
    }

    fn release(&self, ip: IpAddr) {
        if let Some(s) = self.map().get_mut(&source_key(ip)) {
            s.sessions = s.sessions.saturating_sub(1);
        }
    }
}

/// Gives a source's slot back however its session ends.
struct Slot<'a> {
    sources: &'a Sources,
    ip: IpAddr,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.sources.release(self.ip);
    }
}

pub struct Portal {
    acceptor: TlsAcceptor,
    guidance: Guidance,
    ask: mpsc::Sender<Ask>,
    audit: Audit,
    sources: Sources,
    handshake_timeout: Duration,
    /// Where an authorized session that asks for a relayed host (by SNI)
    /// goes instead of the upstream.
    relay: Option<RelayGateway>,
}

impl Portal {
    /// Everything the portal needs before the gate goes up, so a bad
    /// guidance folder or busy port stops the daemon at start. `served`:
    /// the certificate (the gateway's own, or the operator's), whose key
    /// has `pin`.
    pub async fn prepare(
        settings: &PortalSettings,
        served: Arc<LiveCertificate>,
        pin: Fingerprint,
        ask: mpsc::Sender<Ask>,
        audit: Audit,
        relay: Option<RelayGateway>,
    ) -> Result<(Portal, TcpListener), PortalError> {
        let mut config = served.server_config().map_err(PortalError::Config)?;
        // Browsers get the guidance page over HTTP/2 when they ask for it.
        // A client of ours offers no protocol, so its upstream sees its
        // bytes as they are. An ACME CA validating the portal asks for
        // acme-tls/1 and gets the challenge certificate, nothing more.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if matches!(settings.certificate, PortalCertificate::Acme(_)) {
            config.alpn_protocols.push(acme::ALPN.to_vec());
        }
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let guidance = Guidance::load(settings.guidance.as_deref(), &settings.downloads, settings.hsts)?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| PortalError::Bind {
                addr: settings.listen,
                source,
            })?;
        info!(listen = %settings.listen, upstream = %settings.upstream, %pin,
            guidance = %settings.guidance.as_deref().map_or("(built in)".into(), |d| d.display().to_string()),
            sessions_per_source = settings.sessions_per_source, new_sessions_per_sec = settings.new_sessions_per_sec,
            "portal listening");
        let portal = Portal {
            acceptor,
            guidance,
            ask,
            audit,
            sources: Sources {
                by_source: Mutex::new(HashMap::new()),
                sessions_per_source: settings.sessions_per_source,
                per_sec: settings.new_sessions_per_sec,
            },
            handshake_timeout: settings.handshake_timeout,
            relay,
        };
        Ok((portal, listener))
    }

    /// Serves `listener` until the daemon stops.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(MAX_SESSIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "portal accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(over) = self.sources.admit(peer.ip()) {
                let reason = match over {
                    OverLimit::Sessions => "too_many_sessions",
                    OverLimit::Rate => "too_many_new_sessions",
                };
                self.audit.refused(
                    "portal",
                    reason,
                    peer.ip().to_canonical(),
                    json!({"sport": peer.port()}),
                );
                // Dropping the socket closes it at once: no slot is held.
                continue;
            }
            let portal = self.clone();
            tokio::spawn(async move {
                let _source = Slot {
                    sources: &portal.sources,
                    ip: peer.ip(),
                };
                portal.session(tcp, peer).await;
                drop(slot);
            });
        }
    }

    async fn session(&self, mut tcp: TcpStream, peer: SocketAddr) {
        let Ok(local) = tcp.local_addr() else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        // One deadline for all that comes before the session: the
        // ClientHello, the question to the knock service, the handshake.
        let deadline = Instant::now() + self.handshake_timeout;
        let opening = match timeout(self.handshake_timeout, read_opening(&mut tcp)).await {
            Ok(Ok(opening)) => opening,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "portal connection failed before its ClientHello");
                return;
            }
            Err(_) => {
                debug!(%peer, "portal connection sent no ClientHello in time");
                return;
            }
        };
        let (payload, binding) = opening.knock.map_or((Vec::new(), None), |c| (c.knock, Some(c.binding)));
        let knock = Knock {
            src: peer.ip().to_canonical(),
            dst: local.ip().to_canonical(),
            sport: peer.port(),
            dport: local.port(),
            carrier: Carrier::ClientHello,
            payload,
            seen_ns: crate::clock::precise_ns(),
        };
        // The knock service decides while the handshake goes on: its answer
        // is needed only once the session is up, so checking the knock
        // adds no round trip to the client's wait.
        let verdict = self.ask(knock, binding).await;
        let left = deadline.saturating_duration_since(Instant::now());
        let tls = match timeout(left, self.acceptor.accept(Replayed::new(opening.replay, tcp))).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "portal TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "portal TLS handshake timed out");
                return;
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let verdict = timeout(left, verdict).await.ok().and_then(Result::ok);
        match verdict.unwrap_or(Verdict::Guidance) {
            Verdict::Guidance => {
                let served = match tls.get_ref().1.alpn_protocol() {
                    Some(b"h2") => self.guidance.serve_h2(tls).await,
                    // The CA's validation ends with the handshake.
                    Some(acme::ALPN) => return,
                    _ => self.guidance.serve(tls).await,
                };
                if let Err(e) = served {
                    debug!(%peer, error = %e, "guidance page not delivered");
                }
            }
            Verdict::Upstream { addr, client } => {
                let sni = tls.get_ref().1.server_name().map(str::to_ascii_lowercase);
                if let (Some(relay), Some(host)) = (&self.relay, sni)
                    && relay.serves(&host)
                {
                    // The knock's audit line named the upstream; this one
                    // says where the session went instead.
                    self.audit.event(
                        "portal_relayed",
                        json!({"src": peer.ip().to_canonical(), "sport": peer.port(), "host": host}),
                    );
                    relay.visit(tls, peer, "https", vec![client]).await;
                } else if let Err(e) = to_upstream(tls, &addr, peer).await {
                    warn!(%peer, upstream = addr, error = %e, "portal session to the upstream failed");
                }
            }
        }
    }

    /// Puts the question to the knock service; the answer comes on the
    /// receiver. A stopped service drops the question, and the receiver's
    /// error then means: nobody gets through.
    async fn ask(&self, knock: Knock, binding: Option<[u8; NONCE_LEN]>) -> oneshot::Receiver<Verdict> {
        let (reply, answer) = oneshot::channel();
        let _ = self.ask.send(Ask { knock, binding, reply }).await;
        answer
    }
}

/// Relays an authorized session to `upstream` until both sides end. If the
/// upstream cannot be reached (the error returned), the session is closed
/// without a word: the client sees the connection end, a stranger never gets
/// this far. How the session ends is not an error: most clients close
/// without a TLS close_notify.
async fn to_upstream<S>(mut tls: S, upstream: &str, peer: SocketAddr) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut up = match timeout(UPSTREAM_TIMEOUT, TcpStream::connect(upstream)).await {
        Ok(connected) => connected?,
        Err(_) => {
            let _ = tls.shutdown().await;
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connecting timed out"));
        }
    };
    let _ = up.set_nodelay(true);
    let secs = || started.elapsed().as_secs_f64();
    match copy_bidirectional(&mut tls, &mut up).await {
        Ok((from_client, to_client)) => {
            debug!(%peer, upstream, from_client, to_client, secs = secs(), "portal session ended")
        }
        Err(e) => debug!(%peer, upstream, error = %e, secs = secs(), "portal session ended abruptly"),
    }
    Ok(())
}
