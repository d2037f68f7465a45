//! A node's side of the relay: the public HTTP port, routed by `Host` to
//! the agent that publishes that host, and the agent sessions behind it.
//!
//! An agent says hello once a second; a node that holds no session with
//! it starts a handshake, and one that has not heard from it for
//! [`ABSENT_AFTER`] forgets it, so its host gets 502 at once and its
//! requests in flight end. The node rotates each session by time, bytes
//! and messages, keeping the one before for the grace window. Requests
//! carry ids of this node's; an agent answers on this node's channel.
//!
//! - [`http`]: the visitors' side, routing each request by `Host`.

mod http;

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Semaphore, oneshot},
};
use tracing::{debug, info, warn};
use x25519_dalek::StaticSecret;

use super::{
    bus::{Heard, Publisher, listen},
    flow::{Budget, Credit, Feed, MAX_REQUESTS, Outbox},
    session::{Keys, Pending, SessionError, Sessions},
    wire::{self, Envelope, Greeting, Head, Message, Standing},
};
use crate::{
    audit::Audit,
    clock::{unix_now, unix_now_ms},
    store::{RelayRecord, Snapshot, config::RelaySettings, redis_target::RedisTarget, valid_name},
};

/// An agent not heard from for this long is taken for gone.
const ABSENT_AFTER: Duration = Duration::from_secs(3);
/// A handshake not answered within this is started again.
const HANDSHAKE_RETRY: Duration = Duration::from_secs(2);
/// A refused agent is told again at most this often.
const TELL_REFUSED_EVERY: Duration = Duration::from_secs(5);
/// How often sessions and absences are looked at.
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("binding the relay's HTTP port {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Messages dropped unread, by why.
#[derive(Debug, Default)]
struct Dropped {
    malformed: AtomicU64,
    undecryptable: AtomicU64,
    replayed: AtomicU64,
    unknown_request: AtomicU64,
    unknown_agent: AtomicU64,
}

/// What `status` shows of the relay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RelayStatus {
    pub listen: String,
    /// The agents holding a session with this node.
    pub agents: Vec<AgentStatus>,
    pub requests_in_flight: usize,
    /// Requests relayed to an agent since this node started.
    pub requests: u64,
    /// Messages dropped unread: malformed, undecryptable, replayed,
    /// unknown_request, unknown_agent.
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub name: String,
    pub host: String,
    pub session: u64,
    /// Sessions completed with this agent since this node started.
    pub handshakes: u64,
}

/// The relay on one node.
#[derive(Clone)]
pub struct RelayGateway {
    shared: Arc<Shared>,
}

struct Shared {
    node: String,
    /// The gate's pins: whose entries let a visitor in.
    pin_dir: PathBuf,
    target: RedisTarget,
    secret: StaticSecret,
    settings: RelaySettings,
    publisher: Publisher,
    budget: Budget,
    /// One per request in flight, at most [`MAX_REQUESTS`].
    slots: Arc<Semaphore>,
    audit: Audit,
    state: Mutex<State>,
    dropped: Dropped,
    requests: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Every relay record, by name.
    records: BTreeMap<String, RelayRecord>,
    /// Live relays' hosts, to their names.
    hosts: HashMap<String, String>,
    /// Enrolled clients' ids, by name.
    client_ids: HashMap<String, u32>,
    agents: HashMap<String, AgentLink>,
    exchanges: HashMap<u64, Exchange>,
    next_id: u64,
    last_session: u64,
}

