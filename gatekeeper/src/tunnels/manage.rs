//! What the operator does to tunnels: issue one (its record, an agent
//! credential and the token), pause and resume it, change who may use it,
//! re-issue its token, revoke it.

use std::{net::IpAddr, time::Duration};

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use super::{Token, TunnelError};
use crate::{
    clock::unix_now,
    hex,
    spec::{PortRange, PortSet, Proto},
    store::{NewClient, PreviousToken, Put, Store, StoreError, TunnelRecord, valid_name},
};

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    OsRng.fill_bytes(&mut b);
    b
}

/// What `gatekeeper tunnel issue` asks for.
#[derive(Clone, Debug)]
pub struct NewTunnel {
    pub name: String,
    pub owner: String,
    /// Enrolled clients that may knock for the published port.
    pub allow: Vec<String>,
    pub public_port: Option<u16>,
    pub expires_in: Option<Duration>,
    /// In a cluster: the nodes' own addresses, for the token.
    pub nodes: Vec<IpAddr>,
}

/// Issues a tunnel: its record, an agent credential, and the token.
pub fn issue(store: &dyn Store, new: &NewTunnel) -> Result<(TunnelRecord, Token), TunnelError> {
    if !valid_name(&new.name) {
        return Err(StoreError::Name {
            kind: "tunnel",
            name: new.name.clone(),
        }
        .into());
    }
    let existing = store.snapshot()?;
    if existing.tunnels.iter().any(|t| t.name == new.name) {
        return Err(StoreError::DuplicateTunnel(new.name.clone()).into());
    }
    if let Some(missing) = new.allow.iter().find(|a| existing.client(a).is_none()) {
        return Err(TunnelError::NoSuchClient(missing.clone()));
    }
    let config = store.config()?;
    let (tunnel_port, range) = (config.tunnel_port(), config.lease_range());
    let taken = |p: u16| existing.tunnels.iter().find(|t| t.public_port == p && !t.revoked);
    let public_port = match new.public_port {
        Some(p) => match taken(p) {
            Some(t) => return Err(TunnelError::PortTaken(p, t.name.clone())),
            None => p,
        },
        None => (range.lo..=range.hi)
            .find(|p| taken(*p).is_none())
            .ok_or(TunnelError::NoFreePort(range))?,
    };
    let fingerprint = store.identity()?.pin();
    let agent_client = format!("tunnel-{}", new.name);
    if existing.client(&agent_client).is_some() {
        return Err(StoreError::DuplicateClient(agent_client).into());
    }
    let secret = random_bytes(32);
    let rec = TunnelRecord {
        name: new.name.clone(),
        owner: new.owner.clone(),
        token_id: format!("t{}", hex::encode(&random_bytes(8))),
        secret_sha256: hex::encode(&Sha256::digest(&secret)),
        allow: new.allow.clone(),
        public_port,
        agent_client: agent_client.clone(),
        revoked: false,
        expires: new.expires_in.map(|d| unix_now() + d.as_secs()),
        created: unix_now(),
        paused: false,
        previous_token: None,
    };
    // The record goes in before the agent's credential. A daemon that reads
    // the state between the two writes then drops the agent's knock, which
    // the agent retries; the other order would have it refuse the token,
    // which the agent takes as final.
    store.put_tunnel(&rec, Put::Create)?;
    // Agents sit in private networks, usually behind NAT.
    let added = store.add_client(&NewClient {
        name: agent_client,
        allow: PortSet {
            ranges: vec![(
                Proto::Tcp,
                PortRange {
                    lo: tunnel_port,
                    hi: tunnel_port,
                },
            )],
            echo: false,
        },
        expires_in: new.expires_in,
        nat: true,
        portal_upstream: None,
        public_key: None,
        gateway: None,
        fwknop: None,
        open_for: None,
    });
    let credential = match added {
        Ok((_, credential)) => credential,
        Err(e) => {
            // Without its agent's credential the tunnel is of no use.
            let withdrawn = TunnelRecord {
                revoked: true,
                ..rec.clone()
            };
            let _ = store.put_tunnel(&withdrawn, Put::Replace);
            return Err(e.into());
        }
    };
    let token = Token {
        name: new.name.clone(),
        token_id: rec.token_id.clone(),
        secret: hex::encode(&secret),
        gateway: config.public_addrs(),
        nodes: new.nodes.clone(),
        tunnel_port,
        fingerprint: fingerprint.to_string(),
        credential,
    };
    Ok((rec, token))
}

