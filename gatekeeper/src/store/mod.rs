//! One owner for the gateway's state: the server's knock key, its TLS
//! identity, the enrolled clients, the tunnel records and the shared
//! config. Everything else reads and changes state through [`Store`], so a
//! cluster backend can take the place of the local files without touching
//! the knock, tunnel and portal code.
//!
//! - [`config`]: the config file's schema, and the daemon's settings
//!   resolved from it and from flags.
//! - [`files`]: the local-files backend, a state directory.
//! - [`cluster`]: the cluster backend, records several gateways share in
//!   Redis.
//! - [`watch`]: following the state, so that every revocation takes effect.
//!
//! Three kinds of record ([`Kind`]): enrolled clients, published tunnels,
//! and relay agents.
//!
//! A record that cannot be used (a file with a syntax error, a missing key,
//! a name that does not match its file) is a [`Problem`]: named, reported,
//! skipped. It never stops anyone else's knock, revocation or enrollment.

pub mod cluster;
pub mod config;
pub mod files;
pub mod redis_target;
pub mod watch;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tunnel::tls::{Identity, TlsError};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::{
    clock::unix_now,
    knock::{
        credential::Credential,
        fwknop::FwknopKeys,
        keys::{self, ServerKeys},
    },
    spec::PortSet,
};
use config::{ConfigError, ConfigFile};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} already exists: `gatekeeper rotate-key` changes the knock key without re-enrolling anyone; --force replaces it outright (every enrolled client then needs a new credential)"
    )]
    Exists(String),
    #[error("{0} is not initialised: run `gatekeeper init --state-dir {0} --public-addr ADDR` first")]
    NotInitialised(String),
    #[error("the cluster at {0} is not initialised: run `gatekeeper init --cluster URL --public-addr ADDR` once first")]
    ClusterNotInitialised(String),
    #[error(
        "the cluster's Redis at {0} holds no records: never initialised (run `gatekeeper init --cluster URL --public-addr ADDR`), or restarted empty (a running node writes back what it last read within a second; if none runs, init afresh)"
    )]
    ClusterEmptied(String),
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("bad {kind} name {name:?}: use 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit")]
    Name { kind: &'static str, name: String },
    #[error("a client named {0:?} is already enrolled: pick another name, one per device")]
    DuplicateClient(String),
    #[error(
        "this public key is already enrolled, as client {0:?}: one key per device (make another with `gatekeeper keygen`)"
    )]
    KeyEnrolled(String),
    #[error("no client named {0:?}: see `gatekeeper client list`")]
    NoSuchClient(String),
    #[error("a tunnel named {0:?} exists already: pick another name or revoke it first")]
    DuplicateTunnel(String),
    #[error("no tunnel named {0:?}: see `gatekeeper tunnel list`")]
    NoSuchTunnel(String),
    #[error("a relay agent named {0:?} exists already: pick another name or revoke it first")]
    DuplicateRelay(String),
    #[error("no relay agent named {0:?}: see `gatekeeper relay list`")]
    NoSuchRelay(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the gateway's TLS identity")]
    Tls(#[source] TlsError),
    #[error(
        "bad cluster address {url}: {reason}; use redis://[USER:PASS@]HOST:PORT[/DB], rediss://... for TLS, or redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
    )]
    ClusterUrl { url: String, reason: String },
    /// `reason` is the Redis client's error as text: it already names its
    /// cause, which as a source would be printed twice.
    #[error("the cluster's Redis at {location}: {reason}")]
    Cluster { location: String, reason: String },
}

/// Records read from a store, each with where it is and the name that
/// place gives it, and the places that could not be read as records.
type Loaded<T> = (Vec<(String, String, T)>, Vec<Problem>);

