//! Published services: the gateway's tunnel records and the tokens it
//! issues for them. A token carries everything an agent needs (where and
//! how to knock, the certificate fingerprint to pin, the tunnel secret);
//! the gateway keeps only a hash of the secret.
//!
//! ```text
//! STATE_DIR/tunnel.crt, tunnel.key    the gateway's TLS identity (0600)
//! STATE_DIR/tunnels/NAME.toml         one record per tunnel (0600)
//! ```

pub mod agent;
pub mod service;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tunnel::tls::{Fingerprint, Identity, TlsError};

use crate::{
    spec::{PortRange, PortSet, Proto},
    state::{self, Credential, StateDir, StateError, unix_now, write_private},
};

/// Where agents dial in by default.
pub const DEFAULT_TUNNEL_PORT: u16 = 7443;
/// Published ports are leased from here by default.
pub const DEFAULT_LEASE_RANGE: PortRange = PortRange { lo: 20000, hi: 20999 };
const TOKEN_PREFIX: &str = "gkt1.";

#[derive(Debug, Error)]
pub enum TunnelError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("a tunnel named {0:?} exists already: pick another name or revoke it first")]
    Duplicate(String),
    #[error("no tunnel named {0:?}: see `gatekeeper tunnel list`")]
    NoSuchTunnel(String),
    #[error("no enrolled client named {0:?}: enroll it first with `gatekeeper client add`")]
    NoSuchClient(String),
    #[error("port {0} is already published by tunnel {1:?}")]
    PortTaken(u16, String),
    #[error("every port in {0} is leased: widen [tunnel] ports in gatekeeper.toml")]
    NoFreePort(PortRange),
    #[error("bad token: {0}. A token starts with {TOKEN_PREFIX}; copy it whole from `gatekeeper tunnel issue`")]
    BadToken(String),
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
}

