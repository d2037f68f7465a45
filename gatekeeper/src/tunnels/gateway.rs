//! The daemon's tunnel gateway: a TLS listener for agents (behind the gate,
//! opened by the agents' own knocks), one published port per connected
//! tunnel, heartbeats, revocation that cuts live connections, and an audit
//! line per agent session and per public connection. The daemon's store
//! watcher hands it the tunnel records ([`Gateway::set_records`]) and tells
//! it which tunnels to close ([`Gateway::close`]).
//!
//! The same listener tells enrolled devices the gateway's knock key
//! (`knock::note`): a TLS connection that asks for its ALPN name gets the
//! note and is closed.

use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;
use thiserror::Error;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};
use tunnel::{
    frame::{Farewell, Kind},
    mux::Mux,
    record::{Side, leave_tls},
    session::{Authority, SessionError, TunnelInfo, answer, hear_hello, serve_public},
    splice::Spliced,
    tls::{Identity, TlsError},
};

use crate::{
    audit::Audit,
    clock::unix_now,
    control::TunnelStatus,
    knock::note::{self, KeyNote},
    store::TunnelRecord,
};

/// How long an agent may take for its TLS handshake, and then its hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("the tunnel port {port} cannot be bound (is another server on it?)")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("the tunnel listener's TLS configuration")]
    Tls(#[from] TlsError),
}