/// The kinds of record a store keeps, each in a place of its own (a
/// directory of files, a Redis hash) under its plural.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Client,
    Tunnel,
    Relay,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Client, Kind::Tunnel, Kind::Relay];

    /// What one record is called in messages.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Tunnel => "tunnel",
            Kind::Relay => "relay",
        }
    }

    /// Where the records of this kind are kept: a directory, a hash's suffix.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Client => "clients",
            Kind::Tunnel => "tunnels",
            Kind::Relay => "relays",
        }
    }

    fn missing(self, name: &str) -> StoreError {
        let name = name.to_string();
        match self {
            Kind::Client => StoreError::NoSuchClient(name),
            Kind::Tunnel => StoreError::NoSuchTunnel(name),
            Kind::Relay => StoreError::NoSuchRelay(name),
        }
    }

    fn duplicate(self, name: &str) -> StoreError {
        let name = name.to_string();
        match self {
            Kind::Client => StoreError::DuplicateClient(name),
            Kind::Tunnel => StoreError::DuplicateTunnel(name),
            Kind::Relay => StoreError::DuplicateRelay(name),
        }
    }
}

/// One enrolled device, as the gateway stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRecord {
    pub name: String,
    /// Owner id written into the whitelist entries this client opens.
    pub id: u32,
    pub public_key: String,
    /// Protocols and ports the client may open (`tcp/22,udp/53,icmp`).
    pub allow: String,
    pub enabled: bool,
    /// The client may knock from behind NAT (its `local_ip` may differ).
    #[serde(default)]
    pub nat: bool,
    /// Unix seconds after which knocks are refused; none: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    pub created: u64,
    /// `HOST:PORT` the portal relays this client to; none: the portal's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal_upstream: Option<String>,
    /// The key this client had before its last re-issue, accepted until
    /// `previous_key_until` (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_until: Option<u64>,
    /// The keys the stock fwknop client knocks with, if it may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwknop: Option<FwknopKeys>,
    /// Seconds its knocks open the gate for; none: `[knock] open_for`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<u64>,
}

impl ClientRecord {
    /// The ports the client may open. Checked when the record is loaded.
    pub fn policy(&self) -> PortSet {
        self.allow.parse().unwrap_or_default()
    }

    pub fn public(&self) -> Result<PublicKey, keys::KeyError> {
        keys::decode_public(&self.public_key)
    }

    /// The key the client had before its last re-issue, while it is
    /// still accepted at `unix_now`.
    pub fn previous_public(&self, unix_now: u64) -> Option<(PublicKey, u64)> {
        let until = self.previous_key_until.filter(|u| unix_now < *u)?;
        let key = keys::decode_public(self.previous_public_key.as_deref()?).ok()?;
        Some((key, until))
    }

    pub fn expired_at(&self, unix_now: u64) -> bool {
        self.expires.is_some_and(|e| unix_now >= e)
    }

    /// Whether the client may knock at `unix_now`.
    pub fn allowed_at(&self, unix_now: u64) -> bool {
        self.enabled && !self.expired_at(unix_now)
    }

    /// `enabled`, `revoked` or `expired`, as `client list` shows it.
    pub fn status(&self, unix_now: u64) -> &'static str {
        if !self.enabled {
            "revoked"
        } else if self.expired_at(unix_now) {
            "expired"
        } else {
            "enabled"
        }
    }

    /// Everything a loaded record must satisfy beyond parsing.
    fn check(&self, stem: &str) -> Result<(), String> {
        if self.name != stem {
            return Err(format!(
                "holds client {:?}, but the file must be named after it",
                self.name
            ));
        }
        if !valid_name(&self.name) {
            return Err(format!("bad client name {:?}", self.name));
        }
        self.public().map_err(|e| format!("public_key: {e}"))?;
        if let Some(previous) = &self.previous_public_key {
            keys::decode_public(previous).map_err(|e| format!("previous_public_key: {e}"))?;
        }
        self.allow
            .parse::<PortSet>()
            .map_err(|e| format!("allow = {:?}: {e}", self.allow))?;
        if let Some(up) = &self.portal_upstream {
            crate::spec::upstream(up).map_err(|e| format!("portal_upstream: {e}"))?;
        }
        Ok(())
    }
}