/// Pauses a tunnel (its public port closes, its connections are cut, its
/// agent stays connected and keeps the port) or resumes it.
pub fn set_paused(store: &dyn Store, name: &str, paused: bool) -> Result<TunnelRecord, TunnelError> {
    let mut rec = store.tunnel(name)?;
    rec.paused = paused;
    store.put_tunnel(&rec, Put::Replace)?;
    Ok(rec)
}

/// Changes who may knock for a tunnel's port and who answers for it; a
/// running daemon applies it to knocks and connections from then on.
pub fn update(
    store: &dyn Store,
    name: &str,
    allow: Option<Vec<String>>,
    owner: Option<String>,
) -> Result<TunnelRecord, TunnelError> {
    let mut rec = store.tunnel(name)?;
    if let Some(allow) = allow {
        let existing = store.snapshot()?;
        if let Some(missing) = allow.iter().find(|a| existing.client(a).is_none()) {
            return Err(TunnelError::NoSuchClient(missing.clone()));
        }
        rec.allow = allow;
    }
    if let Some(owner) = owner {
        rec.owner = owner;
    }
    store.put_tunnel(&rec, Put::Replace)?;
    Ok(rec)
}

/// Gives a tunnel a new token: a new secret and a new knock key for its
/// agent. The old token (and its knock key) stay accepted for `overlap`,
/// then a session proved with it is ended.
pub fn reissue(
    store: &dyn Store,
    name: &str,
    overlap: Duration,
    nodes: &[IpAddr],
) -> Result<(TunnelRecord, Token), TunnelError> {
    let mut rec = store.tunnel(name)?;
    if !rec.live_at(unix_now()) {
        return Err(TunnelError::NotLive(name.to_string()));
    }
    let config = store.config()?;
    let fingerprint = store.identity()?.pin();
    let until = (!overlap.is_zero()).then(|| unix_now() + overlap.as_secs());
    let secret = random_bytes(32);
    rec.previous_token = until.map(|until| PreviousToken {
        token_id: rec.token_id.clone(),
        secret_sha256: rec.secret_sha256.clone(),
        until,
    });
    rec.token_id = format!("t{}", hex::encode(&random_bytes(8)));
    rec.secret_sha256 = hex::encode(&Sha256::digest(&secret));
    // The knock key first: a daemon reading in between sees the old token
    // and both keys, all of which work.
    let credential = store.rekey_client(&rec.agent_client, until)?;
    store.put_tunnel(&rec, Put::Replace)?;
    let token = Token {
        name: rec.name.clone(),
        token_id: rec.token_id.clone(),
        secret: hex::encode(&secret),
        gateway: config.public_addrs(),
        nodes: nodes.to_vec(),
        tunnel_port: config.tunnel_port(),
        fingerprint: fingerprint.to_string(),
        credential,
    };
    Ok((rec, token))
}