struct AgentLink {
    instance: u64,
    heard: Instant,
    sessions: Option<Sessions>,
    pending: Option<(Pending, &'static str)>,
    handshakes: u64,
    /// A refused agent: when it was last told so.
    told: Option<Instant>,
}

impl AgentLink {
    fn new(instance: u64, now: Instant) -> AgentLink {
        AgentLink {
            instance,
            heard: now,
            sessions: None,
            pending: None,
            handshakes: 0,
            told: None,
        }
    }
}

/// One request on its way through an agent.
struct Exchange {
    agent: String,
    /// When the agent last sent anything about it.
    heard: Instant,
    head: Option<oneshot::Sender<Result<Head, String>>>,
    feed: Feed,
    /// What the agent lets this node send of the request body.
    credit: Credit,
}

impl Exchange {
    fn fail(mut self, why: &str) {
        if let Some(head) = self.head.take() {
            let _ = head.send(Err(why.to_string()));
        }
        self.feed.fail(why);
        self.credit.close();
    }
}

impl RelayGateway {
    /// Binds the public port; nothing is served until [`RelayGateway::serve`].
    pub async fn bind(
        settings: RelaySettings,
        pin_dir: PathBuf,
        node: &str,
        secret: StaticSecret,
        target: RedisTarget,
        audit: Audit,
    ) -> Result<(RelayGateway, TcpListener), RelayError> {
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| RelayError::Bind {
                addr: settings.listen,
                source,
            })?;
        let gateway = RelayGateway {
            shared: Arc::new(Shared {
                node: node.to_string(),
                pin_dir,
                publisher: Publisher::start(target.clone()),
                target,
                secret,
                settings,
                budget: Budget::default(),
                slots: Arc::new(Semaphore::new(MAX_REQUESTS)),
                audit,
                state: Mutex::default(),
                dropped: Dropped::default(),
                requests: AtomicU64::new(0),
            }),
        };
        Ok((gateway, listener))
    }

    /// Serves visitors on `listener` and agents through Redis, until the
    /// runtime stops.
    pub async fn serve(self, listener: TcpListener) {
        let shared = self.shared.clone();
        let patterns = wire::node_patterns(&shared.node).to_vec();
        let heard = shared.clone();
        tokio::spawn(listen(shared.target.clone(), Vec::new(), patterns, move |h| {
            heard.heard(h);
            true
        }));
        let ticking = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            loop {
                tick.tick().await;
                ticking.tick();
            }
        });
        loop {
            let (stream, visitor) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accepting a relay visitor failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let relay = self.clone();
            tokio::spawn(async move {
                let owners = relay.shared.owners_of(visitor);
                relay.visit(stream, visitor, "http", owners).await;
            });
        }
    }

    /// Whether a live relay publishes `host` (lower case).
    pub fn serves(&self, host: &str) -> bool {
        self.shared.lock().hosts.contains_key(host)
    }

    /// Serves one visitor's connection (plain from the relay's port, or
    /// TLS from the portal, which says so in `proto`) until it ends;
    /// `owners` are the clients it knocked as (see `owners_of`).
    pub async fn visit<S>(&self, io: S, visitor: SocketAddr, proto: &'static str, owners: Vec<u32>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (shared, owners): (_, Arc<[u32]>) = (self.shared.clone(), owners.into());
        let service = service_fn(move |req| {
            let (shared, owners) = (shared.clone(), owners.clone());
            async move { Ok::<_, Infallible>(shared.handle(req, visitor, proto, &owners).await) }
        });
        if let Err(e) = http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await
        {
            debug!(error = %e, %visitor, "a relay visitor's connection ended");
        }
    }

    /// Puts the relay records (and the clients they allow) in force: a
    /// relay no longer live loses its sessions and requests at once, and
    /// its agent is told at its next hello.
    pub fn set_records(&self, snapshot: &Snapshot) {
        let records = &snapshot.relays;
        let now = unix_now();
        let mut state = self.shared.lock();
        state.client_ids = snapshot.clients.iter().map(|c| (c.name.clone(), c.id)).collect();
        state.records = records.iter().map(|r| (r.name.clone(), r.clone())).collect();
        state.hosts = records
            .iter()
            .filter(|r| r.live_at(now))
            .map(|r| (r.host.clone(), r.name.clone()))
            .collect();
        let gone: Vec<String> = state
            .agents
            .keys()
            .filter(|name| !state.records.get(*name).is_some_and(|r| r.live_at(now)))
            .cloned()
            .collect();
        for name in gone {
            let why = match state.records.get(&name) {
                Some(r) if r.revoked => "revoked",
                Some(_) => "expired",
                None => "removed",
            };
            let failed = self.shared.end_requests(
                &mut state,
                |_, ex| ex.agent == name,
                &format!("the relay {name} was {why}"),
            );
            state.agents.remove(&name);
            info!(relay = %name, why, requests_failed = failed, "relay agent no longer allowed; its sessions are closed");
            self.shared.audit.event(
                "relay_closed",
                json!({"relay": name, "why": why, "requests_failed": failed}),
            );
        }
    }

    pub fn status(&self) -> RelayStatus {
        let state = self.shared.lock();
        let d = &self.shared.dropped;
        RelayStatus {
            listen: self.shared.settings.listen.to_string(),
            agents: state
                .agents
                .iter()
                .filter_map(|(name, link)| {
                    Some(AgentStatus {
                        name: name.clone(),
                        host: state.records.get(name)?.host.clone(),
                        session: link.sessions.as_ref()?.current().id,
                        handshakes: link.handshakes,
                    })
                })
                .collect(),
            requests_in_flight: state.exchanges.len(),
            requests: self.shared.requests.load(Ordering::Relaxed),
            dropped: [
                ("malformed", &d.malformed),
                ("undecryptable", &d.undecryptable),
                ("replayed", &d.replayed),
                ("unknown_request", &d.unknown_request),
                ("unknown_agent", &d.unknown_agent),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
            .collect(),
        }
    }
}

