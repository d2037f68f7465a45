//! `channels.toml`: the device's credentials, where its audit goes, and
//! its named channels. Every key is documented in
//! `gatekeeper/channels.example.toml`; a file with an unknown key, a
//! duplicate name or a channel that could not work is refused whole, with
//! the channel and key named.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use thiserror::Error;

use super::policy::Policy;
use crate::store::config::{
    AuditSettings, DEFAULT_AUDIT_KEEP, DEFAULT_AUDIT_MAX_BYTES, DEFAULT_AUDIT_REFUSALS_PER_SEC,
};

#[derive(Debug, Error)]
pub enum ChannelConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("channel {channel:?}: {why}")]
    Invalid { channel: String, why: String },
    #[error("{0}")]
    File(String),
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    credentials: PathBuf,
    audit: Option<PathBuf>,
    #[serde(default)]
    outbound: Vec<OutboundFile>,
    #[serde(default)]
    inbound: Vec<InboundFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundFile {
    name: String,
    listen: Option<SocketAddr>,
    capture: Option<String>,
    peer: String,
    connect: SocketAddr,
    policy: Policy,
    knock: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundFile {
    name: String,
    listen: SocketAddr,
    backend: SocketAddr,
    policy: Policy,
    peers: Vec<String>,
    #[serde(default)]
    source: Source,
}

/// What an outbound channel takes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A local virtual service applications connect to.
    Listen(SocketAddr),
    /// Connections that applications open to this destination (TCP),
    /// caught on their way out.
    Capture(SocketAddr),
}

/// Where a device's applications connect; the channel carries them to a peer.
#[derive(Clone, Debug)]
pub struct Outbound {
    pub name: String,
    pub entry: Entry,
    /// The paired peer whose certificates are pinned.
    pub peer: String,
    /// The peer's inbound channel.
    pub connect: SocketAddr,
    pub policy: Policy,
    /// A client credential to knock with when the peer sits behind a gate.
    pub knock: Option<PathBuf>,
}

/// Whose address the backend sees as the connection's source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// This device's own (a plain connection).
    #[default]
    Channel,
    /// The original client's: the connection is made from its address
    /// (IP_TRANSPARENT); the backend must listen on loopback.
    Client,
    /// The channel's own, with a PROXY protocol v2 header naming the
    /// original client first, for backends that read it.
    ProxyV2,
}

/// Where peers' channels arrive; connections go on to the backend.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub name: String,
    pub listen: SocketAddr,
    pub backend: SocketAddr,
    pub policy: Policy,
    /// Paired peers allowed to connect.
    pub peers: Vec<String>,
    pub source: Source,
}

#[derive(Clone, Debug)]
pub struct Channels {
    pub credentials: PathBuf,
    pub audit: AuditSettings,
    pub outbound: Vec<Outbound>,
    pub inbound: Vec<Inbound>,
}

