//! The cluster backend: the records several gateways share, kept in Redis.
//!
//! ```text
//! gatekeeper:server_key    the gateways' knock keys (see `keys::ServerKeys`)
//! gatekeeper:identity      hash: cert, key (PEM), the TLS identity all nodes present
//! gatekeeper:config        the shared config (TOML, the same keys as gatekeeper.toml)
//! gatekeeper:clients       hash: NAME -> client record (TOML)
//! gatekeeper:tunnels       hash: NAME -> tunnel record (TOML)
//! gatekeeper:relays        hash: NAME -> relay agent record (TOML)
//! gatekeeper:version       bumped in the same transaction as every write
//! gatekeeper:nodes         hash: NODE -> what that node last reported (JSON)
//! gatekeeper:questions     channel: a question for every running node (JSON)
//! gatekeeper:answer:ID     list: the nodes' answers to one question, for 10 s
//! ```
//!
//! Each running node reports, about once a second, the version of the
//! records it has put into force; that is how a change made from any
//! node's CLI is confirmed by all of them, and how `status` lists them.
//!
//! Redis as Debian runs it keeps nothing on disk, so a restart empties
//! it. A store that has read the records remembers them as it read them,
//! and when it finds the server key gone it writes back what is missing
//! (every write only where nothing is, so nodes doing it at once agree)
//! instead of reporting every client as removed.
//!
//! Records are the same TOML as the local files, so a record that cannot
//! be used is named (`gatekeeper:clients NAME`) and skipped exactly as a
//! bad file is. Calls are synchronous with short timeouts: the CLI and the
//! watcher ask, and an unreachable server is an error they report and
//! retry, never a hang.

use std::{net::IpAddr, sync::Mutex, time::Duration};

use redis::{Connection, RedisError};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tunnel::tls::Identity;
use x25519_dalek::PublicKey;

use super::{
    ClientRecord, Kind, Problem, Put, RelayRecord, Snapshot, Store, StoreError, TunnelRecord, Version,
    config::ConfigFile, redis_target::RedisTarget, valid_name,
};
use crate::knock::keys::{self, ServerKeys};

const SERVER_KEY: &str = "gatekeeper:server_key";
const IDENTITY: &str = "gatekeeper:identity";
const CONFIG: &str = "gatekeeper:config";
const VERSION: &str = "gatekeeper:version";
const NODES: &str = "gatekeeper:nodes";
/// The channel questions for every node go out on.
pub const QUESTIONS: &str = "gatekeeper:questions";
/// Where the answers to one question are pushed: this, then its id.
pub const ANSWER_PREFIX: &str = "gatekeeper:answer:";
/// A node that has not reported for this long is not counted as running.
pub const NODE_SILENT_AFTER_MS: u64 = 3_000;
/// How long connecting, and each command, may take.
const TIMEOUT: Duration = Duration::from_millis(500);
/// A record larger than this is refused unread, as a file would be.
const MAX_RECORD: usize = 64 * 1024;

/// A Redis server holding a cluster's shared records.
pub struct ClusterStore {
    target: RedisTarget,
    location: String,
    /// Kept between calls; dropped after an error and made anew.
    connection: Mutex<Option<Connection>>,
    /// The records as last read, to write back if Redis loses them.
    seen: Mutex<Seen>,
}

/// A hash's records as read from Redis: name and TOML text.
type Raw = Vec<(String, String)>;

/// Records as read from Redis, raw.
#[derive(Default)]
struct Seen {
    server_key: Option<String>,
    identity: Option<(String, String)>,
    config: Option<String>,
    /// Per kind, in [`Kind::ALL`]'s order.
    records: [Raw; 3],
}

/// The hash that holds the records of `kind`.
fn hash(kind: Kind) -> String {
    format!("gatekeeper:{}", kind.plural())
}