/// Sends one request's messages to its agent.
struct ToAgent {
    shared: Arc<Shared>,
    agent: String,
}

impl Outbox for ToAgent {
    fn send(&self, msg: Message) {
        self.shared.send(&self.agent, &msg);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, agent: &str, msg: &Message) {
        self.send_locked(&mut self.lock(), agent, msg);
    }

    /// Seals `msg` under the agent's current session and publishes it;
    /// dropped if there is none (the request fails on its own).
    fn send_locked(&self, state: &mut State, agent: &str, msg: &Message) {
        if let Some(sessions) = state.agents.get_mut(agent).and_then(|l| l.sessions.as_mut())
            && let Some(out) = wire::seal(&self.node, sessions, msg)
        {
            self.publisher.publish(wire::down_channel(agent), out);
        }
    }

    /// Ends the requests in flight that `which` picks, telling their
    /// agents (which stop working on them, if they still hear); returns
    /// how many.
    fn end_requests(&self, state: &mut State, which: impl Fn(u64, &Exchange) -> bool, why: &str) -> usize {
        let ids: Vec<u64> = state
            .exchanges
            .iter()
            .filter(|(id, ex)| which(**id, ex))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(ex) = state.exchanges.remove(id) {
                let agent = ex.agent.clone();
                ex.fail(why);
                let reason = why.to_string();
                self.send_locked(state, &agent, &Message::Reset { id: *id, reason });
            }
        }
        ids.len()
    }

    fn heard(&self, heard: Heard) {
        match heard {
            Heard::Subscribed => {
                let failed = self.end_requests(
                    &mut self.lock(),
                    |_, _| true,
                    "the relay lost its channels for a moment",
                );
                if failed > 0 {
                    warn!(
                        requests_failed = failed,
                        "subscribed to the relay's channels again; requests in flight failed"
                    );
                }
            }
            Heard::Lost(why) => warn!(error = %why, "the relay's channels were lost; subscribing again"),
            Heard::Message { channel, payload } => {
                let Some((agent, hello)) = wire::agent_of(&channel, &self.node) else {
                    return;
                };
                if !valid_name(agent) {
                    self.dropped.malformed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if hello {
                    self.hello(agent, &payload);
                } else {
                    self.answer(agent, &payload);
                }
            }
        }
    }

    fn hello(&self, agent: &str, payload: &[u8]) {
        let Ok(instance) = wire::parse_hello(payload) else {
            self.dropped.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut state = self.lock();
        let state = &mut *state;
        let Some(record) = state.records.get(agent).cloned() else {
            self.dropped.unknown_agent.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let now = Instant::now();
        if !record.live_at(unix_now()) {
            // Kept without a session, only to pace the telling.
            let link = state
                .agents
                .entry(agent.to_string())
                .or_insert_with(|| AgentLink::new(instance, now));
            link.heard = now;
            if link.told.is_none_or(|t| now >= t + TELL_REFUSED_EVERY) {
                link.told = Some(now);
                let standing = if record.revoked {
                    Standing::Revoked
                } else {
                    Standing::Expired
                };
                self.greet(state, &record, standing);
                info!(
                    relay = agent,
                    standing = standing.name(),
                    "a refused relay agent said hello; told it"
                );
                self.audit
                    .event("relay_refused", json!({"relay": agent, "standing": standing.name()}));
            }
            return;
        }
        let link = state
            .agents
            .entry(agent.to_string())
            .or_insert_with(|| AgentLink::new(instance, now));
        let restarted = link.instance != instance;
        link.heard = now;
        if restarted {
            link.instance = instance;
            link.sessions = None;
            link.pending = None;
        }
        let idle = link.sessions.is_none() && link.pending.is_none();
        if restarted {
            let failed = self.end_requests(state, |_, ex| ex.agent == agent, "the agent restarted");
            info!(relay = agent, requests_failed = failed, "the relay agent restarted");
        }
        if idle {
            self.start_handshake(state, &record, if restarted { "agent_restarted" } else { "new" });
        }
    }

    /// Sends a first handshake message carrying `standing`; returns the
    /// handshake waiting for the agent's reply.
    fn greet(&self, state: &mut State, record: &RelayRecord, standing: Standing) -> Option<Pending> {
        let peer = record.public().ok()?;
        let id = (state.last_session + 1).max(unix_now_ms());
        state.last_session = id;
        let keys = Keys {
            own: self.secret.clone(),
            peer,
        };
        let greeting = Greeting {
            unix_ms: unix_now_ms(),
            standing,
        };
        let (pending, first) = keys.initiate(id, &greeting.encode()).ok()?;
        self.publisher.publish(
            wire::down_channel(&record.name),
            wire::handshake(&self.node, id, &first),
        );
        Some(pending)
    }

    fn start_handshake(&self, state: &mut State, record: &RelayRecord, reason: &'static str) {
        let pending = self.greet(state, record, Standing::Serving);
        if let Some(link) = state.agents.get_mut(&record.name) {
            link.pending = pending.map(|p| (p, reason));
        }
    }

    /// An envelope on this node's channel from `agent`.
    fn answer(&self, agent: &str, payload: &[u8]) {
        let envelope = match wire::parse_envelope(payload) {
            Ok(e) if envelope_node(&e) == self.node => e,
            _ => {
                self.dropped.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let mut state = self.lock();
        let state = &mut *state;
        let Some(link) = state.agents.get_mut(agent) else {
            self.dropped.unknown_agent.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match envelope {
            Envelope::Handshake { id, noise, .. } => {
                let Some((pending, reason)) = link.pending.take_if(|(p, _)| p.id == id) else {
                    self.dropped.replayed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                match pending.finish(noise) {
                    Ok(session) => {
                        match &mut link.sessions {
                            Some(s) => s.rotate(session, self.settings.grace),
                            None => link.sessions = Some(Sessions::new(session)),
                        }
                        link.handshakes += 1;
                        info!(relay = agent, session = id, reason, "relay session established");
                        self.audit.event(
                            "relay_session",
                            json!({"relay": agent, "node": self.node, "session": id, "reason": reason}),
                        );
                    }
                    Err(_) => {
                        self.dropped.undecryptable.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Envelope::Sealed { sealed, .. } => {
                let Some(sessions) = link.sessions.as_mut() else {
                    self.dropped.unknown_request.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let plain = match sessions.open(sealed) {
                    Ok(p) => p,
                    Err(SessionError::Replayed) => {
                        self.dropped.replayed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(_) => {
                        self.dropped.undecryptable.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                match Message::decode(plain) {
                    Ok(msg) => self.dispatch(state, agent, msg),
                    Err(_) => {
                        self.dropped.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// A message from `agent` about one of this node's requests.
    fn dispatch(&self, state: &mut State, agent: &str, msg: Message) {
        let id = msg.id();
        let Some(ex) = state.exchanges.get_mut(&id).filter(|ex| ex.agent == agent) else {
            self.dropped.unknown_request.fetch_add(1, Ordering::Relaxed);
            return;
        };
        ex.heard = Instant::now();
        let broken = match msg {
            Message::Response { head, .. } => {
                if let Some(tx) = ex.head.take() {
                    let _ = tx.send(Ok(head));
                }
                Ok(())
            }
            Message::Data { offset, bytes, .. } => ex.feed.data(offset, bytes),
            Message::End { length, .. } => ex.feed.end(length),
            Message::Credit { bytes, .. } => {
                ex.credit.grant(bytes);
                Ok(())
            }
            Message::Reset { reason, .. } => {
                if let Some(ex) = state.exchanges.remove(&id) {
                    ex.fail(&reason);
                }
                Ok(())
            }
            Message::Request { .. } => {
                self.dropped.malformed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        };
        if let Err(e) = broken {
            self.end_requests(state, |other, _| other == id, &e.to_string());
        }
    }

    /// Forgets agents gone silent, ends responses that stopped moving,
    /// retries unanswered handshakes, rotates sessions that are due
    /// (checked at every tick: a limit of messages or bytes is passed by
    /// at most a tick's worth).
    fn tick(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        let state = &mut *state;
        let silent: Vec<String> = state
            .agents
            .iter()
            .filter(|(_, l)| now.duration_since(l.heard) > ABSENT_AFTER)
            .map(|(name, _)| name.clone())
            .collect();
        for name in silent {
            let failed = self.end_requests(state, |_, ex| ex.agent == name, "the agent stopped answering");
            state.agents.remove(&name);
            info!(relay = %name, requests_failed = failed, "relay agent silent; its session is dropped");
        }
        // A response that stopped moving (a message lost without the
        // channel being lost) ends, as a proxy's read timeout ends it.
        let s = &self.settings;
        self.end_requests(
            state,
            |_, ex| ex.head.is_none() && now.duration_since(ex.heard) > s.response_timeout,
            "the response stopped moving",
        );
        let mut due = Vec::new();
        for (name, link) in &mut state.agents {
            if link
                .pending
                .as_ref()
                .is_some_and(|(p, _)| now.duration_since(p.started) > HANDSHAKE_RETRY)
            {
                let (_, reason) = link.pending.take().unzip();
                due.push((name.clone(), reason.unwrap_or("retry")));
                continue;
            }
            let Some(current) = link.sessions.as_ref().map(Sessions::current) else {
                continue;
            };
            if link.pending.is_some() {
                continue;
            }
            let reason = if now.duration_since(current.created) >= s.rotate_after {
                "time"
            } else if current.bytes >= s.rotate_bytes {
                "bytes"
            } else if current.messages >= s.rotate_messages {
                "messages"
            } else {
                continue;
            };
            due.push((name.clone(), reason));
        }
        for (name, reason) in due {
            if let Some(record) = state.records.get(&name).cloned() {
                self.start_handshake(state, &record, reason);
            }
        }
    }
}

fn envelope_node<'a>(e: &Envelope<'a>) -> &'a str {
    match e {
        Envelope::Handshake { node, .. } | Envelope::Sealed { node, .. } => node,
    }
}