impl TunnelRecord {
    /// Whether `secret` is this tunnel's secret.
    pub fn secret_matches(&self, secret: &[u8]) -> bool {
        let digest = hex(&Sha256::digest(secret));
        // Both sides are fixed-length hex of a hash: compare without an early exit.
        digest.len() == self.secret_sha256.len()
            && digest
                .bytes()
                .zip(self.secret_sha256.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    pub fn live_at(&self, unix_now: u64) -> bool {
        !self.revoked && self.expires.is_none_or(|e| unix_now < e)
    }
}

/// What `gatekeeper tunnel issue` prints, for the agent's operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub name: String,
    pub token_id: String,
    /// Hex.
    pub secret: String,
    pub gateway: Vec<IpAddr>,
    pub tunnel_port: u16,
    /// SHA-256 of the gateway's certificate, hex.
    pub fingerprint: String,
    /// The agent's own knock credential.
    pub credential: Credential,
}

impl Token {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn decode(text: &str) -> Result<Token, TunnelError> {
        let body = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| TunnelError::BadToken("the prefix is missing".into()))?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TunnelError::BadToken(format!("not base64url ({e})")))?;
        serde_json::from_slice(&json).map_err(|e| TunnelError::BadToken(format!("not a v1 token ({e})")))
    }

    pub fn fingerprint(&self) -> Result<Fingerprint, TunnelError> {
        Ok(self.fingerprint.parse()?)
    }

    pub fn secret_bytes(&self) -> Result<Vec<u8>, TunnelError> {
        unhex(&self.secret).ok_or_else(|| TunnelError::BadToken("the secret is not hex".into()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    OsRng.fill_bytes(&mut b);
    hex(&b)
}

/// The tunnel parts of a state directory.
pub struct Tunnels<'a> {
    state: &'a StateDir,
}

impl<'a> Tunnels<'a> {
    pub fn new(state: &'a StateDir) -> Tunnels<'a> {
        Tunnels { state }
    }

    fn dir(&self) -> PathBuf {
        self.state.root().join("tunnels")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir().join(format!("{name}.toml"))
    }

    /// The port agents dial and the range leases come from (gatekeeper.toml `[tunnel]`).
    pub fn ports(&self) -> Result<(u16, PortRange), TunnelError> {
        let t = self.state.addresses()?.tunnel;
        Ok((
            t.port.unwrap_or(DEFAULT_TUNNEL_PORT),
            t.ports.unwrap_or(DEFAULT_LEASE_RANGE),
        ))
    }

    /// The gateway's TLS identity, created on first use.
    pub fn identity(&self) -> Result<Identity, TunnelError> {
        let (crt, key) = (
            self.state.root().join("tunnel.crt"),
            self.state.root().join("tunnel.key"),
        );
        if crt.exists() && key.exists() {
            return Ok(Identity::from_pem(&state::read(&crt)?, &state::read(&key)?)?);
        }
        let mut names: Vec<String> = self
            .state
            .addresses()?
            .public_addrs
            .iter()
            .map(ToString::to_string)
            .collect();
        names.push("gatekeeper".into());
        let id = Identity::generate(&names)?;
        let (c, k) = id.to_pem();
        write_private(&key, k)?;
        write_private(&crt, c)?;
        Ok(id)
    }

    pub fn list(&self) -> Result<Vec<TunnelRecord>, TunnelError> {
        let dir = self.dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateError::Io { path: dir, source }.into()),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let rec = toml::from_str(&state::read(&path)?).map_err(|e| StateError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                out.push(rec);
            }
        }
        out.sort_by(|a: &TunnelRecord, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn save(&self, rec: &TunnelRecord) -> Result<(), TunnelError> {
        std::fs::create_dir_all(self.dir()).map_err(|source| StateError::Io {
            path: self.dir(),
            source,
        })?;
        let text = toml::to_string(rec).map_err(|e| StateError::Invalid {
            path: self.path(&rec.name),
            reason: e.to_string(),
        })?;
        Ok(write_private(&self.path(&rec.name), &text)?)
    }

    /// Issues a tunnel: its record, an agent credential, and the token.
    pub fn issue(
        &self,
        name: &str,
        owner: &str,
        allow: &[String],
        public_port: Option<u16>,
        expires_in: Option<Duration>,
    ) -> Result<(TunnelRecord, Token), TunnelError> {
        if !state::valid_name(name) {
            return Err(StateError::Name(name.to_string()).into());
        }
        let existing = self.list()?;
        if existing.iter().any(|t| t.name == name) {
            return Err(TunnelError::Duplicate(name.to_string()));
        }
        let clients = self.state.clients()?;
        if let Some(missing) = allow.iter().find(|a| !clients.iter().any(|c| &&c.name == a)) {
            return Err(TunnelError::NoSuchClient(missing.clone()));
        }
        let (tunnel_port, range) = self.ports()?;
        let taken = |p: u16| existing.iter().find(|t| t.public_port == p && !t.revoked);
        let public_port = match public_port {
            Some(p) => match taken(p) {
                Some(t) => return Err(TunnelError::PortTaken(p, t.name.clone())),
                None => p,
            },
            None => (range.lo..=range.hi)
                .find(|p| taken(*p).is_none())
                .ok_or(TunnelError::NoFreePort(range))?,
        };
        let identity = self.identity()?;
        // Agents sit in private networks, usually behind NAT.
        let agent_client = format!("tunnel-{name}");
        let agent_policy = PortSet {
            ranges: vec![(
                Proto::Tcp,
                PortRange {
                    lo: tunnel_port,
                    hi: tunnel_port,
                },
            )],
            echo: false,
        };
        let (_, credential) = self
            .state
            .add_client(&agent_client, &agent_policy, expires_in, true, None)?;
        let secret = random_hex(32);
        let rec = TunnelRecord {
            name: name.to_string(),
            owner: owner.to_string(),
            token_id: format!("t{}", random_hex(8)),
            secret_sha256: hex(&Sha256::digest(unhex(&secret).unwrap_or_default())),
            allow: allow.to_vec(),
            public_port,
            agent_client,
            revoked: false,
            expires: expires_in.map(|d| unix_now() + d.as_secs()),
            created: unix_now(),
        };
        self.save(&rec)?;
        let token = Token {
            name: name.to_string(),
            token_id: rec.token_id.clone(),
            secret,
            gateway: credential.servers.clone(),
            tunnel_port,
            fingerprint: identity.fingerprint().to_string(),
            credential,
        };
        Ok((rec, token))
    }

    /// Revokes a tunnel and its agent's knock credential.
    pub fn revoke(&self, name: &str) -> Result<TunnelRecord, TunnelError> {
        let mut rec = self
            .list()?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| TunnelError::NoSuchTunnel(name.to_string()))?;
        rec.revoked = true;
        self.save(&rec)?;
        self.state.set_enabled(&rec.agent_client, false)?;
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(tag: &str) -> (StateDir, PathBuf) {
        let dir = std::env::temp_dir().join(format!("gk-tunnels-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = StateDir::new(&dir);
        s.init(&["192.0.2.1".parse().unwrap()], false).unwrap();
        s.add_client("laptop", &"tcp/22".parse().unwrap(), None, false, None)
            .unwrap();
        (s, dir)
    }

    #[test]
    fn issue_leases_ports_keeps_only_a_hash_and_tokens_round_trip() {
        let (s, dir) = state("issue");
        let t = Tunnels::new(&s);
        let (rec, token) = t.issue("web", "ops", &["laptop".into()], None, None).unwrap();
        assert_eq!(rec.public_port, DEFAULT_LEASE_RANGE.lo);
        let (rec2, _) = t.issue("db", "ops", &[], None, None).unwrap();
        assert_eq!(rec2.public_port, DEFAULT_LEASE_RANGE.lo + 1, "the next free port");
        assert!(matches!(
            t.issue("x", "ops", &[], Some(rec.public_port), None),
            Err(TunnelError::PortTaken(..))
        ));
        assert!(matches!(
            t.issue("y", "ops", &["nobody".into()], None, None),
            Err(TunnelError::NoSuchClient(_))
        ));
        assert!(matches!(
            t.issue("web", "ops", &[], None, None),
            Err(TunnelError::Duplicate(_))
        ));

        let text = std::fs::read_to_string(dir.join("tunnels/web.toml")).unwrap();
        assert!(
            !text.contains(&token.secret),
            "the gateway stores only the secret's hash"
        );
        assert!(rec.secret_matches(&token.secret_bytes().unwrap()));
        assert!(!rec.secret_matches(b"guess"));

        let back = Token::decode(&token.encode()).unwrap();
        assert_eq!(back, token);
        assert_eq!(
            back.fingerprint().unwrap(),
            t.identity().unwrap().fingerprint(),
            "the pin matches the gateway's certificate"
        );
        assert!(Token::decode("gkt1.@@@").is_err());
        assert!(Token::decode("hello").unwrap_err().to_string().contains("gkt1."));

        let revoked = t.revoke("web").unwrap();
        assert!(revoked.revoked);
        assert!(
            !s.clients()
                .unwrap()
                .iter()
                .find(|c| c.name == "tunnel-web")
                .unwrap()
                .enabled,
            "its agent can no longer knock"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