impl ClusterStore {
    /// `url`: see [`RedisTarget`]. Nothing is dialled yet.
    pub fn open(url: &str) -> Result<ClusterStore, StoreError> {
        let target = RedisTarget::parse(url)?;
        Ok(ClusterStore {
            location: target.location().to_string(),
            target,
            connection: Mutex::new(None),
            seen: Mutex::new(Seen::default()),
        })
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The knock keys in `text`, as read from Redis; kept to be written back.
    fn parse_server_keys(&self, text: String) -> Result<ServerKeys, StoreError> {
        let keys = ServerKeys::parse(&text).map_err(|e| StoreError::Invalid {
            path: format!("{SERVER_KEY} at {}", self.location),
            reason: e.to_string(),
        })?;
        self.seen().server_key = Some(text);
        Ok(keys)
    }

    /// Writes back what this store has read and Redis no longer holds.
    /// Returns whether there was anything to write back from.
    fn restore(&self) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        {
            let seen = self.seen();
            let Some(key) = &seen.server_key else {
                return Ok(false);
            };
            pipe.cmd("SET").arg(SERVER_KEY).arg(key).arg("NX").ignore();
            if let Some(config) = &seen.config {
                pipe.cmd("SETNX").arg(CONFIG).arg(config).ignore();
            }
            if let Some((cert, key)) = &seen.identity {
                pipe.cmd("HSETNX").arg(IDENTITY).arg("cert").arg(cert).ignore();
                pipe.cmd("HSETNX").arg(IDENTITY).arg("key").arg(key).ignore();
            }
            for (kind, records) in Kind::ALL.into_iter().zip(&seen.records) {
                for (name, text) in records {
                    pipe.cmd("HSETNX").arg(hash(kind)).arg(name).arg(text).ignore();
                }
            }
            // Users live outside the keyspace, but a Redis that lost its
            // keys without an ACL file lost them too.
            let relays = &seen.records[2];
            for rec in relays.iter().filter_map(|(_, text)| parse::<RelayRecord>(text).ok()) {
                if let (Some(user), Some(hash)) = (&rec.redis_user, &rec.redis_password_sha256) {
                    relay_user(&mut pipe, user, hash, &rec.name);
                }
            }
            pipe.cmd("INCR").arg(VERSION).ignore();
        }
        self.with(|c| pipe.query::<()>(c))?;
        tracing::warn!(location = %self.location, "the cluster's Redis had lost its records (restarted empty?); wrote back those last read here");
        Ok(true)
    }

    /// Runs `f` on the kept connection (made if needed); a failure drops
    /// it, so the next call dials afresh.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>) -> Result<T, StoreError> {
        let mut kept = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        let mut con = match kept.take() {
            Some(con) => con,
            None => self.dial().map_err(|e| self.err(e))?,
        };
        let result = f(&mut con);
        if result.is_ok() {
            *kept = Some(con);
        }
        result.map_err(|e| self.err(e))
    }

    /// Where the records are, for the daemon's own link to the same Redis.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// Connects to the primary as of now (with Sentinel, asked anew).
    fn dial(&self) -> redis::RedisResult<Connection> {
        let con = self.target.client()?.get_connection_with_timeout(TIMEOUT)?;
        con.set_read_timeout(Some(TIMEOUT))?;
        con.set_write_timeout(Some(TIMEOUT))?;
        Ok(con)
    }

    fn err(&self, source: RedisError) -> StoreError {
        StoreError::Cluster {
            location: self.location.clone(),
            reason: source.to_string(),
        }
    }

    fn get<T: DeserializeOwned>(&self, kind: Kind, name: &str) -> Result<T, StoreError> {
        if !valid_name(name) {
            return Err(kind.missing(name));
        }
        let hash = hash(kind);
        let text: Option<String> = self.with(|c| redis::cmd("HGET").arg(&hash).arg(name).query(c))?;
        let text = text.ok_or_else(|| kind.missing(name))?;
        parse(&text).map_err(|reason| StoreError::Invalid {
            path: format!("{hash} {name}"),
            reason,
        })
    }

    /// Writes `rec` as TOML under `name` in the hash of `kind`; refused
    /// if it is there already and `put` says create.
    fn put(&self, kind: Kind, name: &str, rec: &impl Serialize, put: Put) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::Name {
                kind: kind.noun(),
                name: name.to_string(),
            });
        }
        let hash = hash(kind);
        let text = toml::to_string(rec).map_err(|e| StoreError::Invalid {
            path: format!("{hash} {name}"),
            reason: e.to_string(),
        })?;
        let set = match put {
            Put::Create => "HSETNX",
            Put::Replace => "HSET",
        };
        let (written, _): (i64, i64) = self.with(|c| {
            redis::pipe()
                .atomic()
                .cmd(set)
                .arg(&hash)
                .arg(name)
                .arg(text)
                .cmd("INCR")
                .arg(VERSION)
                .query(c)
        })?;
        if put == Put::Create && written == 0 {
            return Err(kind.duplicate(name));
        }
        Ok(())
    }
}

/// The commands an agent's connections need: publishing and subscribing,
/// pinging, choosing the database. (redis-rs also names itself with
/// `CLIENT SETINFO`, and ignores the refusal.)
const AGENT_COMMANDS: [&str; 6] = ["+publish", "+subscribe", "+unsubscribe", "+ping", "+select", "+quit"];