/// Revokes a tunnel and its agent's knock credential.
pub fn revoke(store: &dyn Store, name: &str) -> Result<TunnelRecord, TunnelError> {
    let mut rec = store.tunnel(name)?;
    rec.revoked = true;
    store.put_tunnel(&rec, Put::Replace)?;
    store.set_client_enabled(&rec.agent_client, false)?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::store::{config::DEFAULT_LEASE_RANGE, files::FileStore};

    fn store(tag: &str) -> (FileStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("gk-tunnels-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = FileStore::new(&dir);
        s.init(&["192.0.2.1".parse().unwrap()], false).unwrap();
        s.add_client(&NewClient {
            name: "laptop".into(),
            allow: "tcp/22".parse().unwrap(),
            expires_in: None,
            nat: false,
            portal_upstream: None,
            public_key: None,
            gateway: None,
            fwknop: None,
            open_for: None,
        })
        .unwrap();
        (s, dir)
    }

    fn new(name: &str, allow: &[&str], public_port: Option<u16>) -> NewTunnel {
        NewTunnel {
            name: name.into(),
            owner: "ops".into(),
            allow: allow.iter().map(ToString::to_string).collect(),
            public_port,
            expires_in: None,
            nodes: Vec::new(),
        }
    }

    /// A file store that records, at each client written, which tunnels a
    /// daemon reading the state at that moment would see.
    struct Watched {
        inner: FileStore,
        seen: std::sync::Mutex<Vec<(String, Vec<String>)>>,
    }

    impl Store for Watched {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn initialised(&self) -> bool {
            self.inner.initialised()
        }
        fn init(&self, addrs: &[IpAddr], force: bool) -> Result<x25519_dalek::PublicKey, StoreError> {
            self.inner.init(addrs, force)
        }
        fn server_keys(&self) -> Result<crate::knock::keys::ServerKeys, StoreError> {
            self.inner.server_keys()
        }
        fn put_server_keys(&self, keys: &crate::knock::keys::ServerKeys) -> Result<(), StoreError> {
            self.inner.put_server_keys(keys)
        }
        fn identity(&self) -> Result<tunnel::tls::Identity, StoreError> {
            self.inner.identity()
        }
        fn put_identity(&self, identity: &tunnel::tls::Identity) -> Result<(), StoreError> {
            self.inner.put_identity(identity)
        }
        fn config(&self) -> Result<crate::store::config::ConfigFile, StoreError> {
            self.inner.config()
        }
        fn version(&self) -> Result<crate::store::Version, StoreError> {
            self.inner.version()
        }
        fn snapshot(&self) -> Result<crate::store::Snapshot, StoreError> {
            self.inner.snapshot()
        }
        fn client(&self, name: &str) -> Result<crate::store::ClientRecord, StoreError> {
            self.inner.client(name)
        }
        fn put_client(&self, rec: &crate::store::ClientRecord, put: Put) -> Result<(), StoreError> {
            let tunnels = self.inner.snapshot()?.tunnels.into_iter().map(|t| t.name).collect();
            self.seen.lock().unwrap().push((rec.name.clone(), tunnels));
            self.inner.put_client(rec, put)
        }
        fn tunnel(&self, name: &str) -> Result<TunnelRecord, StoreError> {
            self.inner.tunnel(name)
        }
        fn put_tunnel(&self, rec: &TunnelRecord, put: Put) -> Result<(), StoreError> {
            self.inner.put_tunnel(rec, put)
        }
        fn relay(&self, name: &str) -> Result<crate::store::RelayRecord, StoreError> {
            self.inner.relay(name)
        }
        fn put_relay(&self, rec: &crate::store::RelayRecord, put: Put) -> Result<(), StoreError> {
            self.inner.put_relay(rec, put)
        }
    }

    #[test]
    fn an_agent_credential_is_never_in_the_state_before_its_tunnel() {
        let (inner, dir) = store("order");
        let watched = Watched {
            inner,
            seen: Default::default(),
        };
        issue(&watched, &new("web", &["laptop"], None)).unwrap();
        let seen = watched.seen.lock().unwrap().clone();
        assert_eq!(seen, vec![("tunnel-web".to_string(), vec!["web".to_string()])]);

        let s = &watched.inner;
        s.add_client(&NewClient {
            name: "tunnel-db".into(),
            allow: "tcp/22".parse().unwrap(),
            expires_in: None,
            nat: false,
            portal_upstream: None,
            public_key: None,
            gateway: None,
            fwknop: None,
            open_for: None,
        })
        .unwrap();
        let clash = issue(s, &new("db", &[], None)).unwrap_err();
        assert!(clash.to_string().contains("tunnel-db"), "{clash}");
        assert!(s.tunnel("db").is_err(), "a refused issue writes no tunnel");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_reissued_token_holds_for_its_overlap_and_the_agent_gets_a_new_key() {
        let (s, dir) = store("reissue");
        let (_, old) = issue(&s, &new("web", &[], None)).unwrap();
        let old_key = s.client("tunnel-web").unwrap().public_key;
        let before = unix_now();
        let (rec, fresh) = reissue(&s, "web", Duration::from_secs(60), &[]).unwrap();
        let now = unix_now();
        let (old_secret, new_secret) = (old.secret_bytes().unwrap(), fresh.secret_bytes().unwrap());
        assert!(rec.token_matches(&fresh.token_id, &new_secret, now));
        assert!(rec.token_matches(&old.token_id, &old_secret, now), "during the overlap");
        assert!(!rec.token_matches(&old.token_id, &old_secret, now + 60), "after it");
        assert!(
            !rec.token_matches(&old.token_id, &new_secret, now),
            "each token its own secret"
        );
        assert!(rec.accepts_token(&old.token_id, now) && !rec.accepts_token(&old.token_id, now + 60));
        let agent = s.client("tunnel-web").unwrap();
        assert_ne!(agent.public_key, old_key, "a new knock key");
        // The clock may tick between the reissue and reading it.
        let until = agent.previous_public(now).map(|(_, until)| until);
        assert!(
            until.is_some_and(|u| (before + 60..=now + 60).contains(&u)),
            "{until:?}"
        );
        assert!(agent.previous_public(now + 60).is_none());
        assert_ne!(fresh.credential.secret_key, old.credential.secret_key);

        let (rec, _) = reissue(&s, "web", Duration::ZERO, &[]).unwrap();
        assert!(rec.previous_token.is_none() && !rec.accepts_token(&fresh.token_id, now));
        assert!(s.client("tunnel-web").unwrap().previous_public(now).is_none());
        revoke(&s, "web").unwrap();
        assert!(matches!(
            reissue(&s, "web", Duration::ZERO, &[]),
            Err(TunnelError::NotLive(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn issue_leases_ports_keeps_only_a_hash_and_tokens_round_trip() {
        let (s, dir) = store("issue");
        let (rec, token) = issue(&s, &new("web", &["laptop"], None)).unwrap();
        assert_eq!(rec.public_port, DEFAULT_LEASE_RANGE.lo);
        let (rec2, _) = issue(&s, &new("db", &[], None)).unwrap();
        assert_eq!(rec2.public_port, DEFAULT_LEASE_RANGE.lo + 1, "the next free port");
        assert!(matches!(
            issue(&s, &new("x", &[], Some(rec.public_port))),
            Err(TunnelError::PortTaken(..))
        ));
        assert!(matches!(
            issue(&s, &new("y", &["nobody"], None)),
            Err(TunnelError::NoSuchClient(_))
        ));
        assert!(matches!(
            issue(&s, &new("web", &[], None)),
            Err(TunnelError::Store(StoreError::DuplicateTunnel(_)))
        ));

        let text = std::fs::read_to_string(dir.join("tunnels/web.toml")).unwrap();
        assert!(
            !text.contains(&token.secret),
            "the gateway stores only the secret's hash"
        );
        assert!(rec.token_matches(&token.token_id, &token.secret_bytes().unwrap(), unix_now()));
        assert!(!rec.token_matches(&token.token_id, b"guess", unix_now()));

        let back = Token::decode(&token.encode()).unwrap();
        assert_eq!(back, token);
        assert_eq!(
            back.fingerprint().unwrap(),
            s.identity().unwrap().pin(),
            "the pin matches the gateway's certificate"
        );
        assert!(Token::decode("gkt1.@@@").is_err());
        assert!(Token::decode("hello").unwrap_err().to_string().contains("gkt1."));

        let revoked = revoke(&s, "web").unwrap();
        assert!(revoked.revoked);
        assert!(
            !s.client("tunnel-web").unwrap().enabled,
            "its agent can no longer knock"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
