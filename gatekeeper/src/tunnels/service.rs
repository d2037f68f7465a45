//! The daemon's tunnel gateway: a TLS listener for agents (behind the gate,
//! opened by the agents' own knocks), one published port per connected
//! tunnel, heartbeats, revocation that cuts live connections, and an audit
//! line per agent session and per public connection.

use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};
use tunnel::{
    frame::Kind,
    mux::Mux,
    relay::Relayed,
    session::{Authority, TunnelInfo, serve_public, welcome},
};

use super::{TunnelError, TunnelRecord, Tunnels};
use crate::{
    audit::Audit,
    state::{StateDir, unix_now},
};

/// A connected tunnel.
struct Live {
    /// Tells this session apart from the one that may replace it.
    session: u64,
    token_id: String,
    stop: watch::Sender<bool>,
    mux: Mux,
    since: u64,
    connections: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

struct Gateway {
    state_root: PathBuf,
    records: RwLock<Vec<TunnelRecord>>,
    live: Mutex<HashMap<String, Live>>,
    audit: Mutex<Audit>,
    heartbeat: Duration,
    sessions: AtomicU64,
    /// What the status file holds now, so it is rewritten only on change.
    status: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here leaves a half-updated value behind on panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Authority for Gateway {
    fn authenticate(&self, token_id: &str, secret: &[u8]) -> Result<TunnelInfo, String> {
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        let rec = records
            .iter()
            .find(|t| t.token_id == token_id)
            .ok_or_else(|| format!("unknown token {token_id}"))?;
        if !rec.secret_matches(secret) {
            return Err(format!("wrong secret for token {token_id}"));
        }
        if !rec.live_at(unix_now()) {
            return Err(format!("revoked: tunnel {} is revoked or expired", rec.name));
        }
        Ok(TunnelInfo {
            name: rec.name.clone(),
            owner: rec.owner.clone(),
            public_port: rec.public_port,
        })
    }
}

impl Gateway {
    fn audit(&self, event: &str, fields: serde_json::Value) {
        lock(&self.audit).event(event, fields);
    }

