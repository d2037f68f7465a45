//! The private network's side of the relay: says hello once a second,
//! answers every node's handshakes, and replays the requests they send
//! on the private service, streaming each response back under credit.
//! It needs a route to Redis and to the service, nothing else.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::BodyExt;
use hyper::{
    Method, Request, Response, StatusCode, Uri,
    body::Incoming,
    header::{HeaderName, HeaderValue},
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rand_core::{OsRng, RngCore};
use thiserror::Error;
use tokio::{sync::watch, task::AbortHandle};
use tracing::{debug, info, warn};

use super::{
    RelayCredential,
    bus::{Heard, Publisher, listen},
    flow::{Budget, Credit, Feed, Inflow, Outbox, RelayBody, carry, full, pump},
    session::{Keys, Sessions},
    wire::{self, Envelope, Greeting, Head, Message, Standing},
};
use crate::{
    clock::unix_now_ms,
    store::{StoreError, redis_target::RedisTarget, valid_name},
};

/// How often the agent says hello.
const HELLO_EVERY: Duration = Duration::from_secs(1);
/// A first handshake message older (or newer) than this is refused.
const GREETING_AGE: u64 = 60_000;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Redis(#[from] StoreError),
    #[error("the credential's keys")]
    Keys(#[from] crate::knock::keys::KeyError),
    #[error(
        "the gateway refused relay agent {name:?}: it is {standing}. Ask the gateway's operator for a new credential (`gatekeeper relay issue`)"
    )]
    Refused { name: String, standing: &'static str },
}

/// The agent, shared by its tasks.
struct Agent {
    name: String,
    keys: Keys,
    publisher: Publisher,
    budget: Budget,
    client: Client<HttpConnector, RelayBody>,
    /// `HOST:PORT` of the private service.
    forward: String,
    state: Mutex<State>,
    refused: watch::Sender<Option<Standing>>,
}

#[derive(Default)]
struct State {
    nodes: HashMap<String, NodeLink>,
    /// Requests in flight, by node and the node's request id.
    exchanges: HashMap<(String, u64), Exchange>,
}

struct NodeLink {
    sessions: Sessions,
    /// The newest session id accepted: an older handshake is a replay.
    last_session: u64,
}

struct Exchange {
    /// Where the request body goes, once the service is being asked.
    feed: Option<Feed>,
    /// What the node lets this agent send of the response body.
    credit: Credit,
    task: AbortHandle,
}

impl Exchange {
    fn fail(self, why: &str) {
        if let Some(feed) = &self.feed {
            feed.fail(why);
        }
        self.credit.close();
        self.task.abort();
    }
}

/// Sends one request's messages to the node that sent it.
struct ToNode {
    agent: Arc<Agent>,
    node: String,
}

impl Outbox for ToNode {
    fn send(&self, msg: Message) {
        self.agent.send(&self.node, &msg);
    }
}

/// Connections to the private service, pooled, without Nagle's delay
/// (a small request would otherwise wait for the service's delayed ACK).
fn connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c
}

/// Runs the agent until the gateway refuses it.
pub async fn run(cred: RelayCredential, forward: String) -> Result<(), AgentError> {
    let (own, peer) = cred.keys()?;
    let target = RedisTarget::parse(&cred.redis)?;
    let (refused, mut told) = watch::channel(None);
    let agent = Arc::new(Agent {
        name: cred.name.clone(),
        keys: Keys { own, peer },
        publisher: Publisher::start(target.clone()),
        budget: Budget::default(),
        client: Client::builder(TokioExecutor::new()).build(connector()),
        forward,
        state: Mutex::default(),
        refused,
    });
    info!(relay = %agent.name, host = %cred.host, redis = target.location(), forward = %agent.forward, "relay agent starting");
    let instance = OsRng.next_u64();
    let hello = wire::hello(instance);
    let heard = agent.clone();
    let hello_again = hello.clone();
    tokio::spawn(listen(
        target,
        vec![wire::down_channel(&agent.name)],
        Vec::new(),
        move |h| {
            heard.heard(h, &hello_again);
            true
        },
    ));
    let mut every = tokio::time::interval(HELLO_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => agent.publisher.publish(wire::hello_channel(&agent.name), hello.clone()),
            changed = told.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                if let Some(standing) = *told.borrow() {
                    return Err(AgentError::Refused {
                        name: agent.name.clone(),
                        standing: standing.name(),
                    });
                }
            }
        }
    }
}

