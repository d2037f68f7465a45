//! The gateway's state directory (default `/var/lib/gatekeeper`):
//!
//! ```text
//! server.key          the gateway's X25519 secret (0600, base64)
//! gatekeeper.toml     daemon config; `gatekeeper init` writes a starter
//! clients/NAME.toml   one enrolled device: public key and policy (0600)
//! audit.log           one JSON line per knock
//! ```
//!
//! The gateway keeps only each client's public key; the client's secret goes
//! into the credential file handed to the device, and nowhere else.

use std::{
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::{
    config::DEFAULT_KNOCK_UDP_PORT,
    knock::keys::{self, KeyError},
    spec::PortSet,
};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/gatekeeper";
const SERVER_KEY: &str = "server.key";
pub const CONFIG_FILE: &str = "gatekeeper.toml";
const CLIENTS: &str = "clients";
pub const AUDIT_LOG: &str = "audit.log";

#[derive(Debug, Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} already exists: pass --force to replace the server key (every enrolled client then needs a new credential)"
    )]
    Exists { path: PathBuf },
    #[error("no server key in {0}: run `gatekeeper init --state-dir {0} --public-addr ADDR` first")]
    NotInitialised(PathBuf),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("bad client name {0:?}: use 1-64 letters, digits, '.', '-' or '_'")]
    Name(String),
    #[error("a client named {0:?} is already enrolled: pick another name, one per device")]
    Duplicate(String),
    #[error("no client named {0:?}: see `gatekeeper client list`")]
    NoSuchClient(String),
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
}

impl ClientRecord {
    pub fn policy(&self) -> Result<PortSet, String> {
        self.allow.parse().map_err(|e: crate::spec::SpecError| e.to_string())
    }

    pub fn expired_at(&self, unix_now: u64) -> bool {
        self.expires.is_some_and(|e| unix_now >= e)
    }
}

/// What a device imports: its secret and how to reach the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub name: String,
    pub secret_key: String,
    pub server_public_key: String,
    pub servers: Vec<IpAddr>,
    pub knock_port: u16,
    /// SHA-256 of the gateway's TLS certificate, which the portal presents
    /// unless the operator configured another one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
}

impl Credential {
    pub fn load(path: &Path) -> Result<Credential, StateError> {
        let text = read(path)?;
        toml::from_str(&text).map_err(|e| StateError::Invalid {
            path: path.into(),
            reason: e.to_string(),
        })
    }
}

/// The parts of `gatekeeper.toml` the state itself needs.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Addresses {
    #[serde(default)]
    pub(crate) public_addrs: Vec<IpAddr>,
    #[serde(default)]
    knock: KnockPort,
    #[serde(default)]
    pub(crate) tunnel: TunnelPorts,
}

#[derive(Debug, Default, Deserialize)]
struct KnockPort {
    udp_port: Option<u16>,
}

/// `[tunnel]` in gatekeeper.toml: where agents dial in, and the range
/// published ports are leased from.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct TunnelPorts {
    pub(crate) port: Option<u16>,
    #[serde(default, deserialize_with = "crate::config::de_parse")]
    pub(crate) ports: Option<crate::spec::PortRange>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn read(path: &Path) -> Result<String, StateError> {
    std::fs::read_to_string(path).map_err(|source| StateError::Io {
        path: path.into(),
        source,
    })
}