/// Adds to `pipe` the making (or remaking) of the Redis user relay agent
/// `relay` connects as: its password given by its SHA-256, its channels
/// only its own, no keys, no other command.
fn relay_user(pipe: &mut redis::Pipeline, user: &str, password_sha256: &str, relay: &str) {
    let cmd = pipe.cmd("ACL");
    cmd.arg("SETUSER")
        .arg(user)
        .arg("reset")
        .arg("on")
        .arg(format!("#{password_sha256}"))
        .arg("resetchannels")
        .arg(format!("&gatekeeper:relay:{relay}:*"))
        .arg("-@all");
    for c in AGENT_COMMANDS {
        cmd.arg(c);
    }
    cmd.ignore();
}

impl ClusterStore {
    /// Makes the Redis user relay agent `relay` connects as (see
    /// [`relay_user`]); needs a cluster user allowed to run `ACL`.
    pub fn set_relay_user(&self, user: &str, password_sha256: &str, relay: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        relay_user(&mut pipe, user, password_sha256, relay);
        self.with(|c| pipe.query::<()>(c))
    }

    /// Deletes a relay agent's Redis user; Redis closes its connections.
    pub fn delete_relay_user(&self, user: &str) -> Result<(), StoreError> {
        self.with(|c| redis::cmd("ACL").arg("DELUSER").arg(user).query::<i64>(c))
            .map(|_| ())
    }
}

/// What a running node last said about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub name: String,
    /// The records' version it has put into force.
    pub applied: u64,
    /// Unix milliseconds of the report.
    pub seen_ms: u64,
    pub pid: u32,
    pub release: String,
    /// Unix seconds it started at.
    pub started: u64,
    /// Its own address (`--advertise`), where agents reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<IpAddr>,
    /// The tunnels whose agent holds a session with it now.
    #[serde(default)]
    pub tunnels: Vec<String>,
}

impl NodeReport {
    /// Whether the node reported recently enough to count as running.
    pub fn live_at(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.seen_ms) < NODE_SILENT_AFTER_MS
    }
}

/// A question for every running node, as it goes out on [`QUESTIONS`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// What is asked: `whitelist` (the node's whitelist map).
    pub what: String,
    /// The list to push the answer onto; starts with [`ANSWER_PREFIX`].
    pub reply: String,
}

/// One node's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub node: String,
    pub answer: serde_json::Value,
}

/// What the running nodes answered, and which said nothing in time.
#[derive(Debug)]
pub struct Answers {
    pub answered: Vec<Answer>,
    pub silent: Vec<String>,
}

impl ClusterStore {
    /// Asks every running node `what` and waits up to `wait` for them all.
    pub fn ask(&self, what: &str, wait: Duration) -> Result<Answers, StoreError> {
        let now_ms = crate::clock::unix_now_ms();
        let running: Vec<String> = self
            .nodes()?
            .into_iter()
            .filter(|n| n.live_at(now_ms))
            .map(|n| n.name)
            .collect();
        let mut id = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
        let question = Question {
            what: what.to_string(),
            reply: format!("{ANSWER_PREFIX}{}", crate::hex::encode(&id)),
        };
        let message = serde_json::to_string(&question).unwrap_or_default();
        self.with(|c| redis::cmd("PUBLISH").arg(QUESTIONS).arg(&message).query::<i64>(c))?;
        let deadline = std::time::Instant::now() + wait;
        let mut answered: Vec<Answer> = Vec::new();
        while answered.len() < running.len() && std::time::Instant::now() < deadline {
            // Short waits: each must end within the connection's timeout.
            let popped: Option<(String, String)> =
                self.with(|c| redis::cmd("BLPOP").arg(&question.reply).arg(0.3).query(c))?;
            if let Some(answer) = popped.and_then(|(_, text)| serde_json::from_str::<Answer>(&text).ok())
                && !answered.iter().any(|a| a.node == answer.node)
            {
                answered.push(answer);
            }
        }
        // Tidy only: late answers expire with the list in 10 s anyway.
        let _ = self.with(|c| redis::cmd("DEL").arg(&question.reply).query::<()>(c));
        answered.sort_by(|a, b| a.node.cmp(&b.node));
        let silent = running
            .into_iter()
            .filter(|n| !answered.iter().any(|a| &a.node == n))
            .collect();
        Ok(Answers { answered, silent })
    }

    /// Records what this node has put into force.
    pub fn report_node(&self, report: &NodeReport) -> Result<(), StoreError> {
        let json = serde_json::to_string(report).map_err(|e| StoreError::Invalid {
            path: format!("{NODES} {}", report.name),
            reason: e.to_string(),
        })?;
        self.with(|c| redis::cmd("HSET").arg(NODES).arg(&report.name).arg(json).query::<()>(c))
    }