/// One published service, as the gateway stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelRecord {
    pub name: String,
    pub owner: String,
    pub token_id: String,
    /// SHA-256 of the tunnel secret, hex; the secret itself is only in the token.
    pub secret_sha256: String,
    /// Enrolled clients that may knock for the published port.
    pub allow: Vec<String>,
    pub public_port: u16,
    /// The knock client enrolled for this tunnel's agent.
    pub agent_client: String,
    pub revoked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    pub created: u64,
    /// Paused: the public port is closed and its connections cut; the
    /// agent stays connected and keeps its lease.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The token a re-issue replaced, still accepted until its time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token: Option<PreviousToken>,
}

/// A tunnel token replaced by `tunnel reissue`, accepted for an overlap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousToken {
    pub token_id: String,
    pub secret_sha256: String,
    /// Unix seconds.
    pub until: u64,
}

/// Whether `secret` hashes to `sha256` (hex), compared without an early exit.
fn hashes_to(secret: &[u8], sha256: &str) -> bool {
    let digest = crate::hex::encode(&Sha256::digest(secret));
    digest.len() == sha256.len()
        && digest
            .bytes()
            .zip(sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

impl TunnelRecord {
    /// Whether `token_id` and `secret` are this tunnel's token at
    /// `unix_now`: the current one, or the one a re-issue replaced during
    /// its overlap.
    pub fn token_matches(&self, token_id: &str, secret: &[u8], unix_now: u64) -> bool {
        if token_id == self.token_id {
            return hashes_to(secret, &self.secret_sha256);
        }
        self.previous_token
            .as_ref()
            .is_some_and(|p| p.token_id == token_id && unix_now < p.until && hashes_to(secret, &p.secret_sha256))
    }

    /// Whether a session that proved itself with `token_id` may go on at `unix_now`.
    pub fn accepts_token(&self, token_id: &str, unix_now: u64) -> bool {
        token_id == self.token_id
            || self
                .previous_token
                .as_ref()
                .is_some_and(|p| p.token_id == token_id && unix_now < p.until)
    }

    pub fn live_at(&self, unix_now: u64) -> bool {
        !self.revoked && self.expires.is_none_or(|e| unix_now < e)
    }

    fn check(&self, stem: &str) -> Result<(), String> {
        if self.name != stem {
            return Err(format!(
                "holds tunnel {:?}, but the file must be named after it",
                self.name
            ));
        }
        if self.public_port == 0 {
            return Err("public_port = 0".into());
        }
        Ok(())
    }
}

/// An agent that publishes HTTP services through the cluster's Redis,
/// as the gateway stores it: its public key, never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayRecord {
    pub name: String,
    /// The `Host` visitors ask for (lower case, no port).
    pub host: String,
    pub owner: String,
    /// The agent's X25519 public key.
    pub public_key: String,
    /// Enrolled clients that may knock for the relay's HTTP port.
    pub allow: Vec<String>,
    pub revoked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    pub created: u64,
    /// The Redis user the agent connects as, limited to its own channels
    /// (`relay issue --redis-user`), and its password's SHA-256 (hex), so
    /// the user can be made again should Redis lose it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_password_sha256: Option<String>,
}

impl RelayRecord {
    pub fn live_at(&self, unix_now: u64) -> bool {
        !self.revoked && self.expires.is_none_or(|e| unix_now < e)
    }

    /// `live`, `revoked` or `expired`, as `relay list` shows it.
    pub fn status(&self, unix_now: u64) -> &'static str {
        if self.revoked {
            "revoked"
        } else if self.live_at(unix_now) {
            "live"
        } else {
            "expired"
        }
    }

    pub fn public(&self) -> Result<PublicKey, keys::KeyError> {
        keys::decode_public(&self.public_key)
    }

    fn check(&self, stem: &str) -> Result<(), String> {
        if self.name != stem {
            return Err(format!(
                "holds relay {:?}, but the file must be named after it",
                self.name
            ));
        }
        if !valid_host(&self.host) {
            return Err(format!("bad host {:?}", self.host));
        }
        self.public().map_err(|e| format!("public_key: {e}"))?;
        Ok(())
    }
}

