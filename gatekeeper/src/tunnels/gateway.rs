//! The daemon's tunnel gateway: a TLS listener for agents (behind the gate,
//! opened by the agents' own knocks), one published port per connected
//! tunnel, heartbeats, revocation that cuts live connections, and an audit
//! line per agent session and per public connection. The daemon's store
//! watcher hands it the tunnel records ([`Gateway::set_records`]) and tells
//! it which tunnels to close ([`Gateway::close`]).
//!
//! A paused tunnel's public port is closed and its connections cut while
//! its agent stays connected (and is told, with a notice); a re-issued
//! token's sessions end when its overlap does; an agent's operator may
//! end its session on purpose (`agent --stop`, or SIGTERM), which is
//! audited as such.
//!
//! The same listener tells enrolled devices the gateway's knock key
//! (`knock::note`): a TLS connection that asks for its ALPN name gets the
//! note and is closed. One that asks for [`STOP_ALPN`] proves a tunnel's
//! token and ends that tunnel's session.

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
    mux::{Mux, MuxError},
    record::{KeyEpochs, Rekey, Side, leave_tls},
    session::{Authority, SessionError, TunnelInfo, answer, hear_hello, serve_public},
    splice::Spliced,
    tls::{Fingerprint, LiveCertificate, TlsError},
};