    /// Every node that ever reported, in name order; reports that cannot
    /// be read are left out.
    pub fn nodes(&self) -> Result<Vec<NodeReport>, StoreError> {
        let all: Vec<(String, String)> = self.with(|c| redis::cmd("HGETALL").arg(NODES).query(c))?;
        let mut nodes: Vec<NodeReport> = all.iter().filter_map(|(_, j)| serde_json::from_str(j).ok()).collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }
}

/// The records of `hash`, with where each is and the name it is under;
/// the unreadable ones as problems.
fn parse_all<T: DeserializeOwned>(kind: Kind, all: &[(String, String)]) -> super::Loaded<T> {
    let (mut records, mut problems) = (Vec::new(), Vec::new());
    for (name, text) in all {
        let path = format!("{} {name}", hash(kind));
        match parse(text) {
            Ok(rec) => records.push((path, name.clone(), rec)),
            Err(reason) => problems.push(Problem { path, reason }),
        }
    }
    records.sort_by(|a, b| a.0.cmp(&b.0));
    (records, problems)
}

fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    if text.len() > MAX_RECORD {
        return Err(format!("{} bytes, larger than any record", text.len()));
    }
    toml::from_str(text).map_err(|e| super::toml_error(text, &e))
}

impl Store for ClusterStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn initialised(&self) -> bool {
        self.with(|c| redis::cmd("EXISTS").arg(SERVER_KEY).query::<bool>(c))
            .unwrap_or(false)
    }

    fn init(&self, public_addrs: &[IpAddr], force: bool) -> Result<PublicKey, StoreError> {
        let keys = ServerKeys::new(keys::generate());
        let encoded = keys.to_text();
        let config = ConfigFile::starter(public_addrs, &format!("gatekeeper run --cluster {}", self.location));
        let set: bool = self.with(|c| {
            let mut set = redis::cmd("SET");
            set.arg(SERVER_KEY).arg(&encoded);
            if !force {
                set.arg("NX");
            }
            let (done, _, _): (Option<String>, bool, i64) = redis::pipe()
                .atomic()
                .add_command(set)
                .cmd("SETNX")
                .arg(CONFIG)
                .arg(&config)
                .cmd("INCR")
                .arg(VERSION)
                .query(c)?;
            Ok(done.is_some())
        })?;
        if !set {
            return Err(StoreError::Exists(format!("{SERVER_KEY} at {}", self.location)));
        }
        if force {
            self.with(|c| redis::cmd("SET").arg(CONFIG).arg(&config).query::<()>(c))?;
        }
        Ok(keys.public())
    }

    fn server_keys(&self) -> Result<ServerKeys, StoreError> {
        let text: Option<String> = self.with(|c| redis::cmd("GET").arg(SERVER_KEY).query(c))?;
        let text = text.ok_or_else(|| StoreError::ClusterNotInitialised(self.location.clone()))?;
        self.parse_server_keys(text)
    }

    fn put_server_keys(&self, keys: &ServerKeys) -> Result<(), StoreError> {
        let text = keys.to_text();
        self.with(|c| {
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(SERVER_KEY)
                .arg(&text)
                .ignore()
                .cmd("INCR")
                .arg(VERSION)
                .ignore()
                .query::<()>(c)
        })?;
        self.seen().server_key = Some(text);
        Ok(())
    }

    fn identity(&self) -> Result<Identity, StoreError> {
        let pem = |c: &mut Connection| -> redis::RedisResult<(Option<String>, Option<String>)> {
            redis::cmd("HMGET").arg(IDENTITY).arg("cert").arg("key").query(c)
        };
        if let (Some(cert), Some(key)) = self.with(pem)? {
            let id = Identity::from_pem(&cert, &key).map_err(StoreError::Tls)?;
            self.seen().identity = Some((cert, key));
            return Ok(id);
        }
        let id = Identity::generate(&self.config()?.certificate_names()).map_err(StoreError::Tls)?;
        let (cert, key) = id.to_pem();
        // The first node to get here makes the identity; the others use it.
        self.with(|c| {
            redis::pipe()
                .atomic()
                .cmd("HSETNX")
                .arg(IDENTITY)
                .arg("cert")
                .arg(cert)
                .cmd("HSETNX")
                .arg(IDENTITY)
                .arg("key")
                .arg(key)
                .query::<()>(c)
        })?;
        match self.with(pem)? {
            (Some(cert), Some(key)) => Identity::from_pem(&cert, &key).map_err(StoreError::Tls),
            _ => Err(StoreError::Invalid {
                path: format!("{IDENTITY} at {}", self.location),
                reason: "the certificate or its key went missing while it was being made".into(),
            }),
        }
    }

    fn put_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let (cert, key) = identity.to_pem();
        // Both in one transaction, and a new version, so every node's next
        // look serves the new certificate.
        self.with(|c| {
            redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(IDENTITY)
                .arg("cert")
                .arg(cert)
                .arg("key")
                .arg(key)
                .ignore()
                .cmd("INCR")
                .arg(VERSION)
                .ignore()
                .query::<()>(c)
        })?;
        self.seen().identity = Some((cert.to_string(), key.to_string()));
        Ok(())
    }

    fn config(&self) -> Result<ConfigFile, StoreError> {
        let text: Option<String> = self.with(|c| redis::cmd("GET").arg(CONFIG).query(c))?;
        match text {
            Some(text) => {
                let config = ConfigFile::parse(&text, &format!("{CONFIG} at {}", self.location))?;
                self.seen().config = Some(text);
                Ok(config)
            }
            None => Ok(ConfigFile::default()),
        }
    }

    /// Also where a restart that emptied Redis is found: the records are
    /// written back, or, by a store that never read them, reported as lost.
    fn version(&self) -> Result<Version, StoreError> {
        let read = |c: &mut Connection| -> redis::RedisResult<(Option<u64>, bool)> {
            redis::pipe()
                .cmd("GET")
                .arg(VERSION)
                .cmd("EXISTS")
                .arg(SERVER_KEY)
                .query(c)
        };
        let (mut version, mut initialised) = self.with(read)?;
        if !initialised && self.restore()? {
            (version, initialised) = self.with(read)?;
        }
        if !initialised {
            return Err(StoreError::ClusterEmptied(self.location.clone()));
        }
        Ok(Version(version.unwrap_or(0)))
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let (server_key, clients, tunnels, relays): (Option<String>, Raw, Raw, Raw) = self.with(|c| {
            redis::pipe()
                .atomic()
                .cmd("GET")
                .arg(SERVER_KEY)
                .cmd("HGETALL")
                .arg(hash(Kind::Client))
                .cmd("HGETALL")
                .arg(hash(Kind::Tunnel))
                .cmd("HGETALL")
                .arg(hash(Kind::Relay))
                .query(c)
        })?;
        // Without the server key the records are not gone: Redis is.
        let Some(server_key) = server_key else {
            return Err(StoreError::ClusterEmptied(self.location.clone()));
        };
        let server_keys = self.parse_server_keys(server_key)?;
        let (client_records, mut problems) = parse_all::<ClientRecord>(Kind::Client, &clients);
        let (tunnel_records, more) = parse_all::<TunnelRecord>(Kind::Tunnel, &tunnels);
        problems.extend(more);
        let (relay_records, more) = parse_all::<RelayRecord>(Kind::Relay, &relays);
        problems.extend(more);
        self.seen().records = [clients, tunnels, relays];
        let mut snap = Snapshot {
            problems,
            server_keys: Some(server_keys),
            ..Snapshot::default()
        };
        snap.admit(client_records, tunnel_records, relay_records);
        Ok(snap)
    }

    fn client(&self, name: &str) -> Result<ClientRecord, StoreError> {
        self.get(Kind::Client, name)
    }

    fn put_client(&self, rec: &ClientRecord, put: Put) -> Result<(), StoreError> {
        self.put(Kind::Client, &rec.name, rec, put)
    }

    fn tunnel(&self, name: &str) -> Result<TunnelRecord, StoreError> {
        self.get(Kind::Tunnel, name)
    }

    fn put_tunnel(&self, rec: &TunnelRecord, put: Put) -> Result<(), StoreError> {
        self.put(Kind::Tunnel, &rec.name, rec, put)
    }

    fn relay(&self, name: &str) -> Result<RelayRecord, StoreError> {
        self.get(Kind::Relay, name)
    }

    fn put_relay(&self, rec: &RelayRecord, put: Put) -> Result<(), StoreError> {
        self.put(Kind::Relay, &rec.name, rec, put)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::redis_target::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("redis://gk:s3cret@10.0.0.5:6379/2"),
            "redis://***@10.0.0.5:6379/2"
        );
        assert_eq!(redact("redis://10.0.0.5"), "redis://10.0.0.5");
        let e = ClusterStore::open("redis://gk:s3cret@[::1:6379")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| !e.contains("s3cret")));
    }
}