/// Writes `text` to `path` with mode 0600, through a temporary file and a
/// rename, so a crash leaves the old file or the new one, never half.
pub fn write_private(path: &Path, text: &str) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let io = |source| StateError::Io {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path) -> StateDir {
        StateDir {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn clients_dir(&self) -> PathBuf {
        self.root.join(CLIENTS)
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    pub fn audit_path(&self) -> PathBuf {
        self.root.join(AUDIT_LOG)
    }

    /// Creates the server key and a starter config. Refuses to replace an
    /// existing key unless `force`.
    pub fn init(&self, public_addrs: &[IpAddr], force: bool) -> Result<PublicKey, StateError> {
        let key_path = self.root.join(SERVER_KEY);
        if key_path.exists() && !force {
            return Err(StateError::Exists { path: key_path });
        }
        for dir in [self.root.clone(), self.clients_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
                path: dir.clone(),
                source,
            })?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
                StateError::Io {
                    path: dir.clone(),
                    source,
                }
            })?;
        }
        let secret = keys::generate();
        write_private(&key_path, &format!("{}\n", keys::encode(&secret.to_bytes())))?;
        let config = self.config_path();
        if !config.exists() || force {
            let addrs: Vec<String> = public_addrs.iter().map(|a| format!("\"{a}\"")).collect();
            write_private(
                &config,
                &format!(
                    "# Gatekeeper daemon config (keys: gatekeeper/config.example.toml).\n\
                 # `gatekeeper run --state-dir {dir}` reads this file.\n\n\
                 # The addresses clients knock on; a knock naming another address is refused.\n\
                 public_addrs = [{addrs}]\n\n\
                 # protect = \"tcp/22\"\n\
                 # iface = \"eth0\"\n\n\
                 [knock]\n\
                 # udp_port = {DEFAULT_KNOCK_UDP_PORT}\n\
                 # window = \"120s\"\n\
                 # open_for = \"30s\"\n",
                    dir = self.root.display(),
                    addrs = addrs.join(", "),
                ),
            )?;
        }
        Ok(PublicKey::from(&secret))
    }

    /// Whether `gatekeeper init` has run here.
    pub fn initialised(&self) -> bool {
        self.root.join(SERVER_KEY).exists()
    }

    pub fn server_secret(&self) -> Result<StaticSecret, StateError> {
        let path = self.root.join(SERVER_KEY);
        if !path.exists() {
            return Err(StateError::NotInitialised(self.root.clone()));
        }
        let text = read(&path)?;
        keys::decode_secret(&text).map_err(|e: KeyError| StateError::Invalid {
            path,
            reason: e.to_string(),
        })
    }

    pub(crate) fn addresses(&self) -> Result<Addresses, StateError> {
        let path = self.config_path();
        if !path.exists() {
            return Ok(Addresses::default());
        }
        toml::from_str(&read(&path)?).map_err(|e| StateError::Invalid {
            path,
            reason: e.to_string(),
        })
    }

    /// The addresses clients knock on, from `gatekeeper.toml`.
    pub fn public_addrs(&self) -> Result<Vec<IpAddr>, StateError> {
        Ok(self.addresses()?.public_addrs)
    }

    /// Every enrolled client, in name order.
    pub fn clients(&self) -> Result<Vec<ClientRecord>, StateError> {
        let dir = self.clients_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateError::Io { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| StateError::Io {
                    path: dir.clone(),
                    source,
                })?
                .path();
            if path.extension().is_some_and(|e| e == "toml") {
                let rec: ClientRecord = toml::from_str(&read(&path)?).map_err(|e| StateError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                out.push(rec);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn client_path(&self, name: &str) -> PathBuf {
        self.clients_dir().join(format!("{name}.toml"))
    }

    fn save(&self, rec: &ClientRecord) -> Result<(), StateError> {
        let text = toml::to_string(rec).map_err(|e| StateError::Invalid {
            path: self.client_path(&rec.name),
            reason: e.to_string(),
        })?;
        write_private(&self.client_path(&rec.name), &text)
    }

    /// Enrolls a device: a new key pair, the public half and the policy kept
    /// here, the whole credential returned for the device.
    pub fn add_client(
        &self,
        name: &str,
        allow: &PortSet,
        expires_in: Option<Duration>,
        nat: bool,
        portal_upstream: Option<String>,
    ) -> Result<(ClientRecord, Credential), StateError> {
        if !valid_name(name) {
            return Err(StateError::Name(name.to_string()));
        }
        let server = PublicKey::from(&self.server_secret()?);
        let existing = self.clients()?;
        if existing.iter().any(|c| c.name == name) {
            return Err(StateError::Duplicate(name.to_string()));
        }
        let secret = keys::generate();
        let now = unix_now();
        let rec = ClientRecord {
            name: name.to_string(),
            id: existing.iter().map(|c| c.id).max().unwrap_or(0) + 1,
            public_key: keys::encode(PublicKey::from(&secret).as_bytes()),
            allow: allow.to_string(),
            enabled: true,
            nat,
            expires: expires_in.map(|d| now + d.as_secs()),
            created: now,
            portal_upstream,
        };
        self.save(&rec)?;
        let addrs = self.addresses()?;
        let cred = Credential {
            name: name.to_string(),
            secret_key: keys::encode(&secret.to_bytes()),
            server_public_key: keys::encode(server.as_bytes()),
            servers: addrs.public_addrs,
            knock_port: addrs.knock.udp_port.unwrap_or(DEFAULT_KNOCK_UDP_PORT),
            tls_fingerprint: None,
        };
        Ok((rec, cred))
    }

    /// Enables or disables (revokes) a client.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<ClientRecord, StateError> {
        let mut rec = self
            .clients()?
            .into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| StateError::NoSuchClient(name.to_string()))?;
        rec.enabled = enabled;
        self.save(&rec)?;
        Ok(rec)
    }
}
