//! HTTP services published by agents that reach nothing but a Redis
//! server. Visitors reach a node's HTTP port; the node finds the agent by
//! `Host` and carries the request to it, and the response back, through
//! Redis pub/sub, sealed under session keys only that node and that agent
//! hold. Any node of the cluster serves any agent.
//!
//! - [`wire`]: the channels and what travels on them.
//! - [`session`]: the Noise KK handshake, sealing, replay windows, rotation.
//! - [`flow`]: bodies in chunks under credit, memory bounded per request.
//! - [`bus`]: publishing and subscribing, again after every loss.
//! - [`gateway`]: a node's side: the public port, the agents' sessions.
//! - [`agent`]: the private network's side.
//!
//! The gateway keeps each agent's public key in its [`RelayRecord`]; the
//! agent's credential, written once by [`issue`], holds its secret key,
//! the relay's public key (the cluster's server key) and the Redis URL.

pub mod agent;
pub mod bus;
pub mod flow;
pub mod gateway;
pub mod session;
pub mod wire;

use std::{path::Path, time::Duration};

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::{
    clock::unix_now,
    knock::keys::{self, KeyError},
    store::{Put, RelayRecord, Store, StoreError, cluster::ClusterStore, valid_host, valid_name},
};

#[derive(Debug, Error)]
pub enum RelayIssueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("bad host {0:?}: use a DNS name in lower case (letters, digits, '-', '.'), without a port")]
    Host(String),
    #[error("host {host} is already published by relay {relay:?}: revoke it first, or pick another host")]
    HostTaken { host: String, relay: String },
    #[error("no enrolled client named {0:?}: enroll it first with `gatekeeper client add`")]
    NoSuchClient(String),
}

#[derive(Debug, Error)]
pub enum CredentialError {
    #[error("reading the relay credential {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the relay credential {path} is not one `gatekeeper relay issue` wrote: {reason}")]
    Parse { path: String, reason: String },
}

/// What an agent needs, and all it gets: written 0600 by `relay issue`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayCredential {
    pub name: String,
    pub host: String,
    /// The agent's X25519 secret key.
    pub secret_key: String,
    /// The relay's (the cluster's server) public key.
    pub relay_public_key: String,
    /// The Redis the agent connects to, with its password if it has one.
    pub redis: String,
}

impl RelayCredential {
    pub fn load(path: &Path) -> Result<RelayCredential, CredentialError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
            path: shown.clone(),
            source,
        })?;
        let cred: RelayCredential = toml::from_str(&text).map_err(|e| CredentialError::Parse {
            path: shown.clone(),
            reason: e.message().to_string(),
        })?;
        if !valid_name(&cred.name) {
            return Err(CredentialError::Parse {
                path: shown,
                reason: format!("bad relay name {:?}", cred.name),
            });
        }
        cred.keys().map_err(|e| CredentialError::Parse {
            path: shown,
            reason: e.to_string(),
        })?;
        Ok(cred)
    }

    /// The agent's secret and the relay's public key.
    pub fn keys(&self) -> Result<(StaticSecret, PublicKey), KeyError> {
        Ok((
            keys::decode_secret(&self.secret_key)?,
            keys::decode_public(&self.relay_public_key)?,
        ))
    }

    /// The file the agent's operator installs: a warning, then the fields.
    pub fn to_file_text(&self) -> String {
        format!(
            "# Gatekeeper relay credential for {:?} ({}). It holds the agent's secret key and the Redis password: keep it private (mode 0600).\n{}",
            self.name,
            self.host,
            // Plain strings: always serializable.
            toml::to_string(self).expect("a relay credential serializes to TOML")
        )
    }
}

/// What `gatekeeper relay issue` asks for.
#[derive(Clone, Debug)]
pub struct NewRelay {
    pub name: String,
    pub host: String,
    pub owner: String,
    pub allow: Vec<String>,
    pub expires_in: Option<Duration>,
    /// The Redis URL written into the credential.
    pub redis: String,
    /// Make the agent a Redis user of its own, limited to its channels,
    /// and put it (with a fresh password) into the credential's URL.
    pub redis_user: bool,
}

