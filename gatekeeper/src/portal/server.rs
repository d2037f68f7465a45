//! The portal listener in the daemon. Per connection: read the first
//! record, ask the knock service (which owns the verifier, the replay cache
//! and the audit log) what it is worth, finish the TLS handshake either way,
//! then relay to the upstream or answer with the guidance page.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

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
    config::PortalSettings,
    events::{Diverted, Kind},
    knock::wire::NONCE_LEN,
    spec::Proto,
    state::{StateDir, StateError, write_private},
    tunnels::{TunnelError, Tunnels},
};

/// How long a client may take to send its ClientHello, and to finish the
/// handshake after it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the upstream may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Sessions served at once; further connections wait in the listen queue.
const MAX_SESSIONS: usize = 4096;

#[derive(Debug, Error)]
pub enum PortalError {
    #[error("portal: binding {addr}: {source}; is another server on that port?")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("portal: {0}")]
    Guidance(#[from] GuidanceError),
    #[error("portal certificate {cert} / key {key}: {source}")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        source: TlsError,
    },
    #[error("portal TLS configuration (is the key the certificate's?): {0}")]
    Config(TlsError),
    #[error("portal certificate: {0}")]
    State(#[from] StateError),
    #[error("portal certificate: the gateway's own: {0}")]
    Gateway(#[from] TunnelError),
    #[error(
        "portal certificate: {present} exists but {absent} does not; give both files, or neither to have them generated"
    )]
    HalfPair { present: PathBuf, absent: PathBuf },
}

/// One question to the knock service: what may this connection reach?
pub struct Ask {
    /// The TCP connection, with the knock (if any) as its payload.
    pub conn: Diverted,
    /// What the knock's nonce must be for its ClientHello; `None`: no knock.
    pub binding: Option<[u8; NONCE_LEN]>,
    pub reply: oneshot::Sender<Decision>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Authorized: relay to this `HOST:PORT`.
    Upstream(String),
    Guidance,
}

pub struct Portal {
    pub acceptor: TlsAcceptor,
    pub guidance: Guidance,
    pub ask: mpsc::Sender<Ask>,
}

impl Portal {
    /// Everything the portal needs before the gate goes up, so a bad
    /// certificate, guidance folder or busy port stops the daemon at start.
    pub async fn prepare(
        settings: &PortalSettings,
        state: &StateDir,
        ask: mpsc::Sender<Ask>,
    ) -> Result<(Portal, TcpListener), PortalError> {
        let identity = match &settings.cert_and_key {
            Some((cert, key)) => operator_identity(cert, key, state)?,
            None => Tunnels::new(state).identity()?,
        };
        let acceptor = TlsAcceptor::from(identity.server_config().map_err(PortalError::Config)?);
        let guidance = Guidance::load(settings.guidance.as_deref())?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| PortalError::Bind {
                addr: settings.listen,
                source,
            })?;
        info!(listen = %settings.listen, upstream = %settings.upstream, fingerprint = %identity.fingerprint(),
            guidance = %settings.guidance.as_deref().map_or("(built in)".into(), |d| d.display().to_string()), "portal listening");
        let portal = Portal {
            acceptor,
            guidance,
            ask,
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
            let portal = self.clone();
            tokio::spawn(async move {
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
        let opening = match timeout(HANDSHAKE_TIMEOUT, read_opening(&mut tcp)).await {
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
        let (knock, binding) = opening.knock.map_or((Vec::new(), None), |c| (c.knock, Some(c.binding)));
        let conn = Diverted {
            kind: Kind::Knock,
            ifindex: 0,
            src: peer.ip().to_canonical(),
            dst: local.ip().to_canonical(),
            sport: peer.port(),
            dport: local.port(),
            proto: Proto::Tcp.number(),
            tcp_flags: 0,
            payload: knock,
        };
        // The knock service decides while the handshake goes on: its answer
        // is needed only once the session is up, so checking the knock
        // adds no round trip to the client's wait.
        let decision = self.ask(conn, binding).await;
        let handshake = timeout(
            HANDSHAKE_TIMEOUT,
            self.acceptor.accept(Replayed::new(opening.replay, tcp)),
        );
        let tls = match handshake.await {
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
        match decision.await.unwrap_or(Decision::Guidance) {
            Decision::Guidance => {
                if let Err(e) = self.guidance.serve(tls).await {
                    debug!(%peer, error = %e, "guidance page not delivered");
                }
            }
            Decision::Upstream(upstream) => {
                if let Err(e) = relay(tls, &upstream, peer).await {
                    warn!(%peer, upstream, error = %e, "portal session to the upstream failed");
                }
            }
        }
    }

    /// Puts the question to the knock service; the answer comes on the
    /// receiver. A stopped service drops the question, and the receiver's
    /// error then means: nobody gets through.
    async fn ask(&self, conn: Diverted, binding: Option<[u8; NONCE_LEN]>) -> oneshot::Receiver<Decision> {
        let (reply, answer) = oneshot::channel();
        let _ = self.ask.send(Ask { conn, binding, reply }).await;
        answer
    }
}

/// Relays an authorized session to `upstream` until both sides end. If the
/// upstream cannot be reached (the error returned), the session is closed
/// without a word: the client sees the connection end, a stranger never gets
/// this far. How the session ends is not an error: most clients close
/// without a TLS close_notify.
async fn relay<S>(mut tls: S, upstream: &str, peer: SocketAddr) -> io::Result<()>
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
/// the state's public addresses) when neither file exists yet.
fn operator_identity(cert: &Path, key: &Path, state: &StateDir) -> Result<Identity, PortalError> {
    let tls = |source| PortalError::Tls {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    match (cert.exists(), key.exists()) {
        (true, true) => Identity::from_pem(&crate::state::read(cert)?, &crate::state::read(key)?).map_err(tls),
        (false, false) => {
            let mut names: Vec<String> = state.public_addrs()?.iter().map(ToString::to_string).collect();
            names.push("gatekeeper".into());
            let identity = Identity::generate(&names).map_err(tls)?;
            let (c, k) = identity.to_pem();
            write_private(key, k)?;
            write_private(cert, c)?;
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