impl Channels {
    pub fn load(path: &Path) -> Result<Channels, ChannelConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ChannelConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Channels::parse(&text, base).map_err(|e| match e {
            ChannelConfigError::File(reason) => ChannelConfigError::Parse {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// Parses a config whose relative paths are relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Channels, ChannelConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ChannelConfigError::File(e.message().to_string()))?;
        if file.outbound.is_empty() && file.inbound.is_empty() {
            return Err(ChannelConfigError::File(
                "no channels: add an [[outbound]] or [[inbound]] table (see channels.example.toml)".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        let names_of = file
            .outbound
            .iter()
            .map(|o| &o.name)
            .chain(file.inbound.iter().map(|i| &i.name));
        for name in names_of {
            if !names.insert(name.as_str()) {
                return Err(ChannelConfigError::File(format!("two channels are named {name:?}")));
            }
        }
        let outbound: Vec<Outbound> = file
            .outbound
            .into_iter()
            .map(|o| outbound(o, base))
            .collect::<Result<_, _>>()?;
        for o in &outbound {
            if let Some(looped) = outbound.iter().find(|other| o.entry == Entry::Capture(other.connect)) {
                return Err(invalid(
                    &o.name,
                    format!(
                        "`capture` is channel {:?}'s own peer address {}: its connections would be captured into themselves",
                        looped.name, looped.connect
                    ),
                ));
            }
        }
        let inbound = file.inbound.into_iter().map(inbound).collect::<Result<_, _>>()?;
        let credentials = base.join(file.credentials);
        Ok(Channels {
            audit: AuditSettings {
                path: file
                    .audit
                    .map(|p| base.join(p))
                    .unwrap_or_else(|| credentials.join("audit.log")),
                max_bytes: DEFAULT_AUDIT_MAX_BYTES,
                keep: DEFAULT_AUDIT_KEEP,
                refusals_per_sec: DEFAULT_AUDIT_REFUSALS_PER_SEC,
            },
            credentials,
            outbound,
            inbound,
        })
    }
}

fn invalid(channel: &str, why: impl Into<String>) -> ChannelConfigError {
    ChannelConfigError::Invalid {
        channel: channel.to_string(),
        why: why.into(),
    }
}

fn outbound(o: OutboundFile, base: &Path) -> Result<Outbound, ChannelConfigError> {
    let entry = match (o.listen, o.capture) {
        (Some(addr), None) => Entry::Listen(addr),
        (None, Some(spec)) => Entry::Capture(capture(&o.name, &spec)?),
        _ => {
            return Err(invalid(
                &o.name,
                "set exactly one of `listen` (a local service, ADDR:PORT) and `capture` (IP:PORT/tcp)",
            ));
        }
    };
    Ok(Outbound {
        entry,
        peer: o.peer,
        connect: o.connect,
        policy: o.policy,
        knock: o.knock.map(|k| base.join(k)),
        name: o.name,
    })
}

/// `IP:PORT/tcp`, the destination whose connections are captured.
fn capture(channel: &str, spec: &str) -> Result<SocketAddr, ChannelConfigError> {
    let bad = |why: &str| invalid(channel, format!("`capture` = {spec:?}: {why}"));
    let (addr, proto) = spec.rsplit_once('/').ok_or_else(|| bad("expected IP:PORT/tcp"))?;
    if !proto.eq_ignore_ascii_case("tcp") {
        return Err(bad("only tcp connections are captured"));
    }
    let addr: SocketAddr = addr.parse().map_err(|_| bad("expected IP:PORT/tcp"))?;
    if !addr.is_ipv4() || addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(bad("name one IPv4 address and port"));
    }
    Ok(addr)
}

fn inbound(i: InboundFile) -> Result<Inbound, ChannelConfigError> {
    if i.peers.is_empty() {
        return Err(invalid(
            &i.name,
            "`peers` is empty: name the paired peers allowed in (`gatekeeper channel pair`)",
        ));
    }
    if i.source == Source::Client && !i.backend.ip().is_loopback() {
        return Err(invalid(
            &i.name,
            format!(
                "`source = \"client\"` needs the backend on loopback (127.0.0.1:{}), where its replies can be routed back to the channel",
                i.backend.port()
            ),
        ));
    }
    if i.source == Source::Client && !matches!(i.backend.ip(), IpAddr::V4(_)) {
        return Err(invalid(&i.name, "`source = \"client\"` is IPv4 only"));
    }
    Ok(Inbound {
        name: i.name,
        listen: i.listen,
        backend: i.backend,
        policy: i.policy,
        peers: i.peers,
        source: i.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Channels, ChannelConfigError> {
        Channels::parse(text, Path::new("/etc/gk"))
    }

    const GOOD: &str = r#"
        credentials = "channel"
        [[outbound]]
        name = "ssh"
        capture = "10.0.0.2:22/tcp"
        peer = "beta"
        connect = "10.0.0.2:7443"
        policy = "sm"
        [[inbound]]
        name = "sync"
        listen = "0.0.0.0:7443"
        backend = "127.0.0.1:22"
        policy = "tls13-aes"
        peers = ["alpha"]
        source = "client"
    "#;

    #[test]
    fn a_full_config_resolves_paths_and_entries() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.credentials, Path::new("/etc/gk/channel"));
        assert_eq!(c.audit.path, Path::new("/etc/gk/channel/audit.log"));
        assert_eq!(c.outbound[0].entry, Entry::Capture("10.0.0.2:22".parse().unwrap()));
        assert_eq!(c.outbound[0].policy, Policy::Sm);
        assert_eq!(c.inbound[0].source, Source::Client);
        assert_eq!(c.inbound[0].policy, Policy::Tls13Aes);
    }

    #[test]
    fn broken_configs_name_the_channel_and_the_fix() {
        let cases = [
            (
                GOOD.replace("capture = \"10.0.0.2:22/tcp\"", ""),
                "exactly one of `listen`",
            ),
            (GOOD.replace("22/tcp", "22/udp"), "only tcp"),
            (GOOD.replace("10.0.0.2:22/tcp", "10.0.0.2/tcp"), "expected IP:PORT/tcp"),
            (GOOD.replace("\"sm\"", "\"des\""), "unknown variant `des`"),
            (GOOD.replace("peers = [\"alpha\"]", "peers = []"), "`peers` is empty"),
            (
                GOOD.replace("backend = \"127.0.0.1:22\"", "backend = \"10.0.0.9:22\""),
                "loopback",
            ),
            (
                GOOD.replace("name = \"sync\"", "name = \"ssh\""),
                "two channels are named \"ssh\"",
            ),
            (
                GOOD.replace("policy = \"sm\"", "policy = \"sm\"\ncolour = 1"),
                "unknown field `colour`",
            ),
            ("credentials = \"c\"".to_string(), "no channels"),
            (
                GOOD.replace("10.0.0.2:22/tcp", "10.0.0.2:7443/tcp"),
                "captured into themselves",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(expected), "{e:?} lacks {expected:?}");
        }
    }
}