/// A host name as visitors send it in `Host`: 1-253 characters of
/// lower-case letters, digits, '-' and '.', no empty label.
pub fn valid_host(host: &str) -> bool {
    (1..=253).contains(&host.len())
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A record that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Problem {
    /// Where it is: a file, or a key in a cluster store.
    pub path: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Every usable record at one moment, and the unusable ones named.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// In name order.
    pub clients: Vec<ClientRecord>,
    /// In name order.
    pub tunnels: Vec<TunnelRecord>,
    /// In name order.
    pub relays: Vec<RelayRecord>,
    /// In path order.
    pub problems: Vec<Problem>,
    /// The knock keys clients' knocks are sealed for; read with the
    /// records, so that a rotation takes effect like any other change.
    /// `None` only in a snapshot made by hand.
    pub server_keys: Option<ServerKeys>,
}

impl Snapshot {
    pub fn client(&self, name: &str) -> Option<&ClientRecord> {
        self.clients.iter().find(|c| c.name == name)
    }

    /// Checks loaded records, moving the unusable ones to `problems`:
    /// each record comes with where it came from and the name that place
    /// gives it. Two clients may share neither an id nor a key; two relay
    /// agents not a host.
    fn admit(
        &mut self,
        clients: Vec<(String, String, ClientRecord)>,
        tunnels: Vec<(String, String, TunnelRecord)>,
        relays: Vec<(String, String, RelayRecord)>,
    ) {
        for (path, stem, rec) in clients {
            let clash = rec.check(&stem).err().or_else(|| {
                self.clients.iter().find_map(|c| {
                    if c.id == rec.id {
                        Some(format!("id {} is also client {:?}'s", rec.id, c.name))
                    } else if c.public_key == rec.public_key {
                        Some(format!("the same public key as client {:?}", c.name))
                    } else {
                        None
                    }
                })
            });
            match clash {
                Some(reason) => self.problems.push(Problem { path, reason }),
                None => self.clients.push(rec),
            }
        }
        for (path, stem, rec) in tunnels {
            match rec.check(&stem) {
                Ok(()) => self.tunnels.push(rec),
                Err(reason) => self.problems.push(Problem { path, reason }),
            }
        }
        for (path, stem, rec) in relays {
            let clash = rec.check(&stem).err().or_else(|| {
                self.relays
                    .iter()
                    .find(|r| r.host == rec.host && r.live_at(unix_now()))
                    .filter(|_| rec.live_at(unix_now()))
                    .map(|r| format!("host {} is also relay {:?}'s", rec.host, r.name))
            });
            match clash {
                Some(reason) => self.problems.push(Problem { path, reason }),
                None => self.relays.push(rec),
            }
        }
        self.clients.sort_by(|a, b| a.name.cmp(&b.name));
        self.tunnels.sort_by(|a, b| a.name.cmp(&b.name));
        self.relays.sort_by(|a, b| a.name.cmp(&b.name));
        self.problems.sort();
    }
}

/// An opaque mark that changes whenever the records change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version(pub u64);

/// How to write a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    /// Only if no record of that name exists.
    Create,
    Replace,
}

