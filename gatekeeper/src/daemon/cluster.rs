//! What a cluster node shares with the others at once, through Redis:
//! the replay cache and the grants.
//!
//! A knock this node accepted is claimed before it opens anything: one
//! script, one round trip, sets its nonce if absent (with the knock's
//! window as expiry), and only then stores the grant with its remaining
//! time and publishes it. A nonce another node claimed first is a replay.
//! Claims that queue up while one is on its way go together in the next
//! script call (up to [`MAX_BATCH`]), their fresh grants in one message:
//! one knock at a time costs one round trip, and a flood of them costs
//! Redis one call per batch instead of one per knock.
//! Every node subscribes to the grants and writes each into its own map,
//! so the connection that follows a knock may land on any node. Pub/sub
//! keeps nothing for a subscriber that was away, so after every
//! (re)subscription the node reads every live grant anew.
//!
//! ```text
//! gatekeeper:nonce:HEX              the node that claimed a knock's nonce, until its window ends
//! gatekeeper:grant:NODE:MS:SEQ      the grants of one claim batch (JSON array), until the last runs out
//! gatekeeper:grants                 the channel grants are published on: NODE, newline, JSON array
//! ```

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use gatekeeper_common::maps::WhitelistKey;
use redis::{FromRedisValue, RedisError, RedisResult, Script, aio::MultiplexedConnection};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    knock::wire::NONCE_LEN,
    spec::{PortRange, map_addr, unmap_addr},
    store::{
        cluster::{ANSWER_PREFIX, Answer, QUESTIONS, Question},
        redis_target::RedisTarget,
    },
};

const CHANNEL: &str = "gatekeeper:grants";
const GRANT_PREFIX: &str = "gatekeeper:grant:";
/// How long one claim may take before the knock is handled as with Redis away.
const CLAIM_TIMEOUT: Duration = Duration::from_millis(500);
/// How long to wait before subscribing again after losing the channel.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);