    /// Rereads the records; ends the sessions of tunnels no longer live.
    fn follow_records(&self) {
        let state = StateDir::new(&self.state_root);
        match Tunnels::new(&state).list() {
            Ok(records) => *self.records.write().unwrap_or_else(|e| e.into_inner()) = records,
            Err(e) => warn!(error = %e, "reading tunnel records failed; keeping the previous ones"),
        }
        let now = unix_now();
        let dead: Vec<String> = {
            let records = self.records.read().unwrap_or_else(|e| e.into_inner());
            lock(&self.live)
                .iter()
                .filter(|(_, l)| !records.iter().any(|r| r.token_id == l.token_id && r.live_at(now)))
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in dead {
            if let Some(live) = lock(&self.live).remove(&name) {
                let mux = live.mux.clone();
                // Tell the agent first, so it stops retrying; then cut everything.
                tokio::spawn(async move {
                    let _ = mux.control(Kind::Goodbye, Bytes::from_static(b"revoked")).await;
                });
                let _ = live.stop.send(true);
                self.audit("tunnel_revoked", json!({"tunnel": name}));
            }
        }
        self.write_status();
    }

    /// `tunnel-status.json` in the state dir, for `gatekeeper tunnel list`.
    fn write_status(&self) {
        let status: serde_json::Map<String, serde_json::Value> = lock(&self.live)
            .iter()
            .map(|(name, l)| {
                let v = json!({
                    "connected": true,
                    "since": l.since,
                    "connections": l.connections.load(Ordering::Relaxed),
                    "bytes_in": l.up.load(Ordering::Relaxed),
                    "bytes_out": l.down.load(Ordering::Relaxed),
                    "streams": l.mux.streams(),
                });
                (name.clone(), v)
            })
            .collect();
        let text = serde_json::Value::Object(status).to_string();
        let mut written = lock(&self.status);
        if *written == text {
            return;
        }
        let path = self.state_root.join(STATUS_FILE);
        match crate::state::write_private(&path, &text) {
            Ok(()) => *written = text,
            Err(e) => warn!(error = %e, "writing the tunnel status failed"),
        }
    }

    async fn session(self: Arc<Self>, tcp: TcpStream, agent: SocketAddr, acceptor: TlsAcceptor) {
        // Frames are flushed as they are ready; Nagle would only add delay.
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return self.audit(
                    "agent_session",
                    json!({"agent": agent, "result": "rejected", "reason": format!("TLS: {e}")}),
                );
            }
            Err(_) => {
                return self.audit(
                    "agent_session",
                    json!({"agent": agent, "result": "rejected", "reason": "TLS handshake timed out"}),
                );
            }
        };
        let mut tls = tls;
        let info = match tokio::time::timeout(Duration::from_secs(10), welcome(&mut tls, &*self)).await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                return self.audit(
                    "agent_session",
                    json!({"agent": agent, "result": "rejected", "reason": e.to_string()}),
                );
            }
            Err(_) => {
                return self.audit(
                    "agent_session",
                    json!({"agent": agent, "result": "rejected", "reason": "no hello in time"}),
                );
            }
        };
        // A returning agent replaces its previous session and gets its port back.
        if let Some(old) = lock(&self.live).remove(&info.name) {
            let _ = old.stop.send(true);
        }
        let Some(public) = bind_public(info.public_port).await else {
            return self.audit("agent_session", json!({"tunnel": info.name, "agent": agent, "result": "failed", "reason": format!("port {} is in use", info.public_port)}));
        };
        let (mux, _incoming, task) = Mux::start(tls);
        let (stop_tx, stop) = watch::channel(false);
        let token_id = self
            .records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|r| r.name == info.name)
            .map(|r| r.token_id.clone())
            .unwrap_or_default();
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
                token_id,
                stop: stop_tx,
                mux: mux.clone(),
                since: unix_now(),
                connections: connections.clone(),
                up: up.clone(),
                down: down.clone(),
            },
        );
        self.audit("agent_session", json!({"tunnel": info.name, "owner": info.owner, "agent": agent, "result": "connected", "public_port": info.public_port}));
        info!(tunnel = %info.name, port = info.public_port, %agent, "agent connected; publishing");

        let gw = self.clone();
        let (tunnel_name, owner) = (info.name.clone(), info.owner.clone());
        let done = move |visitor: SocketAddr, r: Relayed| {
            connections.fetch_add(1, Ordering::Relaxed);
            up.fetch_add(r.up, Ordering::Relaxed);
            down.fetch_add(r.down, Ordering::Relaxed);
            let now = unix_now();
            gw.audit(
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
        self.audit(
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
                    let _ = mux.control(Kind::Ping, Bytes::new()).await;
                }
            }
        }
    }
}

pub const STATUS_FILE: &str = "tunnel-status.json";

/// Binds a published port, waiting briefly for a replaced session to let go.
async fn bind_public(port: u16) -> Option<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await {
            Ok(l) => return Some(l),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                warn!(port, error = %e, "cannot bind the published port");
                return None;
            }
        }
    }
}

/// Runs the tunnel gateway of `state` on `port` until the daemon stops.
pub async fn run(state_root: PathBuf, port: u16, heartbeat: Duration) -> Result<(), TunnelError> {
    let state = StateDir::new(&state_root);
    let tunnels = Tunnels::new(&state);
    let identity = tunnels.identity()?;
    let acceptor = TlsAcceptor::from(identity.server_config()?);
    let audit = Audit::open(&state.audit_path()).map_err(|source| crate::state::StateError::Io {
        path: state.audit_path(),
        source,
    })?;
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
        .await
        .map_err(|source| crate::state::StateError::Io {
            path: format!("tunnel port {port}").into(),
            source,
        })?;
    let gw = Arc::new(Gateway {
        state_root,
        records: RwLock::new(tunnels.list()?),
        live: Mutex::new(HashMap::new()),
        audit: Mutex::new(audit),
        heartbeat,
        sessions: AtomicU64::new(0),
        status: Mutex::new(String::new()),
    });
    info!(port, fingerprint = %identity.fingerprint(), "tunnel gateway listening");
    let poller = gw.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            poller.follow_records();
        }
    });
    loop {
        match listener.accept().await {
            Ok((tcp, agent)) => {
                tokio::spawn(gw.clone().session(tcp, agent, acceptor.clone()));
            }
            Err(e) => warn!(error = %e, "accepting an agent failed"),
        }
    }
}