use super::STOP_ALPN;
use crate::{
    audit::Audit,
    clock::unix_now,
    control::TunnelStatus,
    knock::note::{self, KeyNote},
    store::TunnelRecord,
    tunnels::socks,
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

/// What an agent session ended by its operator is audited as.
const BY_OPERATOR: &str = "agent disconnected by its operator";

/// A connected tunnel.
struct Live {
    /// Tells this session apart from the one that may replace it.
    session: u64,
    stop: watch::Sender<bool>,
    /// Whether the tunnel is paused, as its record says.
    paused: watch::Sender<bool>,
    /// Who answers for it, as its record says, for the audit lines.
    owner: Arc<Mutex<String>>,
    /// Who ended the session from outside, and why: the audit's `result`
    /// and `reason`.
    ended: Arc<Mutex<Option<(&'static str, String)>>>,
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
    timing: SessionTiming,
    sessions: AtomicU64,
    acceptor: TlsAcceptor,
    port: u16,
    /// What a device asking for the key note is told; none until the
    /// daemon has read the state.
    note: RwLock<Option<KeyNote>>,
}

impl Live {
    /// Ends the session from outside: the port closes, connections are cut.
    fn end(&self, result: &'static str, why: String) {
        *lock(&self.ended) = Some((result, why));
        let _ = self.stop.send(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here leaves a half-updated value behind on panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Authority for Gateway {
    fn authenticate(&self, token_id: &str, secret: &[u8]) -> Result<TunnelInfo, Farewell> {
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        let now = unix_now();
        let rec = records
            .iter()
            .find(|t| t.accepts_token(token_id, now))
            .ok_or_else(|| Farewell::Refused(format!("unknown token {token_id}")))?;
        if !rec.token_matches(token_id, secret, now) {
            return Err(Farewell::Refused(format!("wrong secret for token {token_id}")));
        }
        if !rec.live_at(now) {
            return Err(Farewell::Revoked(format!("tunnel {} is revoked or expired", rec.name)));
        }
        Ok(TunnelInfo {
            name: rec.name.clone(),
            owner: rec.owner.clone(),
            public_port: rec.public_port,
            token_id: token_id.to_string(),
            socks5: false,
        })
    }
}

/// The clocks of an agent's session (`[tunnel]` in the config).
#[derive(Clone, Copy, Debug)]
pub struct SessionTiming {
    /// An agent silent this long is dropped.
    pub heartbeat: Duration,
    /// When each direction refreshes its traffic key.
    pub rekey: Rekey,
    /// A session with no public connection this long is closed; its agent
    /// reconnects as it would after any other end. None: never.
    pub idle_timeout: Option<Duration>,
}

impl Gateway {
    /// Binds the tunnel port with the gateway's certificate (whose key has
    /// `pin`), before the gate goes up, so a busy port stops the daemon at
    /// start.
    pub async fn bind(
        port: u16,
        served: Arc<LiveCertificate>,
        pin: Fingerprint,
        timing: SessionTiming,
        audit: Audit,
    ) -> Result<(Arc<Gateway>, TcpListener), GatewayError> {
        let mut config = served.server_config()?;
        config.alpn_protocols = vec![note::ALPN.to_vec(), STOP_ALPN.to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
            .await
            .map_err(|source| GatewayError::Bind { port, source })?;
        info!(port, %pin, "tunnel gateway listening");
        let gw = Arc::new(Gateway {
            records: RwLock::new(Vec::new()),
            live: Mutex::new(HashMap::new()),
            audit,
            timing,
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

    /// The records agents are checked against, as the store has them now:
    /// pauses, resumes and new owners take effect on live sessions, and
    /// every change to a tunnel is audited.
    pub fn set_records(&self, records: Vec<TunnelRecord>) {
        let old = std::mem::replace(
            &mut *self.records.write().unwrap_or_else(|e| e.into_inner()),
            records.clone(),
        );
        for rec in &records {
            if let Some(was) = old.iter().find(|o| o.name == rec.name) {
                self.audit_change(was, rec);
            }
        }
        for (name, live) in lock(&self.live).iter() {
            if let Some(rec) = records.iter().find(|r| &r.name == name) {
                live.paused
                    .send_if_modified(|p| std::mem::replace(p, rec.paused) != rec.paused);
                *lock(&live.owner) = rec.owner.clone();
            }
        }
    }

    /// Audits what an operator changed in a tunnel's record.
    fn audit_change(&self, was: &TunnelRecord, now: &TunnelRecord) {
        if was.paused != now.paused {
            let event = if now.paused { "tunnel_paused" } else { "tunnel_resumed" };
            self.audit.event(event, json!({"tunnel": now.name, "owner": now.owner}));
        }
        if was.allow != now.allow || was.owner != now.owner {
            self.audit.event(
                "tunnel_updated",
                json!({"tunnel": now.name, "owner": now.owner, "allow": now.allow, "was": {"owner": was.owner, "allow": was.allow}}),
            );
        }
        if was.token_id != now.token_id {
            self.audit.event(
                "tunnel_reissued",
                json!({"tunnel": now.name, "owner": now.owner, "previous_accepted_until": now.previous_token.as_ref().map(|p| p.until)}),
            );
        }
    }

    /// Whether the record of tunnel `name` still accepts `token_id`.
    fn token_accepted(&self, name: &str, token_id: &str) -> bool {
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        records
            .iter()
            .any(|r| r.name == name && r.accepts_token(token_id, unix_now()))
    }

    /// Ends the live session of the tunnel whose token `stopper` proves,
    /// on its agent operator's behalf (`agent --stop`).
    async fn stop_for_operator(&self, mut tls: tokio_rustls::server::TlsStream<TcpStream>, stopper: SocketAddr) {
        let info = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hear_hello(&mut tls, self)).await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => return self.refused(stopper, format!("stopping an agent: {e}")),
            Err(_) => return self.refused(stopper, "stopping an agent: no hello in time".into()),
        };
        let live = lock(&self.live).remove(&info.name);
        let said = match &live {
            Some(_) => format!("the session of tunnel {} is ended", info.name),
            None => format!("tunnel {} has no agent connected", info.name),
        };
        if let Some(live) = live {
            let _ = live.mux.farewell(&Farewell::Stopped(BY_OPERATOR.into())).await;
            live.end("stopped", format!("{BY_OPERATOR} (agent --stop from {stopper})"));
        }
        let _ = answer(&mut tls, Err(&Farewell::Stopped(said))).await;
        let _ = tls.shutdown().await;
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
        live.end("disconnected", format!("the tunnel is {why}"));
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
        match tls.get_ref().1.alpn_protocol() {
            Some(note::ALPN) => return self.tell_note(tls, agent).await,
            Some(STOP_ALPN) => return self.stop_for_operator(tls, agent).await,
            _ => {}
        }
        let info = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hear_hello(&mut tls, &*self)).await {
            Ok(Ok(info)) => info,
            Ok(Err(SessionError::Refused(why))) => return self.refused(agent, why.to_string()),
            Ok(Err(e)) => return self.refused(agent, e.to_string()),
            Err(_) => return self.refused(agent, "no hello in time".into()),
        };
        // A returning agent replaces its previous session and gets its port back.
        if let Some(old) = lock(&self.live).remove(&info.name) {
            old.end("disconnected", "replaced by a new session of its agent".into());
        }
        // Bound before the agent hears it is published: a welcome means the
        // port is open, unless the tunnel is paused, which the agent hears
        // next.
        let paused = self.is_paused(&info.name);
        let public = if paused {
            None
        } else {
            match bind_public(info.public_port).await {
                Ok(listener) => Some(listener),
                Err(e) => {
                    let busy = Farewell::Busy(format!("the public port {} cannot be bound: {e}", info.public_port));
                    let _ = answer(&mut tls, Err(&busy)).await;
                    self.audit.event(
                        "agent_session",
                        json!({"tunnel": info.name, "agent": agent, "result": "failed", "reason": busy.to_string()}),
                    );
                    return;
                }
            }
        };
        if let Err(e) = answer(&mut tls, Ok(info.public_port)).await {
            return self.refused(agent, format!("welcoming the agent: {e}"));
        }
        let (rd, mut wr) = match leave_tls(tls.into_inner(), Side::Gateway) {
            Ok(records) => records,
            Err(e) => return self.refused(agent, e.to_string()),
        };
        wr.rekey_after(self.timing.rekey);
        let epochs = Epochs {
            sent: wr.epochs(),
            received: rd.epochs(),
            audited: [0; 2],
        };
        let (mux, task) = Mux::opener(rd, wr);
        let (stop_tx, stop) = watch::channel(false);
        let ended = Arc::new(Mutex::new(None));
        let (paused_tx, paused) = watch::channel(paused);
        let owner = Arc::new(Mutex::new(info.owner.clone()));
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
                paused: paused_tx,
                owner: owner.clone(),
                ended: ended.clone(),
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
        let tunnel_name = info.name.clone();
        let finished = connections.clone();
        let done = move |visitor: SocketAddr, r: Spliced| {
            connections.fetch_add(1, Ordering::Relaxed);
            up.fetch_add(r.up, Ordering::Relaxed);
            down.fetch_add(r.down, Ordering::Relaxed);
            let now = unix_now();
            let owner = lock(&owner).clone();
            audit.event(
                "tunnel_connection",
                json!({"tunnel": tunnel_name, "owner": owner, "visitor": visitor, "start": now.saturating_sub(r.duration.as_secs()), "end": now,
                       "duration_ms": r.duration.as_millis() as u64, "bytes_in": r.up, "bytes_out": r.down, "closed": r.why}),
            );
        };
        let publishing = Publishing {
            mux: mux.clone(),
            port: info.public_port,
            paused,
            stop: stop.clone(),
            socks5: info.socks5.then(|| (info.name.clone(), self.audit.clone())),
        };
        let serving = tokio::spawn(publishing.run(public, done));
        let mut watched = Watched {
            info: &info,
            ended: &ended,
            epochs,
            connections: &finished,
        };
        let (result, why) = self.watch(&mux, task, stop, &mut watched).await;
        self.audit_key_updates(&info.name, &mut watched.epochs);
        // Unless a newer session or a revocation already took the entry over.
        let ours = {
            let mut live = lock(&self.live);
            match live.get(&info.name) {
                Some(l) if l.session == session => live.remove(&info.name),
                _ => None,
            }
        };
        if let Some(l) = ours {
            let _ = l.stop.send(true);
        }
        // The stop is sent by now, whoever sent it: the port closes and the
        // connections are cut.
        if tokio::time::timeout(Duration::from_secs(1), serving).await.is_err() {
            warn!(tunnel = %info.name, "the published port did not close in time");
        }
        self.audit.event(
            "agent_session",
            json!({"tunnel": info.name, "agent": agent, "result": result, "reason": why}),
        );
        info!(tunnel = %info.name, reason = why, "agent session ended");
    }

    /// Whether tunnel `name` is paused, as its record says.
    fn is_paused(&self, name: &str) -> bool {
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        records.iter().any(|r| r.name == name && r.paused)
    }

    /// Waits until the session ends: the agent left (on purpose or not),
    /// went silent, or was stopped (revoked, replaced, or its token
    /// re-issued and the overlap over). Sends heartbeats meanwhile.
    /// Returns the audit's `result` and `reason`.
    async fn watch(
        &self,
        mux: &Mux,
        task: tunnel::mux::SessionTask,
        mut stop: watch::Receiver<bool>,
        w: &mut Watched<'_>,
    ) -> (&'static str, String) {
        let mut beat = tokio::time::interval((self.timing.heartbeat / 3).max(Duration::from_millis(100)));
        let (info, ended) = (w.info, w.ended);
        let (mut last_used, mut finished) = (Instant::now(), w.connections.load(Ordering::Relaxed));
        tokio::pin!(task);
        loop {
            tokio::select! {
                ended = &mut task => {
                    return match ended {
                        Ok(Err(MuxError::Goodbye(Farewell::Stopped(_)))) => ("stopped", BY_OPERATOR.into()),
                        Ok(Ok(())) => ("disconnected", "agent closed the session".into()),
                        Ok(Err(e)) => ("disconnected", e.to_string()),
                        Err(e) => ("disconnected", format!("session task failed: {e}")),
                    };
                }
                _ = stop.changed() => {
                    return lock(ended).take().unwrap_or(("disconnected", "stopped".into()));
                }
                _ = beat.tick() => {
                    if mux.last_heard().elapsed() > self.timing.heartbeat {
                        return ("disconnected", "agent silent past the heartbeat timeout".into());
                    }
                    self.audit_key_updates(&info.name, &mut w.epochs);
                    let now_finished = w.connections.load(Ordering::Relaxed);
                    if mux.streams() > 0 || now_finished != finished {
                        (last_used, finished) = (Instant::now(), now_finished);
                    }
                    if let Some(idle) = self.timing.idle_timeout.filter(|idle| last_used.elapsed() >= *idle) {
                        let why = format!("idle: no public connection for {}", crate::spec::format_duration(idle));
                        let _ = mux.farewell(&Farewell::Busy(format!("{why}; reconnect"))).await;
                        return ("disconnected", why);
                    }
                    if !self.token_accepted(&info.name, &info.token_id) {
                        let why = format!("the token {} was re-issued and its overlap is over", info.token_id);
                        let _ = mux.farewell(&Farewell::Refused(format!("{why}: use the new token"))).await;
                        return ("disconnected", why);
                    }
                    let _ = mux.control(Kind::Ping, bytes::Bytes::new()).await;
                }
            }
        }
    }
}

/// What the watch over one session consults besides the session itself.
struct Watched<'a> {
    info: &'a TunnelInfo,
    /// Who ended the session from outside, and why.
    ended: &'a Mutex<Option<(&'static str, String)>>,
    epochs: Epochs,
    /// Public connections finished so far.
    connections: &'a AtomicU64,
}

/// Both directions' key updates of one session, and how many of each
/// the audit trail has heard of.
struct Epochs {
    sent: Arc<KeyEpochs>,
    received: Arc<KeyEpochs>,
    audited: [u64; 2],
}

impl Gateway {
    /// Audits the key updates made since the last look, one line per direction.
    fn audit_key_updates(&self, tunnel: &str, epochs: &mut Epochs) {
        let directions = [
            ("gateway_to_agent", &epochs.sent),
            ("agent_to_gateway", &epochs.received),
        ];
        for ((direction, e), seen) in directions.into_iter().zip(epochs.audited.iter_mut()) {
            let updates = e.updates.load(Ordering::Relaxed);
            if updates > *seen {
                self.audit.event(
                    "tunnel_key_update",
                    json!({"tunnel": tunnel, "direction": direction, "updates": updates, "new": updates - *seen, "bytes": e.bytes.load(Ordering::Relaxed)}),
                );
                *seen = updates;
            }
        }
    }
}

/// The public side of one session: the port served while the tunnel is
/// not paused. A pause closes the port and cuts its connections, a resume
/// binds it again, and the agent hears of each.
struct Publishing {
    mux: Mux,
    port: u16,
    paused: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    /// For an agent in SOCKS5 mode: the tunnel's name and the audit trail
    /// every destination is written to.
    socks5: Option<(String, Audit)>,
}

impl Publishing {
    async fn run(
        mut self,
        mut bound: Option<TcpListener>,
        done: impl Fn(SocketAddr, Spliced) + Send + Sync + Clone + 'static,
    ) {
        loop {
            if *self.paused.borrow_and_update() {
                self.notice("paused: the gateway's operator closed the public port; this session stays up")
                    .await;
                tokio::select! {
                    r = self.paused.wait_for(|p| !*p) => if r.is_err() { return },
                    _ = self.stop.wait_for(|s| *s) => return,
                }
                self.notice("resumed: the public port is open again").await;
            }
            let listener = match bound.take() {
                Some(l) => l,
                None => match bind_public(self.port).await {
                    Ok(l) => l,
                    Err(e) => {
                        self.notice(&format!("the public port {} cannot be bound again: {e}", self.port))
                            .await;
                        return;
                    }
                },
            };
            let (cut_tx, cut) = watch::channel(false);
            let mux = self.mux.clone();
            let serving: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match &self.socks5 {
                Some((tunnel, audit)) => Box::pin(socks::gateway::serve_public(
                    mux,
                    listener,
                    cut,
                    tunnel.clone(),
                    audit.clone(),
                    done.clone(),
                )),
                None => Box::pin(serve_public(mux, listener, cut, done.clone())),
            };
            // Paused, or the session is over (stopped, or its entry gone).
            let ended = tokio::select! {
                () = serving => true,
                paused = self.paused.wait_for(|p| *p) => paused.is_err(),
                _ = self.stop.wait_for(|s| *s) => true,
            };
            // Dropping the serving future closed the port; this cuts its connections.
            let _ = cut_tx.send(true);
            if ended {
                return;
            }
        }
    }

    async fn notice(&self, words: &str) {
        let _ = self
            .mux
            .control(Kind::Notice, bytes::Bytes::from(words.to_string()))
            .await;
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