/// A connected tunnel.
struct Live {
    /// Tells this session apart from the one that may replace it.
    session: u64,
    stop: watch::Sender<bool>,
    mux: Mux,
    since: u64,
    connections: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

pub struct Gateway {
    records: RwLock<Vec<TunnelRecord>>,
    live: Mutex<HashMap<String, Live>>,
    audit: Audit,
    heartbeat: Duration,
    sessions: AtomicU64,
    acceptor: TlsAcceptor,
    port: u16,
    /// What a device asking for the key note is told; none until the
    /// daemon has read the state.
    note: RwLock<Option<KeyNote>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here leaves a half-updated value behind on panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Authority for Gateway {
    fn authenticate(&self, token_id: &str, secret: &[u8]) -> Result<TunnelInfo, Farewell> {
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        let rec = records
            .iter()
            .find(|t| t.token_id == token_id)
            .ok_or_else(|| Farewell::Refused(format!("unknown token {token_id}")))?;
        if !rec.secret_matches(secret) {
            return Err(Farewell::Refused(format!("wrong secret for token {token_id}")));
        }
        if !rec.live_at(unix_now()) {
            return Err(Farewell::Revoked(format!("tunnel {} is revoked or expired", rec.name)));
        }
        Ok(TunnelInfo {
            name: rec.name.clone(),
            owner: rec.owner.clone(),
            public_port: rec.public_port,
        })
    }
}

impl Gateway {
    /// Binds the tunnel port with the gateway's identity, before the gate
    /// goes up, so a busy port stops the daemon at start.
    pub async fn bind(
        port: u16,
        identity: &Identity,
        heartbeat: Duration,
        audit: Audit,
    ) -> Result<(Arc<Gateway>, TcpListener), GatewayError> {
        let mut config = (*identity.server_config()?).clone();
        config.alpn_protocols = vec![note::ALPN.to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
            .await
            .map_err(|source| GatewayError::Bind { port, source })?;
        info!(port, fingerprint = %identity.fingerprint(), "tunnel gateway listening");
        let gw = Arc::new(Gateway {
            records: RwLock::new(Vec::new()),
            live: Mutex::new(HashMap::new()),
            audit,
            heartbeat,
            sessions: AtomicU64::new(0),
            acceptor,
            port,
            note: RwLock::new(None),
        });
        Ok((gw, listener))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The knock keys devices are told of, as the store has them now.
    pub fn set_note(&self, note: KeyNote) {
        *self.note.write().unwrap_or_else(|e| e.into_inner()) = Some(note);
    }

    /// Tells a device the knock keys, and closes.
    async fn tell_note(&self, mut tls: tokio_rustls::server::TlsStream<TcpStream>, device: SocketAddr) {
        let note = self.note.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(note) = note else {
            return self.refused(device, "asked for the key note before the state was read".into());
        };
        // Plain strings and a number: always serializable.
        let text = serde_json::to_vec(&note).expect("a key note serializes");
        let sent = async {
            tls.write_all(&text).await?;
            tls.shutdown().await
        };
        let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, sent).await {
            Ok(Ok(())) => "sent",
            Ok(Err(_)) | Err(_) => "failed",
        };
        self.audit.event(
            "key_note",
            json!({"device": device, "result": result, "server_public_key": note.server_public_key}),
        );
    }

    /// The records agents are checked against, as the store has them now.
    pub fn set_records(&self, records: Vec<TunnelRecord>) {
        *self.records.write().unwrap_or_else(|e| e.into_inner()) = records;
    }

    /// Ends the session of tunnel `name`, if its agent is connected, telling
    /// the agent why. Returns whether there was one.
    pub fn close(&self, name: &str, why: &str) -> bool {
        let Some(live) = lock(&self.live).remove(name) else {
            return false;
        };
        let mux = live.mux.clone();
        let farewell = Farewell::Revoked(format!("tunnel {name} is {why}"));
        // Tell the agent first, so it stops retrying; then cut everything.
        tokio::spawn(async move {
            let _ = mux.farewell(&farewell).await;
        });
        let _ = live.stop.send(true);
        self.audit.event("tunnel_closed", json!({"tunnel": name, "why": why}));
        true
    }

    /// Every tunnel with a connected agent, for `gatekeeper status` and
    /// `tunnel list`.
    pub fn status(&self) -> Vec<TunnelStatus> {
        let mut out: Vec<TunnelStatus> = lock(&self.live)
            .iter()
            .map(|(name, l)| TunnelStatus {
                name: name.clone(),
                connected: true,
                since: Some(l.since),
                connections: l.connections.load(Ordering::Relaxed),
                bytes_in: l.up.load(Ordering::Relaxed),
                bytes_out: l.down.load(Ordering::Relaxed),
                streams: l.mux.streams(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Serves agents on `listener` until the daemon stops.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((tcp, agent)) => {
                    tokio::spawn(self.clone().session(tcp, agent));
                }
                Err(e) => {
                    warn!(error = %e, "accepting an agent failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn refused(&self, agent: SocketAddr, reason: String) {
        self.audit.event(
            "agent_session",
            json!({"agent": agent, "result": "rejected", "reason": reason}),
        );
    }

    async fn session(self: Arc<Self>, tcp: TcpStream, agent: SocketAddr) {
        // Frames are flushed as they are ready; Nagle would only add delay.
        let _ = tcp.set_nodelay(true);
        let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return self.refused(agent, format!("TLS: {e}")),
            Err(_) => return self.refused(agent, "TLS handshake timed out".into()),
        };
        if tls.get_ref().1.alpn_protocol() == Some(note::ALPN) {
            return self.tell_note(tls, agent).await;
        }
        let info = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hear_hello(&mut tls, &*self)).await {
            Ok(Ok(info)) => info,
            Ok(Err(SessionError::Refused(why))) => return self.refused(agent, why.to_string()),
            Ok(Err(e)) => return self.refused(agent, e.to_string()),
            Err(_) => return self.refused(agent, "no hello in time".into()),
        };
        // A returning agent replaces its previous session and gets its port back.
        if let Some(old) = lock(&self.live).remove(&info.name) {
            let _ = old.stop.send(true);
        }
        // Bound before the agent hears it is published: a welcome always
        // means the port is open.
        let public = match bind_public(info.public_port).await {
            Ok(listener) => listener,
            Err(e) => {
                let busy = Farewell::Busy(format!("the public port {} cannot be bound: {e}", info.public_port));
                let _ = answer(&mut tls, Err(&busy)).await;
                self.audit.event(
                    "agent_session",
                    json!({"tunnel": info.name, "agent": agent, "result": "failed", "reason": busy.to_string()}),
                );
                return;
            }
        };
        if let Err(e) = answer(&mut tls, Ok(info.public_port)).await {
            return self.refused(agent, format!("welcoming the agent: {e}"));
        }
        let (rd, wr) = match leave_tls(tls.into_inner(), Side::Gateway) {
            Ok(records) => records,
            Err(e) => return self.refused(agent, e.to_string()),
        };
        let (mux, task) = Mux::opener(rd, wr);
        let (stop_tx, stop) = watch::channel(false);
        let (connections, up, down) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        lock(&self.live).insert(
            info.name.clone(),
            Live {
                session,
                stop: stop_tx,
                mux: mux.clone(),
                since: unix_now(),
                connections: connections.clone(),
                up: up.clone(),
                down: down.clone(),
            },
        );
        self.audit.event("agent_session", json!({"tunnel": info.name, "owner": info.owner, "agent": agent, "result": "connected", "public_port": info.public_port}));
        info!(tunnel = %info.name, port = info.public_port, %agent, "agent connected; publishing");

        let audit = self.audit.clone();
        let (tunnel_name, owner) = (info.name.clone(), info.owner.clone());
        let done = move |visitor: SocketAddr, r: Spliced| {
            connections.fetch_add(1, Ordering::Relaxed);
            up.fetch_add(r.up, Ordering::Relaxed);
            down.fetch_add(r.down, Ordering::Relaxed);
            let now = unix_now();
            audit.event(
                "tunnel_connection",
                json!({"tunnel": tunnel_name, "owner": owner, "visitor": visitor, "start": now.saturating_sub(r.duration.as_secs()), "end": now,
                       "duration_ms": r.duration.as_millis() as u64, "bytes_in": r.up, "bytes_out": r.down, "closed": r.why}),
            );
        };
        let serving = tokio::spawn(serve_public(mux.clone(), public, stop.clone(), done));
        let why = self.watch(&mux, task, stop).await;
        serving.abort();
        // Unless a newer session or a revocation already took the entry over.
        let mut live = lock(&self.live);
        if live.get(&info.name).is_some_and(|l| l.session == session)
            && let Some(l) = live.remove(&info.name)
        {
            let _ = l.stop.send(true);
        }
        drop(live);
        self.audit.event(
            "agent_session",
            json!({"tunnel": info.name, "agent": agent, "result": "disconnected", "reason": why}),
        );
        info!(tunnel = %info.name, reason = why, "agent session ended");
    }

    /// Waits until the session ends: the agent left, went silent, or was
    /// stopped (revoked or replaced). Sends heartbeats meanwhile.
    async fn watch(&self, mux: &Mux, task: tunnel::mux::SessionTask, mut stop: watch::Receiver<bool>) -> String {
        let mut beat = tokio::time::interval((self.heartbeat / 3).max(Duration::from_millis(100)));
        tokio::pin!(task);
        loop {
            tokio::select! {
                ended = &mut task => {
                    return match ended {
                        Ok(Ok(())) => "agent closed the session".into(),
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => format!("session task failed: {e}"),
                    };
                }
                _ = stop.changed() => return "stopped: revoked, or replaced by a new session of its agent".into(),
                _ = beat.tick() => {
                    if mux.last_heard().elapsed() > self.heartbeat {
                        return "agent silent past the heartbeat timeout".into();
                    }
                    let _ = mux.control(Kind::Ping, bytes::Bytes::new()).await;
                }
            }
        }
    }
}

/// Binds a published port, waiting briefly for a replaced session to let go.
async fn bind_public(port: u16) -> std::io::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await {
            Ok(l) => return Ok(l),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                warn!(port, error = %e, "cannot bind the published port");
                return Err(e);
            }
        }
    }
}