/// Claims nonces; stores the grants whose nonce was free under one key,
/// and publishes them as one message: the node's name, a newline, and the
/// grants as a JSON array (so a node skips its own messages unparsed).
/// KEYS: each claim's nonce key, then the batch's grant key. ARGV: node,
/// then for each claim: nonce expiry (unix s), its grants' JSON objects
/// (comma-separated), their longest lifetime (ms). Returns 1 (fresh) or 0 (taken) per claim.
const CLAIM: &str = r"
local fresh, out, longest = {}, {}, 0
for c = 1, #KEYS - 1 do
  local a = c * 3 - 1
  if redis.call('SET', KEYS[c], ARGV[1], 'NX', 'EXAT', ARGV[a]) then
    fresh[#fresh + 1] = ARGV[a + 1]
    longest = math.max(longest, tonumber(ARGV[a + 2]))
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if #fresh > 0 then
  local grants = '[' .. table.concat(fresh, ',') .. ']'
  redis.call('SET', KEYS[#KEYS], grants, 'PX', longest)
  redis.call('PUBLISH', 'gatekeeper:grants', ARGV[1] .. '\n' .. grants)
end
return out
";
/// The most claims one script call carries.
const MAX_BATCH: usize = 256;
/// Batches on their way at once; more claims wait in the queue.
const BATCHES_IN_FLIGHT: usize = 4;
/// Claims waiting beyond this are answered `Unreachable` at once.
const QUEUE: usize = 65_536;

/// A grant as the nodes pass it around.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedGrant {
    /// The node that accepted the knock.
    pub node: String,
    pub addr: IpAddr,
    /// 0: any source port.
    pub src_port: u16,
    pub proto: u8,
    pub lo: u16,
    pub hi: u16,
    /// Unix milliseconds when it stops letting new flows in.
    pub expires_ms: u64,
    /// The client's id (the whitelist owner).
    pub owner: u32,
}

impl SharedGrant {
    pub fn key(&self) -> WhitelistKey {
        WhitelistKey::new(map_addr(self.addr), self.src_port, self.proto)
    }

    pub fn ports(&self) -> PortRange {
        PortRange {
            lo: self.lo,
            hi: self.hi,
        }
    }

    pub fn new(node: &str, key: &WhitelistKey, ports: PortRange, expires_ms: u64, owner: u32) -> SharedGrant {
        SharedGrant {
            node: node.to_string(),
            addr: unmap_addr(key.addr),
            src_port: key.src_port,
            proto: key.proto,
            lo: ports.lo,
            hi: ports.hi,
            expires_ms,
            owner,
        }
    }
}

/// What came of claiming a knock's nonce.
#[derive(Debug)]
pub enum Claimed {
    /// Ours: the grant is stored and published.
    Fresh,
    /// Another node (or this one, before a restart) had it: a replay.
    Taken,
    /// Redis did not answer in time, or at all.
    Unreachable(String),
}

/// What the link hands the daemon's loop.
#[derive(Debug)]
pub enum Event {
    /// The answer to claim `id`.
    Claimed { id: u64, claimed: Claimed },
    /// A grant another node published.
    Grant(SharedGrant),
    /// Every live grant, read after (re)subscribing.
    Resync(Vec<SharedGrant>),
    /// The subscription was lost; retrying.
    Lost(String),
    /// A question for every node (`whitelist list --all-nodes`).
    Asked(Question),
}

/// The daemon's handle on the link.
pub struct Link {
    node: String,
    primary: Primary,
    claims: mpsc::Sender<Claim>,
    events: mpsc::Sender<Event>,
}

/// One claim waiting for its batch.
struct Claim {
    id: u64,
    nonce_key: String,
    until: u64,
    json: String,
    lifetime_ms: u64,
}

/// One multiplexed connection to the primary, shared by every claim;
/// made on first use and again after any failure, asking Sentinel anew
/// (if used), so a failover or a restarted Redis is followed at once.
#[derive(Clone)]
struct Primary {
    target: RedisTarget,
    kept: Arc<Mutex<Option<MultiplexedConnection>>>,
}

impl Primary {
    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(con) = self.kept.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(con);
        }
        let con = connect(&self.target).await?;
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(con.clone());
        Ok(con)
    }

    fn forget(&self) {
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Runs `invocation`, once more on a fresh connection if it fails:
    /// the kept one may be to a Redis that closed, restarted, or was made
    /// a replica (which refuses writes).
    async fn invoke<T: FromRedisValue>(&self, invocation: &redis::ScriptInvocation<'_>) -> RedisResult<T> {
        let first = match self.connection().await {
            Ok(mut con) => invocation.invoke_async::<T>(&mut con).await,
            Err(e) => Err(e),
        };
        match first {
            Ok(answer) => Ok(answer),
            Err(_) => {
                self.forget();
                let mut con = self.connection().await?;
                invocation
                    .invoke_async::<T>(&mut con)
                    .await
                    .inspect_err(|_| self.forget())
            }
        }
    }
}

/// A new connection to the primary as of now.
async fn connect(target: &RedisTarget) -> RedisResult<MultiplexedConnection> {
    target.connect(CLAIM_TIMEOUT).await
}

impl Link {
    /// Connects and starts following the grants; events arrive on the
    /// returned receiver.
    pub async fn start(target: RedisTarget, node: &str) -> Result<(Link, mpsc::Receiver<Event>), RedisError> {
        let primary = Primary {
            target: target.clone(),
            kept: Arc::default(),
        };
        primary.connection().await?;
        let (events, rx) = mpsc::channel(4096);
        let (claims, queue) = mpsc::channel(QUEUE);
        tokio::spawn(follow(target, node.to_string(), events.clone()));
        tokio::spawn(claim_batches(primary.clone(), node.to_string(), queue, events.clone()));
        Ok((
            Link {
                node: node.to_string(),
                primary,
                claims,
                events,
            },
            rx,
        ))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Every live grant, now: what a node starting reads before it gates.
    pub async fn live_grants(&self) -> Result<Vec<SharedGrant>, RedisError> {
        let mut con = self.primary.connection().await?;
        live_grants(&mut con).await.inspect_err(|_| self.primary.forget())
    }

    /// Claims `nonce` (until `until`, unix seconds) for the knock that
    /// grants `grants` (one, or an fwknop packet's one per port); the
    /// answer comes back as [`Event::Claimed`] with `id`.
    pub fn claim(&self, id: u64, nonce: &[u8; NONCE_LEN], until: u64, grants: &[SharedGrant]) {
        let now_ms = crate::clock::unix_now_ms();
        let claim = Claim {
            id,
            nonce_key: format!("gatekeeper:nonce:{}", crate::hex::encode(nonce)),
            until,
            // The script joins the fresh claims' texts into one array.
            json: grants
                .iter()
                .filter_map(|g| serde_json::to_string(g).ok())
                .collect::<Vec<_>>()
                .join(","),
            lifetime_ms: grants
                .iter()
                .map(|g| g.expires_ms.saturating_sub(now_ms))
                .max()
                .unwrap_or(0)
                .max(1),
        };
        if let Err(e) = self.claims.try_send(claim) {
            let claim = match e {
                mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
            };
            let unanswered = Event::Claimed {
                id: claim.id,
                claimed: Claimed::Unreachable(format!("more than {QUEUE} claims waiting")),
            };
            let events = self.events.clone();
            tokio::spawn(async move { events.send(unanswered).await });
        }
    }
}

/// Takes the claims queued, as many as one batch holds, and sends them
/// in one script call; up to [`BATCHES_IN_FLIGHT`] calls at once.
async fn claim_batches(primary: Primary, node: String, mut queue: mpsc::Receiver<Claim>, events: mpsc::Sender<Event>) {
    let script = Script::new(CLAIM);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut batches = 0u64;
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        batches += 1;
        let grant_key = batch_key(&node, batches);
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let claims = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        let (primary, script, node, events) = (primary.clone(), script.clone(), node.clone(), events.clone());
        tokio::spawn(async move {
            let mut invocation = script.prepare_invoke();
            for c in &claims {
                invocation.key(&c.nonce_key);
            }
            invocation.key(grant_key).arg(&node);
            for c in &claims {
                invocation.arg(c.until).arg(&c.json).arg(c.lifetime_ms);
            }
            let answer = tokio::time::timeout(CLAIM_TIMEOUT, primary.invoke::<Vec<i64>>(&invocation)).await;
            drop(permit);
            let answers: Vec<Claimed> = match answer {
                Ok(Ok(fresh)) if fresh.len() == claims.len() => fresh
                    .into_iter()
                    .map(|f| if f == 1 { Claimed::Fresh } else { Claimed::Taken })
                    .collect(),
                Ok(Ok(fresh)) => unanswered(&claims, &format!("{} answers to {} claims", fresh.len(), claims.len())),
                Ok(Err(e)) => unanswered(&claims, &e.to_string()),
                Err(_) => unanswered(&claims, &format!("no answer within {CLAIM_TIMEOUT:?}")),
            };
            for (c, claimed) in claims.iter().zip(answers) {
                if events.send(Event::Claimed { id: c.id, claimed }).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A key of its own for one batch's grants: the node, the time, a count.
fn batch_key(node: &str, n: u64) -> String {
    format!("{GRANT_PREFIX}{node}:{}:{n}", crate::clock::unix_now_ms())
}

fn unanswered(claims: &[Claim], why: &str) -> Vec<Claimed> {
    claims.iter().map(|_| Claimed::Unreachable(why.to_string())).collect()
}

impl Link {
    /// Pushes this node's answer to `question`, kept for 10 s.
    pub fn answer(&self, question: &Question, answer: serde_json::Value) {
        let text = serde_json::to_string(&Answer {
            node: self.node.clone(),
            answer,
        })
        .unwrap_or_default();
        let mut pipe = redis::pipe();
        pipe.cmd("RPUSH").arg(&question.reply).arg(text).ignore();
        pipe.cmd("EXPIRE").arg(&question.reply).arg(10).ignore();
        let primary = self.primary.clone();
        tokio::spawn(async move {
            let sent = match primary.connection().await {
                Ok(mut con) => pipe.query_async::<()>(&mut con).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                primary.forget();
                warn!(error = %e, "answering the cluster failed");
            }
        });
    }

    /// Writes this node's replay cache and the grants it holds back into
    /// Redis where they are missing: after Redis was away (and perhaps
    /// restarted empty), so a knock seen before is still a replay on every
    /// node and a node that starts now still gets the live grants.
    pub fn republish(&self, nonces: Vec<([u8; NONCE_LEN], u64)>, grants: Vec<SharedGrant>) {
        // A connection of its own: the shared one may not have noticed yet
        // that Redis went away.
        let target = self.primary.target.clone();
        let now_ms = crate::clock::unix_now_ms();
        let mut pipe = redis::pipe();
        for (nonce, until) in &nonces {
            pipe.cmd("SET")
                .arg(format!("gatekeeper:nonce:{}", crate::hex::encode(nonce)))
                .arg(&self.node)
                .arg("NX")
                .arg("EXAT")
                .arg(until)
                .ignore();
        }
        // All under one key of their own, kept until the last runs out.
        let longest = grants.iter().map(|g| g.expires_ms.saturating_sub(now_ms)).max();
        if let (Some(longest), Ok(json)) = (longest, serde_json::to_string(&grants)) {
            pipe.cmd("SET")
                .arg(batch_key(&self.node, 0))
                .arg(json)
                .arg("PX")
                .arg(longest.max(1))
                .ignore();
        }
        tokio::spawn(async move {
            let written = match connect(&target).await {
                Ok(mut con) => pipe.query_async::<()>(&mut con).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => info!(
                    nonces = nonces.len(),
                    grants = grants.len(),
                    "wrote this node's replay cache and grants back into the cluster"
                ),
                Err(e) => warn!(error = %e, "writing this node's replay cache and grants back failed"),
            }
        });
    }
}

/// Subscribes to the grants and forwards them, reading every live grant
/// after each (re)subscription; retries while Redis is away.
async fn follow(target: RedisTarget, node: String, events: mpsc::Sender<Event>) {
    let mut lost = false;
    loop {
        match subscribe(&target).await {
            Ok((stream, live)) => {
                if std::mem::take(&mut lost) {
                    info!("subscribed to the cluster's grants again");
                }
                if events.send(Event::Resync(live)).await.is_err() {
                    return;
                }
                let mut stream = stream;
                while let Some(msg) = stream.next().await {
                    // Anything that does not parse is dropped unread.
                    let Ok(text) = msg.get_payload::<String>() else {
                        continue;
                    };
                    if msg.get_channel_name() == QUESTIONS {
                        if let Ok(question) = serde_json::from_str::<Question>(&text)
                            && question.reply.starts_with(ANSWER_PREFIX)
                            && question.reply.len() <= 64
                            && events.send(Event::Asked(question)).await.is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    // `NODE\n[grant, ...]`; this node's own grants are in
                    // its map already.
                    let Some((from, grants)) = text.split_once('\n') else {
                        continue;
                    };
                    if from == node {
                        continue;
                    }
                    let Ok(grants) = serde_json::from_str::<Vec<SharedGrant>>(grants) else {
                        continue;
                    };
                    for grant in grants.into_iter().filter(|g| g.node != node) {
                        if events.send(Event::Grant(grant)).await.is_err() {
                            return;
                        }
                    }
                }
                lost = true;
                if events.send(Event::Lost("the connection closed".into())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if !lost {
                    lost = true;
                    if events.send(Event::Lost(e.to_string())).await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

/// A subscription to the grants, and every grant live once it is up.
async fn subscribe(target: &RedisTarget) -> Result<(redis::aio::PubSubStream, Vec<SharedGrant>), RedisError> {
    let client = target.client_async().await?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(&[CHANNEL, QUESTIONS]).await?;
    let mut con = connect(target).await?;
    let live = live_grants(&mut con).await?;
    Ok((pubsub.into_on_message(), live))
}

/// Every grant Redis holds; what cannot be read is left out.
async fn live_grants(con: &mut impl redis::aio::ConnectionLike) -> Result<Vec<SharedGrant>, RedisError> {
    let mut live = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{GRANT_PREFIX}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        if !keys.is_empty() {
            let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(con).await?;
            live.extend(
                values
                    .into_iter()
                    .flatten()
                    .filter_map(|v| serde_json::from_str::<Vec<SharedGrant>>(&v).ok())
                    .flatten(),
            );
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(live)
}

/// Warns once per outage, and says when it is over.
#[derive(Default)]
pub struct Outage {
    since_ms: Option<u64>,
}

impl Outage {
    pub fn failed(&mut self, why: &str) {
        if self.since_ms.is_none() {
            self.since_ms = Some(crate::clock::unix_now_ms());
            warn!(
                error = why,
                "the cluster's Redis is unreachable: knocks are verified with this node's replay cache only and open only this node"
            );
        }
    }

    pub fn recovered(&mut self) {
        if let Some(since) = self.since_ms.take() {
            info!(
                down_ms = crate::clock::unix_now_ms().saturating_sub(since),
                "the cluster's Redis answers again"
            );
        }
    }
}