/// Creates the agent's key pair (and, if asked, its Redis user), keeps
/// the public half in a new record, and returns the record and the
/// agent's credential.
pub fn issue(store: &ClusterStore, new: &NewRelay) -> Result<(RelayRecord, RelayCredential), RelayIssueError> {
    if !valid_name(&new.name) {
        return Err(StoreError::Name {
            kind: "relay",
            name: new.name.clone(),
        }
        .into());
    }
    let host = new.host.trim_end_matches('.').to_ascii_lowercase();
    if !valid_host(&host) {
        return Err(RelayIssueError::Host(new.host.clone()));
    }
    let existing = store.snapshot()?;
    if existing.relays.iter().any(|r| r.name == new.name) {
        return Err(StoreError::DuplicateRelay(new.name.clone()).into());
    }
    if let Some(r) = existing.relays.iter().find(|r| r.host == host && r.live_at(unix_now())) {
        return Err(RelayIssueError::HostTaken {
            host,
            relay: r.name.clone(),
        });
    }
    if let Some(missing) = new.allow.iter().find(|a| existing.client(a).is_none()) {
        return Err(RelayIssueError::NoSuchClient(missing.clone()));
    }
    let relay = PublicKey::from(&store.server_secret()?);
    let secret = keys::generate();
    let now = unix_now();
    let (redis, redis_user, redis_password_sha256) = if new.redis_user {
        let user = format!("gatekeeper-relay-{}", new.name);
        let mut password = [0u8; 24];
        OsRng.fill_bytes(&mut password);
        let password = crate::hex::encode(&password);
        let sha = crate::hex::encode(&Sha256::digest(password.as_bytes()));
        store.set_relay_user(&user, &sha, &new.name)?;
        (with_user(&new.redis, &user, &password), Some(user), Some(sha))
    } else {
        (new.redis.clone(), None, None)
    };
    let rec = RelayRecord {
        name: new.name.clone(),
        host: host.clone(),
        owner: new.owner.clone(),
        public_key: keys::encode(PublicKey::from(&secret).as_bytes()),
        allow: new.allow.clone(),
        revoked: false,
        expires: new.expires_in.map(|d| now + d.as_secs()),
        created: now,
        redis_user,
        redis_password_sha256,
    };
    store.put_relay(&rec, Put::Create)?;
    let cred = RelayCredential {
        name: new.name.clone(),
        host,
        secret_key: keys::encode(&secret.to_bytes()),
        relay_public_key: keys::encode(relay.as_bytes()),
        redis,
    };
    Ok((rec, cred))
}

/// `url` (`SCHEME://[USER:PASS@]REST`) with `user` and `password` instead
/// of whatever credentials it had.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{scheme}://{user}:{password}@{rest}")
}

/// Marks a relay revoked; the nodes close its sessions and tell its agent.
pub fn revoke(store: &dyn Store, name: &str) -> Result<RelayRecord, StoreError> {
    let mut rec = store.relay(name)?;
    rec.revoked = true;
    store.put_relay(&rec, Put::Replace)?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::with_user;

    #[test]
    fn an_agents_user_replaces_the_urls_credentials() {
        for (url, want) in [
            ("redis://10.0.0.5:6379/2", "redis://a:pw@10.0.0.5:6379/2"),
            ("redis://gk:secret@10.0.0.5:6379", "redis://a:pw@10.0.0.5:6379"),
            (
                "rediss+sentinel://:s@10.0.0.1,10.0.0.2/gk/1",
                "rediss+sentinel://a:pw@10.0.0.1,10.0.0.2/gk/1",
            ),
        ] {
            assert_eq!(with_user(url, "a", "pw"), want);
        }
    }
}