impl Agent {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, node: &str, msg: &Message) {
        self.send_locked(&mut self.lock(), node, msg);
    }

    /// Seals `msg` under the node's current session and publishes it.
    fn send_locked(&self, state: &mut State, node: &str, msg: &Message) {
        if let Some(link) = state.nodes.get_mut(node)
            && let Some(out) = wire::seal(node, &mut link.sessions, msg)
        {
            self.publisher.publish(wire::up_channel(&self.name, node), out);
        }
    }

    /// Ends a request whose body broke on the way, and tells its node.
    fn break_off(&self, state: &mut State, key: (String, u64), why: &str) {
        if let Some(ex) = state.exchanges.remove(&key) {
            ex.fail(why);
        }
        let (node, id) = key;
        self.send_locked(
            state,
            &node,
            &Message::Reset {
                id,
                reason: why.to_string(),
            },
        );
    }

    fn heard(self: &Arc<Self>, heard: Heard, hello: &[u8]) {
        match heard {
            Heard::Subscribed => {
                let failed: Vec<((String, u64), Exchange)> = self.lock().exchanges.drain().collect();
                if !failed.is_empty() {
                    warn!(
                        requests_failed = failed.len(),
                        "subscribed to the relay's channel again; requests in flight failed"
                    );
                }
                for ((node, id), ex) in failed {
                    debug!(node, id, "failing a request in flight");
                    ex.fail("the agent lost its channel");
                    self.send(
                        &node,
                        &Message::Reset {
                            id,
                            reason: "the agent lost its channel for a moment".into(),
                        },
                    );
                }
                // Say hello at once: a node may have forgotten this agent.
                self.publisher.publish(wire::hello_channel(&self.name), hello.to_vec());
            }
            Heard::Lost(why) => warn!(error = %why, "the relay's channel was lost; subscribing again"),
            Heard::Message { payload, .. } => match wire::parse_envelope(&payload) {
                Ok(Envelope::Handshake { node, id, noise }) if valid_name(node) => self.handshake(node, id, noise),
                Ok(Envelope::Sealed { node, sealed }) => self.sealed(node, sealed),
                _ => debug!("dropped a malformed message"),
            },
        }
    }

    fn handshake(&self, node: &str, id: u64, noise: &[u8]) {
        if self.lock().nodes.get(node).is_some_and(|l| id <= l.last_session) {
            debug!(node, session = id, "dropped a replayed handshake");
            return;
        }
        let Ok((payload, reply, session)) = self.keys.respond(id, noise) else {
            debug!(node, "dropped a handshake that does not verify");
            return;
        };
        let Ok(greeting) = Greeting::decode(&payload) else {
            return;
        };
        if greeting.unix_ms.abs_diff(unix_now_ms()) > GREETING_AGE {
            debug!(node, session = id, "dropped a stale handshake");
            return;
        }
        if greeting.standing != Standing::Serving {
            self.refused.send_replace(Some(greeting.standing));
            return;
        }
        {
            let mut state = self.lock();
            match state.nodes.get_mut(node) {
                Some(link) => {
                    // The node decides how long the old session lasts; the
                    // agent keeps it as long as a node may.
                    link.sessions.rotate(session, Duration::from_secs(300));
                    link.last_session = id;
                }
                None => {
                    state.nodes.insert(
                        node.to_string(),
                        NodeLink {
                            sessions: Sessions::new(session),
                            last_session: id,
                        },
                    );
                }
            }
        }
        self.publisher
            .publish(wire::up_channel(&self.name, node), wire::handshake(node, id, &reply));
        info!(node, session = id, "relay session established");
    }

    fn sealed(self: &Arc<Self>, node: &str, sealed: &[u8]) {
        let msg = {
            let mut state = self.lock();
            let Some(link) = state.nodes.get_mut(node) else {
                debug!(node, "dropped a message from a node without a session");
                return;
            };
            match link.sessions.open(sealed).map(Message::decode) {
                Ok(Ok(msg)) => msg,
                Ok(Err(e)) => {
                    debug!(node, error = %e, "dropped a message");
                    return;
                }
                Err(e) => {
                    debug!(node, error = %e, "dropped a message");
                    return;
                }
            }
        };
        let key = (node.to_string(), msg.id());
        let mut state = self.lock();
        match msg {
            Message::Request { id, head, body, window } => {
                debug!(node, id, target = %head.target, "a request");
                if state.exchanges.contains_key(&key) {
                    return;
                }
                let credit = Credit::new(window);
                let task = tokio::spawn(self.clone().serve(node.to_string(), id, head, body, credit.clone()));
                state.exchanges.insert(
                    key,
                    Exchange {
                        feed: None,
                        credit,
                        task: task.abort_handle(),
                    },
                );
            }
            Message::Data { offset, bytes, .. } => {
                let fed = state.exchanges.get_mut(&key).and_then(|ex| ex.feed.as_mut());
                if let Some(Err(e)) = fed.map(|feed| feed.data(offset, bytes)) {
                    self.break_off(&mut state, key, &e.to_string());
                }
            }
            Message::End { length, .. } => {
                let fed = state.exchanges.get_mut(&key).and_then(|ex| ex.feed.as_mut());
                if let Some(Err(e)) = fed.map(|feed| feed.end(length)) {
                    self.break_off(&mut state, key, &e.to_string());
                }
            }
            Message::Credit { bytes, .. } => {
                if let Some(ex) = state.exchanges.get(&key) {
                    ex.credit.grant(bytes);
                }
            }
            Message::Reset { reason, .. } => {
                if let Some(ex) = state.exchanges.remove(&key) {
                    ex.fail(&reason);
                }
            }
            Message::Response { .. } => debug!(node, "dropped a response sent to the agent"),
        }
    }

    /// Asks the private service, and streams its answer to `node`.
    async fn serve(self: Arc<Self>, node: String, id: u64, head: Head, has_body: bool, credit: Credit) {
        let out: Arc<dyn Outbox> = Arc::new(ToNode {
            agent: self.clone(),
            node: node.clone(),
        });
        let key = (node.clone(), id);
        let body = if has_body {
            match self.receive(&key, &out) {
                Some(body) => body.boxed(),
                None => return,
            }
        } else {
            full("")
        };
        let answer = match self.request(&head, body) {
            Ok(req) => self.client.request(req).await.map_err(|e| {
                let cause = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                format!("the agent could not reach its service at {}: {e}{cause}", self.forward)
            }),
            Err(why) => Err(why),
        };
        match answer {
            Ok(mut resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let upgrading = hyper::upgrade::on(&mut resp);
                out.send(Message::Response {
                    id,
                    head: response_head(&resp),
                });
                // After the switch, what the node sends is a body of its own.
                if let Some(from_node) = self.receive(&key, &out) {
                    carry(upgrading, id, credit, out, from_node).await;
                }
            }
            Ok(resp) => {
                out.send(Message::Response {
                    id,
                    head: response_head(&resp),
                });
                pump(resp.into_body().into_data_stream(), id, credit, out).await;
            }
            Err(reason) => {
                warn!(node, id, error = %reason, "a relayed request failed");
                out.send(Message::Reset { id, reason });
            }
        }
        self.lock().exchanges.remove(&key);
    }

    /// A body the node is about to send for request `key`, its first
    /// window granted to the node. `None` if the request ended meanwhile.
    fn receive(&self, key: &(String, u64), out: &Arc<dyn Outbox>) -> Option<Inflow> {
        let id = key.1;
        let (feed, body, window) = Inflow::new(id, out.clone(), &self.budget, |_| {});
        self.lock().exchanges.get_mut(key)?.feed = Some(feed);
        out.send(Message::Credit { id, bytes: window });
        Some(body)
    }

    /// The request for the private service.
    fn request(&self, head: &Head, body: RelayBody) -> Result<Request<RelayBody>, String> {
        let method = Method::from_bytes(head.method.as_bytes()).map_err(|_| "a bad method".to_string())?;
        let uri: Uri = format!("http://{}{}", self.forward, head.target)
            .parse()
            .map_err(|_| "a bad target".to_string())?;
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        for (name, value) in &head.headers {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
                headers.append(name, value);
            }
        }
        Ok(req)
    }
}

/// The service's response head, for the node.
fn response_head(resp: &Response<Incoming>) -> Head {
    Head {
        status: resp.status().as_u16(),
        headers: resp
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        ..Head::default()
    }
}