/// Where the gateway's state lives. Implementations store records; the
/// operations built on them are the provided methods, written once.
pub trait Store: Send + Sync {
    /// Where the state lives, for messages: a directory, a server.
    fn location(&self) -> String;
    /// Whether `gatekeeper init` has run here.
    fn initialised(&self) -> bool;
    /// Creates the server key and a starter config. Refuses to replace an
    /// existing key unless `force`.
    fn init(&self, public_addrs: &[IpAddr], force: bool) -> Result<PublicKey, StoreError>;
    /// The gateway's knock keys: the current one, and the one a rotation
    /// replaced.
    fn server_keys(&self) -> Result<ServerKeys, StoreError>;
    /// Replaces the knock keys whole.
    fn put_server_keys(&self, keys: &ServerKeys) -> Result<(), StoreError>;
    /// The gateway's TLS identity: the tunnel listener's certificate and
    /// the portal's default one, which credentials pin. Created on first use.
    fn identity(&self) -> Result<Identity, StoreError>;
    /// Replaces the gateway's TLS identity (a renewal: the same key).
    fn put_identity(&self, identity: &Identity) -> Result<(), StoreError>;
    /// The shared config (defaults where there is none).
    fn config(&self) -> Result<ConfigFile, StoreError>;
    /// Changes whenever a record changes; cheap enough to ask often.
    fn version(&self) -> Result<Version, StoreError>;
    /// Every record; unusable ones as [`Problem`]s. Fails only when the
    /// store as a whole cannot be read.
    fn snapshot(&self) -> Result<Snapshot, StoreError>;
    fn client(&self, name: &str) -> Result<ClientRecord, StoreError>;
    fn put_client(&self, rec: &ClientRecord, put: Put) -> Result<(), StoreError>;
    fn tunnel(&self, name: &str) -> Result<TunnelRecord, StoreError>;
    fn put_tunnel(&self, rec: &TunnelRecord, put: Put) -> Result<(), StoreError>;
    fn relay(&self, name: &str) -> Result<RelayRecord, StoreError>;
    fn put_relay(&self, rec: &RelayRecord, put: Put) -> Result<(), StoreError>;

    /// Renews the gateway's certificate now: the same key, so every pin of
    /// it holds, under the names the config gives, valid for a year from
    /// now. Running daemons serve it from their next look at the state.
    fn renew_identity(&self) -> Result<Identity, StoreError> {
        let renewed = self
            .identity()?
            .reissue(&self.config()?.certificate_names())
            .map_err(StoreError::Tls)?;
        self.put_identity(&renewed)?;
        Ok(renewed)
    }

    /// The current knock key: what new credentials name, and the relay's key.
    fn server_secret(&self) -> Result<StaticSecret, StoreError> {
        Ok(self.server_keys()?.current)
    }

    /// Makes a new current knock key; the replaced one stays accepted for
    /// `overlap`, then is refused.
    fn rotate_server_key(&self, overlap: Duration) -> Result<ServerKeys, StoreError> {
        let rotated = self.server_keys()?.rotate(unix_now(), overlap.as_secs());
        self.put_server_keys(&rotated)?;
        Ok(rotated)
    }

    /// Enrolls a device. With a public key the device made its own key
    /// pair and the credential holds no secret; without one, the gateway
    /// makes the pair and the credential carries the secret to the device.
    /// Either way only the public half is kept here.
    fn add_client(&self, new: &NewClient) -> Result<(ClientRecord, Credential), StoreError> {
        if !valid_name(&new.name) {
            return Err(StoreError::Name {
                kind: "client",
                name: new.name.clone(),
            });
        }
        let existing = self.snapshot()?;
        if let Some(public) = &new.public_key
            && let Some(same) = existing.clients.iter().find(|c| c.public().as_ref() == Ok(public))
        {
            return Err(StoreError::KeyEnrolled(same.name.clone()));
        }
        let (public, secret) = match new.public_key {
            Some(public) => (public, None),
            None => {
                let secret = keys::generate();
                (PublicKey::from(&secret), Some(secret))
            }
        };
        let now = unix_now();
        let rec = ClientRecord {
            name: new.name.clone(),
            id: existing.clients.iter().map(|c| c.id).max().unwrap_or(0) + 1,
            public_key: keys::encode(public.as_bytes()),
            allow: new.allow.to_string(),
            enabled: true,
            nat: new.nat,
            expires: new.expires_in.map(|d| now + d.as_secs()),
            created: now,
            portal_upstream: new.portal_upstream.clone(),
            previous_public_key: None,
            previous_key_until: None,
            fwknop: new.fwknop.clone(),
            open_for: new.open_for.map(|d| d.as_secs().max(1)),
        };
        // Everything the credential needs is read before anything is written.
        let cred = self.credential(&new.name, secret.as_ref(), new.gateway.as_deref())?;
        self.put_client(&rec, Put::Create)?;
        Ok((rec, cred))
    }

