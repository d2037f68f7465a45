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
    path::{Path, PathBuf},
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
use tunnel::tls::{Identity, TlsError};

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
    private_file,
    relay::gateway::RelayGateway,
    store::config::PortalSettings,
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
    #[error("portal certificate {cert} / key {key}")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: TlsError,
    },
    #[error("portal TLS configuration (is the key the certificate's?)")]
    Config(#[source] TlsError),
    #[error("portal certificate {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "portal certificate: {present} exists but {absent} does not; give both files, or neither to have them generated"
    )]
    HalfPair { present: PathBuf, absent: PathBuf },
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
    /// certificate, guidance folder or busy port stops the daemon at start.
    /// `gateway` is the gateway's own identity, the default certificate;
    /// one generated for the operator's paths names `public_addrs`.
    pub async fn prepare(
        settings: &PortalSettings,
        gateway: Identity,
        public_addrs: &[IpAddr],
        ask: mpsc::Sender<Ask>,
        audit: Audit,
        relay: Option<RelayGateway>,
    ) -> Result<(Portal, TcpListener), PortalError> {
        let identity = match &settings.cert_and_key {
            Some((cert, key)) => operator_identity(cert, key, public_addrs)?,
            None => gateway,
        };
        let acceptor = TlsAcceptor::from(identity.server_config().map_err(PortalError::Config)?);
        let guidance = Guidance::load(settings.guidance.as_deref(), &settings.downloads)?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| PortalError::Bind {
                addr: settings.listen,
                source,
            })?;
        info!(listen = %settings.listen, upstream = %settings.upstream, fingerprint = %identity.fingerprint(),
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
                if let Err(e) = self.guidance.serve(tls).await {
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

/// The operator's certificate and key; both are generated (self-signed for
/// the gateway's public addresses) when neither file exists yet.
fn operator_identity(cert: &Path, key: &Path, public_addrs: &[IpAddr]) -> Result<Identity, PortalError> {
    let tls = |source| PortalError::Tls {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| PortalError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    match (cert.exists(), key.exists()) {
        (true, true) => Identity::from_pem(&read(cert)?, &read(key)?).map_err(tls),
        (false, false) => {
            let mut names: Vec<String> = public_addrs.iter().map(ToString::to_string).collect();
            names.push("gatekeeper".into());
            let identity = Identity::generate(&names).map_err(tls)?;
            let (c, k) = identity.to_pem();
            let write = |path: &Path, text: &str| {
                private_file::write(path, text).map_err(|source| PortalError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            };
            write(key, k)?;
            write(cert, c)?;
            info!(cert = %cert.display(), key = %key.display(), "generated the portal certificate");
            Ok(identity)
        }
        (true, false) => Err(PortalError::HalfPair {
            present: cert.to_path_buf(),
            absent: key.to_path_buf(),
        }),
        (false, true) => Err(PortalError::HalfPair {
            present: key.to_path_buf(),
            absent: cert.to_path_buf(),
        }),
    }
}