    /// The credential of client `name`: with `secret` when the gateway
    /// made the key pair, naming the gateway as `gateway` or by the
    /// config's addresses.
    fn credential(
        &self,
        name: &str,
        secret: Option<&StaticSecret>,
        gateway: Option<&str>,
    ) -> Result<Credential, StoreError> {
        let config = self.config()?;
        let servers = match gateway {
            Some(host) => vec![host.to_string()],
            None => config.public_addrs().iter().map(ToString::to_string).collect(),
        };
        Ok(Credential {
            name: name.to_string(),
            secret_key: secret.map(|s| keys::encode(&s.to_bytes())),
            key_file: None,
            server_public_key: keys::encode(PublicKey::from(&self.server_secret()?).as_bytes()),
            servers,
            knock_port: config.knock_udp_port(),
            tunnel_port: Some(config.tunnel_port()),
            tls_fingerprint: Some(self.identity()?.pin().to_string()),
            knock_version: Some(2),
        })
    }

    /// Gives client `name` a new key pair made here, keeping its old key
    /// accepted until `until` (unix seconds; none: refused at once).
    /// Returns the credential with the new secret.
    fn rekey_client(&self, name: &str, until: Option<u64>) -> Result<Credential, StoreError> {
        let mut rec = self.client(name)?;
        let secret = keys::generate();
        rec.previous_public_key = until.map(|_| rec.public_key.clone());
        rec.previous_key_until = until;
        rec.public_key = keys::encode(PublicKey::from(&secret).as_bytes());
        self.put_client(&rec, Put::Replace)?;
        self.credential(name, Some(&secret), None)
    }

    /// Enables or disables (revokes) a client; touches no other record.
    fn set_client_enabled(&self, name: &str, enabled: bool) -> Result<ClientRecord, StoreError> {
        let mut rec = self.client(name)?;
        rec.enabled = enabled;
        self.put_client(&rec, Put::Replace)?;
        Ok(rec)
    }
}

/// What `gatekeeper client add` asks for.
#[derive(Clone, Debug)]
pub struct NewClient {
    pub name: String,
    pub allow: PortSet,
    pub expires_in: Option<Duration>,
    pub nat: bool,
    pub portal_upstream: Option<String>,
    /// The device's own public key (`gatekeeper keygen`); none: the
    /// gateway makes the key pair.
    pub public_key: Option<PublicKey>,
    /// How the device names the gateway (an address or a DNS name);
    /// none: the config's `public_addrs`.
    pub gateway: Option<String>,
    /// Keys for the stock fwknop client too (made by `client add
    /// --fwknop`, or read by `import fwknop`).
    pub fwknop: Option<FwknopKeys>,
    /// How long its knocks open the gate; none: `[knock] open_for`.
    pub open_for: Option<Duration>,
}

/// 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit
/// (so no record hides as a dot-file).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// A TOML error as one line: the line's number and text, and what is wrong.
pub(crate) fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let start = span.start.min(text.len());
    let number = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(number - 1).unwrap_or("").trim();
    let line: String = line.chars().take(60).collect();
    let message = e.message().lines().map(str::trim).collect::<Vec<_>>().join("; ");
    format!("line {number} ({line}): {message}")
}
