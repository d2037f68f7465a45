//! The config file's one schema ([`ConfigFile`], every key documented in
//! `gatekeeper/config.example.toml`) and the daemon's settings resolved
//! from it: built-in defaults, then the state's config, then `--config`,
//! then flags.
//!
//! Some keys also go into what the gateway hands out: `public_addrs` and
//! `knock.udp_port` into credentials, `tunnel.port` and `tunnel.ports` into
//! tunnel tokens. Those are read from the state's config alone; a
//! `--config` file that sets one of them differently is refused, so the
//! daemon never listens where its credentials do not point.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use gatekeeper_common::maps::{
    CFG_ANY_TCP, CFG_ANY_UDP, CFG_FWKNOP, CFG_KNOCK_KEYS, CFG_PROTECT_ECHO, Config, MODE_AUDIT, MODE_ENFORCE,
};
use serde::Deserialize;
use thiserror::Error;
use tunnel::record::Rekey;

use crate::gate::loader::XdpModeChoice;
use crate::spec::{self, PortRange, PortSet, Proto, SpecError};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("`{key}` is not set: {hint}")]
    Missing { key: &'static str, hint: &'static str },
    #[error("`{key}` = {value}: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: String,
    },
    #[error(transparent)]
    Disagrees(Box<Disagreement>),
}

/// A `--config` file sets a key that credentials and tokens carry to
/// something else than the state's config.
#[derive(Debug, Error)]
#[error(
    "`{key}` is {given} in {file} but {shared} in {state} ({hint}): set it in {state} only, so the daemon listens where credentials and tokens point"
)]
pub struct Disagreement {
    key: &'static str,
    file: PathBuf,
    given: String,
    state: String,
    shared: String,
    hint: &'static str,
}

/// Enforce drops; audit passes what enforce would drop, counts and samples it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// Which interfaces the gate spans: the ones listed, or also every other
/// that receives traffic for the host (found at start and as they appear).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Cover {
    #[default]
    Listed,
    All,
}

/// `iface = "eth0"` or `iface = ["eth0", "eth1"]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Values that came from the command line; they win over the files.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub ifaces: Option<Vec<String>>,
    pub gate: Option<String>,
    pub cover: Option<Cover>,
    pub pin_dir: Option<PathBuf>,
    pub protect: Option<PortSet>,
    pub xdp_mode: Option<XdpModeChoice>,
    pub mode: Option<Mode>,
    pub idle_timeout: Option<Duration>,
    pub portal: PortalOverrides,
    /// `--cluster`, `--node`.
    pub cluster: Option<String>,
    pub node: Option<String>,
    pub advertise: Option<IpAddr>,
    /// `--relay-http`.
    pub relay_listen: Option<SocketAddr>,
    /// `--metrics`.
    pub metrics_listen: Option<SocketAddr>,
}

/// The `--portal*` flags.
#[derive(Clone, Debug, Default)]
pub struct PortalOverrides {
    pub listen: Option<SocketAddr>,
    pub upstream: Option<String>,
    pub guidance: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The config file, as written. Every key is optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    public_addrs: Option<Vec<IpAddr>>,
    #[serde(default, deserialize_with = "de_server_name")]
    server_name: Option<String>,
    iface: Option<OneOrMany>,
    gate: Option<String>,
    cover: Option<Cover>,
    pin_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_parse")]
    protect: Option<PortSet>,
    xdp_mode: Option<XdpModeChoice>,
    mode: Option<Mode>,
    #[serde(default, deserialize_with = "de_duration")]
    idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    sweep_interval: Option<Duration>,
    whitelist_capacity: Option<u32>,
    #[serde(default)]
    knock: KnockSection,
    #[serde(default)]
    audit: AuditSection,
    #[serde(default)]
    tunnel: TunnelSection,
    #[serde(default)]
    portal: PortalSection,
    #[serde(default)]
    cluster: ClusterSection,
    #[serde(default)]
    relay: RelaySection,
    #[serde(default)]
    metrics: MetricsSection,
}

/// `[metrics]`: where Prometheus scrapes the daemon.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: Option<SocketAddr>,
}

/// `[relay]`: HTTP services agents publish through the cluster's Redis.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelaySection {
    listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de_duration")]
    response_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    rotate_after: Option<Duration>,
    #[serde(default, deserialize_with = "de_size")]
    rotate_bytes: Option<u64>,
    rotate_messages: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    grace: Option<Duration>,
}

/// `[cluster]`: where the records several gateways share live, and this
/// node's name among them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    url: Option<String>,
    node: Option<String>,
    when_unreachable: Option<WhenUnreachable>,
    advertise: Option<IpAddr>,
}

/// What a cluster node does with a knock it accepted while the cluster's
/// Redis does not answer: decide alone, with its own replay cache, and
/// open only itself (`local`), or refuse it (`refuse`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenUnreachable {
    #[default]
    Local,
    Refuse,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KnockSection {
    udp_port: Option<u16>,
    fwknop_tcp: Option<bool>,
    rate: Option<u32>,
    burst: Option<u32>,
    key_rate: Option<u32>,
    key_burst: Option<u32>,
    budget: Option<u32>,
    #[serde(default, deserialize_with = "de_duration")]
    window: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    open_for: Option<Duration>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditSection {
    sample_every: Option<u32>,
    path: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_size")]
    max_size: Option<u64>,
    keep: Option<u32>,
    refusals_per_sec: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelSection {
    port: Option<u16>,
    #[serde(default, deserialize_with = "de_parse")]
    ports: Option<PortRange>,
    #[serde(default, deserialize_with = "de_duration")]
    heartbeat: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    rekey_after: Option<Duration>,
    #[serde(default, deserialize_with = "de_size")]
    rekey_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    idle_timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortalSection {
    listen: Option<SocketAddr>,
    upstream: Option<String>,
    guidance: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    sessions_per_source: Option<u32>,
    new_sessions_per_sec: Option<u32>,
    #[serde(default, deserialize_with = "de_duration")]
    handshake_timeout: Option<Duration>,
    /// Client downloads the guidance page links to: platform -> URL.
    downloads: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "de_duration")]
    hsts: Option<Duration>,
    acme: Option<AcmeSection>,
}

/// `[portal.acme]`: the portal's certificate from an ACME CA.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcmeSection {
    directory: Option<String>,
    contact: Option<String>,
    domains: Option<Vec<String>>,
    trust: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_duration")]
    renew_before: Option<Duration>,
}

fn de_parse<'de, D: serde::Deserializer<'de>, T: std::str::FromStr<Err = SpecError>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    spec::duration(&s).map(Some).map_err(serde::de::Error::custom)
}

/// A DNS name for the gateway's certificate; addresses go in public_addrs.
fn de_server_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    if rustls::pki_types::DnsName::try_from(s.as_str()).is_ok() {
        return Ok(Some(s));
    }
    Err(serde::de::Error::custom(format!(
        "`{s}` is not a DNS name: write the name clients reach the gateway by, e.g. server_name = \"gw.example.org\" (addresses go in public_addrs)"
    )))
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    spec::size(&s).map(Some).map_err(serde::de::Error::custom)
}

/// The audit trail's file in the state directory, unless `[audit] path`
/// puts it elsewhere.
pub const AUDIT_LOG: &str = "audit.log";
/// fwknop's default SPA port, so existing firewall holes keep working.
pub const DEFAULT_KNOCK_UDP_PORT: u16 = 62201;
/// Published ports are leased from here by default.
pub const DEFAULT_LEASE_RANGE: PortRange = PortRange { lo: 20000, hi: 20999 };

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        ConfigFile::parse(&text, &path.display().to_string())
    }

    /// The config in `text`, read from `place` (for messages).
    pub fn parse(text: &str, place: &str) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: place.into(),
            reason: super::toml_error(text, &e),
        })
    }

    /// A starter config: the public addresses, and the commonest keys
    /// commented out. `read_by` says which command reads it.
    pub fn starter(public_addrs: &[IpAddr], read_by: &str) -> String {
        let addrs: Vec<String> = public_addrs.iter().map(|a| format!("\"{a}\"")).collect();
        format!(
            "# Gatekeeper config (every key: gatekeeper/config.example.toml).\n\
             # `{read_by}` reads it, and credentials and\n\
             # tunnel tokens are issued from it.\n\n\
             # The addresses clients knock on; a knock naming another address is refused.\n\
             public_addrs = [{addrs}]\n\n\
             # protect = \"tcp/22\"\n\
             # iface = \"eth0\"\n\n\
             [knock]\n\
             # udp_port = {DEFAULT_KNOCK_UDP_PORT}\n\
             # window = \"120s\"\n\
             # open_for = \"30s\"\n",
            addrs = addrs.join(", "),
        )
    }

    /// The addresses clients knock on (written into credentials).
    pub fn public_addrs(&self) -> Vec<IpAddr> {
        self.public_addrs.clone().unwrap_or_default()
    }

    /// What the gateway's own certificate names, subject first: the
    /// `server_name`, then the public addresses (the host name when there
    /// are neither), like any server's certificate.
    pub fn certificate_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.server_name.iter().cloned().collect();
        names.extend(self.public_addrs().iter().map(ToString::to_string));
        if names.is_empty() {
            names.push(host_name());
        }
        names
    }

    /// `[cluster] url`: the Redis server of the cluster this gateway is in.
    /// Where the audit trail is written for the state in `state_dir`.
    pub fn audit_path(&self, state_dir: &Path) -> PathBuf {
        self.audit.path.clone().unwrap_or_else(|| state_dir.join(AUDIT_LOG))
    }

    pub fn cluster_url(&self) -> Option<&str> {
        self.cluster.url.as_deref()
    }

    /// The UDP knock port (written into credentials).
    pub fn knock_udp_port(&self) -> u16 {
        self.knock.udp_port.unwrap_or(DEFAULT_KNOCK_UDP_PORT)
    }

    /// Where agents dial in (written into tunnel tokens).
    pub fn tunnel_port(&self) -> u16 {
        self.tunnel.port.unwrap_or(crate::tunnels::DEFAULT_TUNNEL_PORT)
    }

    /// The range published ports are leased from.
    pub fn lease_range(&self) -> PortRange {
        self.tunnel.ports.unwrap_or(DEFAULT_LEASE_RANGE)
    }

    /// The keys that go into what the gateway hands out, as text to compare.
    fn shared(&self) -> [(&'static str, String, bool, &'static str); 4] {
        let addrs: Vec<String> = self.public_addrs().iter().map(ToString::to_string).collect();
        [
            (
                "public_addrs",
                format!("[{}]", addrs.join(", ")),
                self.public_addrs.is_some(),
                "credentials name these addresses",
            ),
            (
                "knock.udp_port",
                self.knock_udp_port().to_string(),
                self.knock.udp_port.is_some(),
                "credentials knock on this port",
            ),
            (
                "tunnel.port",
                self.tunnel_port().to_string(),
                self.tunnel.port.is_some(),
                "tunnel tokens dial this port",
            ),
            (
                "tunnel.ports",
                self.lease_range().to_string(),
                self.tunnel.ports.is_some(),
                "published ports are leased from this range",
            ),
        ]
    }
}

/// The portal's settings, when it is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalSettings {
    pub listen: SocketAddr,
    /// Default upstream, `HOST:PORT`; a client record may name its own.
    pub upstream: String,
    /// Folder of the guidance page; `None`: the built-in page.
    pub guidance: Option<PathBuf>,
    /// Where the portal's certificate comes from.
    pub certificate: PortalCertificate,
    /// `Strict-Transport-Security` max-age on the guidance page; none: no
    /// header (browsers would then refuse a self-signed certificate).
    pub hsts: Option<Duration>,
    /// Sessions one source (an IPv4 address, an IPv6 /64) may hold at once.
    pub sessions_per_source: u32,
    /// New sessions one source may open per second (twice that in a burst).
    pub new_sessions_per_sec: u32,
    /// From accepting a connection to a finished TLS handshake.
    pub handshake_timeout: Duration,
    /// Client downloads the guidance page links to, by platform.
    pub downloads: Vec<Download>,
}

/// Where the portal's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortalCertificate {
    /// The gateway's own, which credentials pin.
    Gateway,
    /// An operator's certificate (chain) and key, PEM; made there if absent.
    Files { cert: PathBuf, key: PathBuf },
    /// Obtained and renewed from an ACME CA.
    Acme(AcmeSettings),
}

/// `[portal.acme]`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcmeSettings {
    /// The CA's directory URL.
    pub directory: String,
    /// `mailto:` address the CA writes to about the account.
    pub contact: Option<String>,
    /// The names the certificate is for; the first is its subject.
    pub domains: Vec<String>,
    /// A root to trust for the directory's own HTTPS (a private CA);
    /// none: the system's roots.
    pub trust: Option<PathBuf>,
    /// Renew this long before expiry; none: a third of the lifetime ahead.
    pub renew_before: Option<Duration>,
}

/// One client download the guidance page offers (`[portal.downloads]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Download {
    /// What the link says: `Windows`, `Debian (amd64)`...
    pub platform: String,
    /// An http(s) URL with nothing HTML would read as markup.
    pub url: String,
}

impl Download {
    fn parse(platform: &str, url: &str) -> Result<Download, ConfigError> {
        let entry = || format!("{platform} = {url:?}");
        let label_ok = !platform.is_empty()
            && platform.len() <= 40
            && platform
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || " ._-()+".contains(c));
        if !label_ok {
            return Err(invalid(
                "portal.downloads",
                entry(),
                "name a platform in 1-40 letters, digits, spaces or . _ - ( ) +",
            ));
        }
        let scheme = url.starts_with("https://") || url.starts_with("http://");
        if !scheme || url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || "\"'<>`".contains(c)) {
            return Err(invalid(
                "portal.downloads",
                entry(),
                "use an http:// or https:// URL (at most 2048 characters, no spaces, quotes or angle brackets)",
            ));
        }
        Ok(Download {
            platform: platform.to_string(),
            url: url.to_string(),
        })
    }
}

/// Where the audit trail goes and how much of it is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSettings {
    pub path: PathBuf,
    /// Rotate once the file is this large.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` is the newest).
    pub keep: u32,
    /// Refusals from unproven sources written one line each, per second;
    /// beyond that they are counted into one summary line a second.
    pub refusals_per_sec: u32,
}

/// Resolved settings of one daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The interfaces listed, first one first; at least one.
    pub ifaces: Vec<String>,
    /// The gate's name (its pin directory's): the first interface's, unless given.
    pub gate: String,
    pub cover: Cover,
    pub pin_dir: PathBuf,
    pub protect: PortSet,
    pub xdp_mode: XdpModeChoice,
    pub mode: Mode,
    pub idle_timeout: Duration,
    pub sweep_interval: Duration,
    pub whitelist_capacity: u32,
    /// 0: knocks only on protected ports.
    pub knock_udp_port: u16,
    /// Listen on TCP at the knock port for fwknop's `-P tcp`.
    pub fwknop_tcp: bool,
    /// Per-source knock bucket in the XDP program.
    pub knock_rate: u32,
    pub knock_burst: u32,
    /// Per-key knock bucket in the XDP program.
    pub knock_key_rate: u32,
    pub knock_key_burst: u32,
    /// Knocks per second each CPU passes to the daemon, whatever their source.
    pub knock_budget: u32,
    /// A knock's timestamp may be this far from now, either way.
    pub knock_window: Duration,
    /// How long an accepted knock opens its tuple for new connections.
    pub knock_open_for: Duration,
    pub audit_sample_every: u32,
    pub audit: AuditSettings,
    /// Keys, enrolled clients and the config.
    pub state_dir: PathBuf,
    /// Addresses clients may knock on; empty: the address each knock was sent to.
    pub public_addrs: Vec<IpAddr>,
    /// Where agents dial in (TLS), behind the gate.
    pub tunnel_port: u16,
    /// Published ports are leased from this range.
    pub tunnel_ports: PortRange,
    /// An agent silent for this long is dropped and its port closed.
    pub tunnel_heartbeat: Duration,
    /// When each direction of an agent's session refreshes its traffic key.
    pub tunnel_rekey: Rekey,
    /// An agent's session unused this long is closed (the agent reconnects).
    pub tunnel_idle_timeout: Option<Duration>,
    pub portal: Option<PortalSettings>,
    /// The cluster this gateway is a node of; none: it runs alone.
    pub cluster: Option<ClusterSettings>,
    /// The relay's public HTTP side; none: not served here.
    pub relay: Option<RelaySettings>,
    /// Where `/metrics` is served (`[metrics] listen`, `--metrics`).
    pub metrics_listen: Option<SocketAddr>,
}

/// How a node serves relayed hosts and keeps their sessions fresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySettings {
    pub listen: SocketAddr,
    /// A relayed request whose response has not begun by then gets 504.
    pub response_timeout: Duration,
    /// Session keys are replaced after this long, this many bytes or this
    /// many messages, whichever comes first.
    pub rotate_after: Duration,
    pub rotate_bytes: u64,
    pub rotate_messages: u64,
    /// How long a replaced session still opens what was sealed under it.
    pub grace: Duration,
}

/// A node's place in a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `redis://`, `rediss://` or `redis+sentinel://` (see `RedisTarget`).
    pub url: String,
    /// This node's name among the others (default: the host name).
    pub node: String,
    pub when_unreachable: WhenUnreachable,
    /// This node's own address, where agents and knocks reach it and no
    /// other node: tunnel tokens issued in the cluster name every node's,
    /// so an agent keeps a session to each.
    pub advertise: Option<IpAddr>,
}

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_WHITELIST_CAPACITY: u32 = 65536;
pub const DEFAULT_KNOCK_RATE: u32 = 20;
pub const DEFAULT_KNOCK_BURST: u32 = 40;
pub const DEFAULT_KNOCK_KEY_RATE: u32 = 10;
pub const DEFAULT_KNOCK_KEY_BURST: u32 = 20;
pub const DEFAULT_KNOCK_BUDGET: u32 = 2000;
pub const DEFAULT_AUDIT_SAMPLE_EVERY: u32 = 64;
pub const DEFAULT_KNOCK_WINDOW: Duration = Duration::from_secs(120);
pub const DEFAULT_KNOCK_OPEN_FOR: Duration = Duration::from_secs(30);
pub const DEFAULT_TUNNEL_HEARTBEAT: Duration = Duration::from_secs(30);
pub const DEFAULT_AUDIT_MAX_BYTES: u64 = 100 << 20;
pub const DEFAULT_AUDIT_KEEP: u32 = 5;
pub const DEFAULT_AUDIT_REFUSALS_PER_SEC: u32 = 50;
pub const DEFAULT_PORTAL_SESSIONS_PER_SOURCE: u32 = 32;
pub const DEFAULT_PORTAL_NEW_SESSIONS_PER_SEC: u32 = 20;
pub const DEFAULT_PORTAL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_RELAY_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RELAY_ROTATE_AFTER: Duration = Duration::from_secs(300);
pub const DEFAULT_RELAY_ROTATE_BYTES: u64 = 1 << 30;
pub const DEFAULT_RELAY_ROTATE_MESSAGES: u64 = 1 << 20;
pub const DEFAULT_RELAY_GRACE: Duration = Duration::from_secs(30);

/// The state's own config, where it has been initialised.
pub struct StateConfig<'a> {
    /// For messages: the file, or where the store lives.
    pub location: &'a str,
    pub file: &'a ConfigFile,
}

impl Settings {
    /// Defaults, then the state's config, then each of `local` (a
    /// cluster node's own gatekeeper.toml, `--config`) in order, then
    /// `cli`. Keys that credentials and tokens carry must agree with the
    /// state's config.
    pub fn resolve(
        state_dir: &Path,
        state: Option<StateConfig<'_>>,
        local: &[&Path],
        cli: Overrides,
    ) -> Result<Settings, ConfigError> {
        let mut f = state.as_ref().map(|s| s.file.clone()).unwrap_or_default();
        for path in local {
            let extra = ConfigFile::load(path)?;
            if let Some(state) = &state {
                for ((key, given, set, _), (_, shared, _, hint)) in extra.shared().into_iter().zip(state.file.shared())
                {
                    if set && given != shared {
                        return Err(ConfigError::Disagrees(Box::new(Disagreement {
                            key,
                            file: path.to_path_buf(),
                            given,
                            state: state.location.to_string(),
                            shared,
                            hint,
                        })));
                    }
                }
            }
            f = merge(f, extra);
        }
        let ifaces = cli
            .ifaces
            .or(f.iface.clone().map(OneOrMany::list))
            .filter(|l| !l.is_empty())
            .ok_or(ConfigError::Missing {
                key: "iface",
                hint: "pass --iface IFACE[,IFACE...] or set `iface` in the config file",
            })?;
        let mut seen = std::collections::BTreeSet::new();
        for i in &ifaces {
            if i.is_empty() || i.len() > 15 || i.contains(['/', ' ', ',']) || i == "." || i == ".." {
                return Err(invalid(
                    "iface",
                    i,
                    "an interface name has 1-15 characters, none of them '/', ',' or a space",
                ));
            }
            if !seen.insert(i) {
                return Err(invalid("iface", i, "listed twice"));
            }
        }
        let gate = cli.gate.or(f.gate.clone()).unwrap_or_else(|| ifaces[0].clone());
        if !super::valid_name(&gate) {
            return Err(invalid("gate", &gate, "use 1-64 letters, digits, '.', '-' or '_'"));
        }
        let protect = cli.protect.or(f.protect.clone()).ok_or(ConfigError::Missing {
            key: "protect",
            hint: "pass --protect (for example tcp/22,udp/53 or all) or set `protect` in the config file",
        })?;
        let pin_dir = cli
            .pin_dir
            .or(f.pin_dir.clone())
            .unwrap_or_else(|| crate::gate::pins::dir_for_gate(&gate));
        let whitelist_capacity = f.whitelist_capacity.unwrap_or(DEFAULT_WHITELIST_CAPACITY);
        if !(1024..=1 << 24).contains(&whitelist_capacity) {
            return Err(invalid(
                "whitelist_capacity",
                whitelist_capacity,
                "use a number from 1024 to 16777216",
            ));
        }
        let positive = |key: &'static str, v: Option<u32>, default: u32| -> Result<u32, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(invalid(key, 0, "use at least 1")),
                n => Ok(n),
            }
        };
        let audit = AuditSettings {
            path: f.audit_path(state_dir),
            max_bytes: f.audit.max_size.unwrap_or(DEFAULT_AUDIT_MAX_BYTES),
            keep: f.audit.keep.unwrap_or(DEFAULT_AUDIT_KEEP),
            refusals_per_sec: f.audit.refusals_per_sec.unwrap_or(DEFAULT_AUDIT_REFUSALS_PER_SEC),
        };
        let cluster = match cli.cluster.or(f.cluster.url.clone()) {
            Some(url) => {
                let node = cli.node.or(f.cluster.node.clone()).unwrap_or_else(host_name);
                if !super::valid_name(&node) {
                    return Err(invalid(
                        "cluster.node",
                        &node,
                        "use 1-64 letters, digits, '.', '-' or '_'",
                    ));
                }
                Some(ClusterSettings {
                    url,
                    node,
                    when_unreachable: f.cluster.when_unreachable.unwrap_or_default(),
                    advertise: cli.advertise.or(f.cluster.advertise),
                })
            }
            None => None,
        };
        let fwknop_tcp = f.knock.fwknop_tcp.unwrap_or(false);
        if fwknop_tcp && f.knock_udp_port() == 0 {
            return Err(invalid(
                "knock.fwknop_tcp",
                true,
                "fwknop's `-P tcp` connects to the knock port: set `knock.udp_port` too (62201 is fwknop's)",
            ));
        }
        let relay = match cli.relay_listen.or(f.relay.listen) {
            Some(listen) if cluster.is_none() => {
                return Err(invalid(
                    "relay.listen",
                    listen,
                    "the relay carries requests through the cluster's Redis: pass --cluster URL too (one gateway is a cluster of one)",
                ));
            }
            Some(listen) => Some(RelaySettings {
                listen,
                response_timeout: f.relay.response_timeout.unwrap_or(DEFAULT_RELAY_RESPONSE_TIMEOUT),
                rotate_after: f.relay.rotate_after.unwrap_or(DEFAULT_RELAY_ROTATE_AFTER),
                rotate_bytes: f.relay.rotate_bytes.unwrap_or(DEFAULT_RELAY_ROTATE_BYTES),
                rotate_messages: match f.relay.rotate_messages.unwrap_or(DEFAULT_RELAY_ROTATE_MESSAGES) {
                    0 => return Err(invalid("relay.rotate_messages", 0, "use at least 1")),
                    n => n,
                },
                grace: f.relay.grace.unwrap_or(DEFAULT_RELAY_GRACE),
            }),
            None => None,
        };
        Ok(Settings {
            cluster,
            relay,
            portal: portal_settings(cli.portal, &f.portal)?,
            ifaces,
            gate,
            cover: cli.cover.or(f.cover).unwrap_or_default(),
            pin_dir,
            protect,
            xdp_mode: cli.xdp_mode.or(f.xdp_mode).unwrap_or_default(),
            mode: cli.mode.or(f.mode).unwrap_or_default(),
            idle_timeout: cli.idle_timeout.or(f.idle_timeout).unwrap_or(DEFAULT_IDLE_TIMEOUT),
            sweep_interval: f.sweep_interval.unwrap_or(DEFAULT_SWEEP_INTERVAL),
            whitelist_capacity,
            knock_udp_port: f.knock_udp_port(),
            fwknop_tcp,
            knock_rate: positive("knock.rate", f.knock.rate, DEFAULT_KNOCK_RATE)?,
            knock_burst: positive("knock.burst", f.knock.burst, DEFAULT_KNOCK_BURST)?,
            knock_key_rate: positive("knock.key_rate", f.knock.key_rate, DEFAULT_KNOCK_KEY_RATE)?,
            knock_key_burst: positive("knock.key_burst", f.knock.key_burst, DEFAULT_KNOCK_KEY_BURST)?,
            knock_budget: positive("knock.budget", f.knock.budget, DEFAULT_KNOCK_BUDGET)?,
            knock_window: f.knock.window.unwrap_or(DEFAULT_KNOCK_WINDOW),
            knock_open_for: f.knock.open_for.unwrap_or(DEFAULT_KNOCK_OPEN_FOR),
            audit_sample_every: f.audit.sample_every.unwrap_or(DEFAULT_AUDIT_SAMPLE_EVERY),
            audit,
            state_dir: state_dir.to_path_buf(),
            public_addrs: f.public_addrs(),
            tunnel_port: f.tunnel_port(),
            tunnel_ports: f.lease_range(),
            tunnel_heartbeat: f.tunnel.heartbeat.unwrap_or(DEFAULT_TUNNEL_HEARTBEAT),
            tunnel_rekey: Rekey {
                bytes: f.tunnel.rekey_bytes.unwrap_or(Rekey::default().bytes),
                after: f.tunnel.rekey_after.unwrap_or(Rekey::default().after),
            },
            tunnel_idle_timeout: f.tunnel.idle_timeout,
            metrics_listen: cli.metrics_listen.or(f.metrics.listen),
        })
    }

    /// The CONFIG map entry for these settings, with the host's ephemeral
    /// port range (see [`ephemeral_ports`]). `knock_keys`: the daemon
    /// verifies knocks and keeps the map of enrolled key ids, so the XDP
    /// program may drop knocks whose key id is not in it. `fwknop`: some
    /// client knocks with fwknop, so its packets on the knock port are
    /// handed over.
    pub fn map_config(&self, ephemeral: (u16, u16), knock_keys: bool, fwknop: bool) -> Config {
        let mut flags = 0;
        if self.protect.echo {
            flags |= CFG_PROTECT_ECHO;
        }
        if self.protect.ranges.iter().any(|(p, _)| *p == Proto::Tcp) {
            flags |= CFG_ANY_TCP;
        }
        if self.protect.ranges.iter().any(|(p, _)| *p == Proto::Udp) || self.knock_udp_port != 0 {
            flags |= CFG_ANY_UDP;
        }
        if knock_keys {
            flags |= CFG_KNOCK_KEYS;
        }
        if fwknop && self.knock_udp_port != 0 {
            flags |= CFG_FWKNOP;
        }
        Config {
            mode: match self.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            },
            flags,
            idle_timeout_ns: self.idle_timeout.as_nanos().min(u64::MAX as u128) as u64,
            knock_rate_per_sec: self.knock_rate,
            knock_burst: self.knock_burst,
            ephemeral_lo: ephemeral.0,
            ephemeral_hi: ephemeral.1,
            knock_udp_port: self.knock_udp_port,
            _pad: 0,
            audit_sample_every: self.audit_sample_every,
            knock_key_rate_per_sec: self.knock_key_rate,
            knock_key_burst: self.knock_key_burst,
            knock_budget_per_sec: self.knock_budget,
            // A second's worth: the budget absorbs a burst of real knocks.
            knock_budget_burst: self.knock_budget,
            _pad2: 0,
        }
    }
}

/// This host's name, the default name of a cluster node.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "node".to_string(),
    }
}

/// `over`'s keys where it sets them, `base`'s elsewhere, section by section.
fn merge(base: ConfigFile, over: ConfigFile) -> ConfigFile {
    fn pick<T>(over: Option<T>, base: Option<T>) -> Option<T> {
        over.or(base)
    }
    ConfigFile {
        public_addrs: pick(over.public_addrs, base.public_addrs),
        server_name: pick(over.server_name, base.server_name),
        iface: pick(over.iface, base.iface),
        gate: pick(over.gate, base.gate),
        cover: pick(over.cover, base.cover),
        pin_dir: pick(over.pin_dir, base.pin_dir),
        protect: pick(over.protect, base.protect),
        xdp_mode: pick(over.xdp_mode, base.xdp_mode),
        mode: pick(over.mode, base.mode),
        idle_timeout: pick(over.idle_timeout, base.idle_timeout),
        sweep_interval: pick(over.sweep_interval, base.sweep_interval),
        whitelist_capacity: pick(over.whitelist_capacity, base.whitelist_capacity),
        knock: KnockSection {
            udp_port: pick(over.knock.udp_port, base.knock.udp_port),
            fwknop_tcp: pick(over.knock.fwknop_tcp, base.knock.fwknop_tcp),
            rate: pick(over.knock.rate, base.knock.rate),
            burst: pick(over.knock.burst, base.knock.burst),
            key_rate: pick(over.knock.key_rate, base.knock.key_rate),
            key_burst: pick(over.knock.key_burst, base.knock.key_burst),
            budget: pick(over.knock.budget, base.knock.budget),
            window: pick(over.knock.window, base.knock.window),
            open_for: pick(over.knock.open_for, base.knock.open_for),
        },
        audit: AuditSection {
            sample_every: pick(over.audit.sample_every, base.audit.sample_every),
            path: pick(over.audit.path, base.audit.path),
            max_size: pick(over.audit.max_size, base.audit.max_size),
            keep: pick(over.audit.keep, base.audit.keep),
            refusals_per_sec: pick(over.audit.refusals_per_sec, base.audit.refusals_per_sec),
        },
        tunnel: TunnelSection {
            port: pick(over.tunnel.port, base.tunnel.port),
            ports: pick(over.tunnel.ports, base.tunnel.ports),
            heartbeat: pick(over.tunnel.heartbeat, base.tunnel.heartbeat),
            rekey_after: pick(over.tunnel.rekey_after, base.tunnel.rekey_after),
            rekey_bytes: pick(over.tunnel.rekey_bytes, base.tunnel.rekey_bytes),
            idle_timeout: pick(over.tunnel.idle_timeout, base.tunnel.idle_timeout),
        },
        portal: PortalSection {
            listen: pick(over.portal.listen, base.portal.listen),
            upstream: pick(over.portal.upstream, base.portal.upstream),
            guidance: pick(over.portal.guidance, base.portal.guidance),
            cert: pick(over.portal.cert, base.portal.cert),
            key: pick(over.portal.key, base.portal.key),
            sessions_per_source: pick(over.portal.sessions_per_source, base.portal.sessions_per_source),
            new_sessions_per_sec: pick(over.portal.new_sessions_per_sec, base.portal.new_sessions_per_sec),
            handshake_timeout: pick(over.portal.handshake_timeout, base.portal.handshake_timeout),
            downloads: pick(over.portal.downloads, base.portal.downloads),
            hsts: pick(over.portal.hsts, base.portal.hsts),
            acme: pick(over.portal.acme, base.portal.acme),
        },
        cluster: ClusterSection {
            url: pick(over.cluster.url, base.cluster.url),
            node: pick(over.cluster.node, base.cluster.node),
            when_unreachable: pick(over.cluster.when_unreachable, base.cluster.when_unreachable),
            advertise: pick(over.cluster.advertise, base.cluster.advertise),
        },
        relay: RelaySection {
            listen: pick(over.relay.listen, base.relay.listen),
            response_timeout: pick(over.relay.response_timeout, base.relay.response_timeout),
            rotate_after: pick(over.relay.rotate_after, base.relay.rotate_after),
            rotate_bytes: pick(over.relay.rotate_bytes, base.relay.rotate_bytes),
            rotate_messages: pick(over.relay.rotate_messages, base.relay.rotate_messages),
            grace: pick(over.relay.grace, base.relay.grace),
        },
        metrics: MetricsSection {
            listen: pick(over.metrics.listen, base.metrics.listen),
        },
    }
}

fn portal_settings(cli: PortalOverrides, f: &PortalSection) -> Result<Option<PortalSettings>, ConfigError> {
    let Some(listen) = cli.listen.or(f.listen) else {
        return Ok(None);
    };
    let upstream = cli.upstream.or(f.upstream.clone()).ok_or(ConfigError::Missing {
        key: "portal.upstream",
        hint: "the portal needs somewhere to send authorized sessions: pass --portal-upstream HOST:PORT or set `upstream` in [portal]",
    })?;
    let upstream = spec::upstream(&upstream).map_err(|e| invalid("portal.upstream", &upstream, &e.to_string()))?;
    let certificate = match (cli.cert.or(f.cert.clone()), cli.key.or(f.key.clone())) {
        (Some(cert), Some(key)) => match &f.acme {
            Some(_) => {
                return Err(invalid(
                    "portal.acme",
                    cert.display(),
                    "the portal's certificate comes from files or from ACME, not both: drop cert and key, or [portal.acme]",
                ));
            }
            None => PortalCertificate::Files { cert, key },
        },
        (None, None) => match &f.acme {
            Some(acme) => PortalCertificate::Acme(acme_settings(acme)?),
            None => PortalCertificate::Gateway,
        },
        (Some(c), None) => {
            return Err(invalid(
                "portal.cert",
                c.display(),
                "a certificate needs its key: also pass --portal-key (or set `key` in [portal])",
            ));
        }
        (None, Some(k)) => {
            return Err(invalid(
                "portal.key",
                k.display(),
                "a key needs its certificate: also pass --portal-cert (or set `cert` in [portal])",
            ));
        }
    };
    let at_least_one = |key: &'static str, v: Option<u32>, default: u32| match v.unwrap_or(default) {
        0 => Err(invalid(key, 0, "use at least 1")),
        n => Ok(n),
    };
    Ok(Some(PortalSettings {
        listen,
        upstream,
        guidance: cli.guidance.or(f.guidance.clone()),
        certificate,
        hsts: f.hsts,
        sessions_per_source: at_least_one(
            "portal.sessions_per_source",
            f.sessions_per_source,
            DEFAULT_PORTAL_SESSIONS_PER_SOURCE,
        )?,
        new_sessions_per_sec: at_least_one(
            "portal.new_sessions_per_sec",
            f.new_sessions_per_sec,
            DEFAULT_PORTAL_NEW_SESSIONS_PER_SEC,
        )?,
        handshake_timeout: f.handshake_timeout.unwrap_or(DEFAULT_PORTAL_HANDSHAKE_TIMEOUT),
        downloads: f
            .downloads
            .iter()
            .flatten()
            .map(|(platform, url)| Download::parse(platform, url))
            .collect::<Result<_, _>>()?,
    }))
}

fn acme_settings(a: &AcmeSection) -> Result<AcmeSettings, ConfigError> {
    let directory = a.directory.clone().ok_or(ConfigError::Missing {
        key: "portal.acme.directory",
        hint: "ACME needs the CA's directory URL, e.g. directory = \"https://acme-v02.api.letsencrypt.org/directory\"",
    })?;
    if !directory.starts_with("https://") {
        return Err(invalid(
            "portal.acme.directory",
            &directory,
            "an ACME directory is an https:// URL",
        ));
    }
    let domains = a.domains.clone().unwrap_or_default();
    if domains.is_empty() {
        return Err(ConfigError::Missing {
            key: "portal.acme.domains",
            hint: "name the DNS names the certificate is for, e.g. domains = [\"gw.example.org\"]; each must reach this portal",
        });
    }
    for d in &domains {
        let valid = rustls::pki_types::DnsName::try_from(d.as_str()).is_ok() && d.contains('.');
        if !valid {
            return Err(invalid(
                "portal.acme.domains",
                d,
                "not a DNS name (an ACME CA validates names like gw.example.org)",
            ));
        }
    }
    if let Some(c) = &a.contact
        && !c.starts_with("mailto:")
    {
        return Err(invalid("portal.acme.contact", c, "write it as mailto:ops@example.org"));
    }
    Ok(AcmeSettings {
        directory,
        contact: a.contact.clone(),
        domains,
        trust: a.trust.clone(),
        renew_before: a.renew_before,
    })
}

fn invalid(key: &'static str, value: impl ToString, why: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        why: why.to_string(),
    }
}

/// The ephemeral port range of the current network namespace, where replies
/// to the gateway's own connections arrive. Falls back to Linux's default.
pub fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "gk-config-test-{}-{:x}",
            std::process::id(),
            text.bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn file(text: &str) -> Result<Settings, ConfigError> {
        let path = temp(text);
        let r = Settings::resolve(Path::new("/state"), None, &[&path], Overrides::default());
        std::fs::remove_file(&path).unwrap();
        r
    }

    #[test]
    fn the_relay_needs_a_cluster_and_sane_limits() {
        let base = "iface = \"eth0\"\nprotect = \"tcp/22\"\n";
        let e = file(&format!("{base}[relay]\nlisten = \"0.0.0.0:8080\"\n")).unwrap_err();
        assert!(e.to_string().contains("--cluster"), "{e}");
        let cluster = "[cluster]\nurl = \"redis://10.0.0.5\"\nnode = \"a\"\n";
        let s = file(&format!(
            "{base}{cluster}[relay]\nlisten = \"0.0.0.0:8080\"\nrotate_after = \"1m\"\n"
        ))
        .unwrap();
        let relay = s.relay.unwrap();
        assert_eq!(relay.rotate_after, Duration::from_secs(60));
        assert_eq!(relay.rotate_bytes, DEFAULT_RELAY_ROTATE_BYTES);
        let e = file(&format!(
            "{base}{cluster}[relay]\nlisten = \"0.0.0.0:8080\"\nrotate_messages = 0\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("relay.rotate_messages"), "{e}");
    }

    #[test]
    fn full_file_parses() {
        let s = file(
            "iface = \"eth0\"\nprotect = \"tcp/22,udp/53\"\nmode = \"audit\"\nidle_timeout = \"2m\"\n[knock]\nudp_port = 0\nrate = 5\n[audit]\nsample_every = 1\nmax_size = \"1MiB\"\n",
        )
        .unwrap();
        assert_eq!(s.mode, Mode::Audit);
        assert_eq!(s.idle_timeout, Duration::from_secs(120));
        assert_eq!(s.knock_udp_port, 0);
        assert_eq!(s.pin_dir, PathBuf::from("/sys/fs/bpf/gatekeeper/eth0"));
        assert_eq!(s.audit.path, PathBuf::from("/state/audit.log"));
        assert_eq!(s.audit.max_bytes, 1 << 20);
    }

    #[test]
    fn the_documented_example_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"));
        let s = Settings::resolve(Path::new("/state"), None, &[path], Overrides::default())
            .expect("config.example.toml must stay valid");
        assert_eq!(
            (s.ifaces[0].as_str(), s.knock_window.as_secs(), s.public_addrs.len()),
            ("eth0", 120, 1)
        );
        assert!(s.portal.is_some());
    }

    #[test]
    fn portal_downloads_are_http_links_with_plain_labels() {
        let resolve = |downloads: &str| {
            let text = format!(
                "iface = \"eth0\"\nprotect = \"tcp/22\"\n[portal]\nlisten = \"0.0.0.0:443\"\nupstream = \"127.0.0.1:8080\"\n[portal.downloads]\n{downloads}\n"
            );
            let file = ConfigFile::parse(&text, "test").unwrap();
            let state = StateConfig {
                location: "test",
                file: &file,
            };
            Settings::resolve(Path::new("/state"), Some(state), &[], Overrides::default())
        };
        let s = resolve("Windows = \"https://dl.example/gk.exe\"\n\"Debian (amd64)\" = \"http://dl.example/gk.deb\"")
            .unwrap();
        let d = s.portal.unwrap().downloads;
        assert_eq!(
            d.iter()
                .map(|d| (d.platform.as_str(), d.url.as_str()))
                .collect::<Vec<_>>(),
            [
                ("Debian (amd64)", "http://dl.example/gk.deb"),
                ("Windows", "https://dl.example/gk.exe")
            ]
        );
        for (bad, says) in [
            ("Windows = \"javascript:alert(1)\"", "http://"),
            ("Windows = \"https://dl.example/\\\"><script>\"", "quotes"),
            ("\"<b>\" = \"https://dl.example/\"", "platform"),
        ] {
            let e = resolve(bad).unwrap_err().to_string();
            assert!(e.contains("portal.downloads") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_second_file_may_not_contradict_what_credentials_carry() {
        let state_file = ConfigFile::load(&temp("public_addrs = [\"192.0.2.1\"]\n[tunnel]\nport = 7000\n")).unwrap();
        let state = || {
            Some(StateConfig {
                location: "/state/gatekeeper.toml",
                file: &state_file,
            })
        };
        let resolve = |text: &str| {
            let path = temp(text);
            let r = Settings::resolve(Path::new("/state"), state(), &[&path], Overrides::default());
            std::fs::remove_file(&path).unwrap();
            r
        };
        let ok = resolve("iface = \"eth0\"\nprotect = \"tcp/22\"\npublic_addrs = [\"192.0.2.1\"]\n").unwrap();
        assert_eq!(
            (ok.tunnel_port, ok.public_addrs.len()),
            (7000, 1),
            "the state's values hold"
        );
        let e = resolve("iface = \"eth0\"\nprotect = \"tcp/22\"\npublic_addrs = [\"192.0.2.9\"]\n").unwrap_err();
        assert!(
            e.to_string().contains("public_addrs") && e.to_string().contains("/state/gatekeeper.toml"),
            "{e}"
        );
        let e = resolve("iface = \"eth0\"\nprotect = \"tcp/22\"\n[knock]\nudp_port = 9999\n").unwrap_err();
        assert!(
            e.to_string().contains("knock.udp_port") && e.to_string().contains("62201"),
            "{e}"
        );
        let e = resolve("iface = \"eth0\"\nprotect = \"tcp/22\"\n[tunnel]\nport = 7443\n").unwrap_err();
        assert!(e.to_string().contains("tunnel.port"), "{e}");
    }

    #[test]
    fn portal_settings_need_an_upstream_and_whole_certificate_pairs() {
        let s = file(
            "iface = \"eth0\"\nprotect = \"all\"\n[portal]\nlisten = \"0.0.0.0:443\"\nupstream = \"127.0.0.1:8080\"\n",
        )
        .unwrap();
        let p = s.portal.unwrap();
        assert_eq!(
            (
                p.listen.port(),
                p.upstream.as_str(),
                p.certificate,
                p.hsts,
                p.sessions_per_source
            ),
            (
                443,
                "127.0.0.1:8080",
                PortalCertificate::Gateway,
                None,
                DEFAULT_PORTAL_SESSIONS_PER_SOURCE
            )
        );
        assert!(file("iface = \"eth0\"\nprotect = \"all\"\n").unwrap().portal.is_none());
        let e = file("iface = \"eth0\"\nprotect = \"all\"\n[portal]\nlisten = \"0.0.0.0:443\"\n").unwrap_err();
        assert!(e.to_string().contains("--portal-upstream"), "{e}");
        let e =
            file("iface = \"eth0\"\nprotect = \"all\"\n[portal]\nlisten = \"0.0.0.0:443\"\nupstream = \"nowhere\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("HOST:PORT"), "{e}");
        let e = file(
            "iface = \"eth0\"\nprotect = \"all\"\n[portal]\nlisten = \"0.0.0.0:443\"\nupstream = \"h:1\"\ncert = \"c.pem\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("--portal-key"), "{e}");
    }

    #[test]
    fn the_server_name_leads_the_certificate_names_and_must_be_a_dns_name() {
        let c = ConfigFile::parse(
            "server_name = \"gw.example.org\"\npublic_addrs = [\"192.0.2.7\"]\n",
            "test",
        )
        .unwrap();
        assert_eq!(c.certificate_names(), ["gw.example.org", "192.0.2.7"]);
        for bad in ["192.0.2.7", "gw example", ""] {
            let e = ConfigFile::parse(&format!("server_name = \"{bad}\"\n"), "test").unwrap_err();
            assert!(e.to_string().contains("not a DNS name"), "{bad}: {e}");
        }
    }

    #[test]
    fn acme_settings_are_checked_and_exclude_certificate_files() {
        let portal = "iface = \"eth0\"\nprotect = \"all\"\n[portal]\nlisten = \"0.0.0.0:443\"\nupstream = \"h:1\"\nhsts = \"180d\"\n";
        let acme = |rest: &str| file(&format!("{portal}[portal.acme]\n{rest}"));
        let good = "directory = \"https://ca.example/dir\"\ncontact = \"mailto:ops@example.org\"\ndomains = [\"gw.example.org\"]\nrenew_before = \"30d\"\n";
        let p = acme(good).unwrap().portal.unwrap();
        assert_eq!(p.hsts, Some(Duration::from_secs(180 * 86_400)));
        assert_eq!(
            p.certificate,
            PortalCertificate::Acme(AcmeSettings {
                directory: "https://ca.example/dir".into(),
                contact: Some("mailto:ops@example.org".into()),
                domains: vec!["gw.example.org".into()],
                trust: None,
                renew_before: Some(Duration::from_secs(30 * 86_400)),
            })
        );
        for (bad, named) in [
            ("domains = [\"gw.example.org\"]\n", "portal.acme.directory"),
            (
                "directory = \"http://ca.example/dir\"\ndomains = [\"gw.example.org\"]\n",
                "https://",
            ),
            ("directory = \"https://ca.example/dir\"\n", "portal.acme.domains"),
            (
                "directory = \"https://ca.example/dir\"\ndomains = [\"10.0.0.1\"]\n",
                "portal.acme.domains",
            ),
            (
                "directory = \"https://ca.example/dir\"\ndomains = [\"gw.example.org\"]\ncontact = \"ops@example.org\"\n",
                "mailto:",
            ),
        ] {
            let e = acme(bad).unwrap_err();
            assert!(e.to_string().contains(named), "{bad}: {e}");
        }
        let both = file(&format!(
            "{portal}cert = \"c.pem\"\nkey = \"k.pem\"\n[portal.acme]\n{good}"
        ))
        .unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
    }

    #[test]
    fn flags_win_over_files() {
        let path = temp("iface = \"eth0\"\nprotect = \"tcp/22\"\n");
        let cli = Overrides {
            ifaces: Some(vec!["eth1".into()]),
            mode: Some(Mode::Audit),
            ..Default::default()
        };
        let s = Settings::resolve(Path::new("/state"), None, &[&path], cli).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            (s.ifaces, s.gate.as_str(), s.mode),
            (vec!["eth1".to_string()], "eth1", Mode::Audit)
        );
    }

    #[test]
    fn a_gate_spans_a_list_of_interfaces_and_is_named_after_the_first() {
        let s = file("iface = [\"eth0\", \"wg0\"]\nprotect = \"tcp/22\"\ncover = \"all\"\n").unwrap();
        assert_eq!((s.ifaces.len(), s.gate.as_str(), s.cover), (2, "eth0", Cover::All));
        assert_eq!(s.pin_dir, PathBuf::from("/sys/fs/bpf/gatekeeper/eth0"));
        let s = file("iface = \"eth1\"\ngate = \"edge\"\nprotect = \"tcp/22\"\n").unwrap();
        assert_eq!(
            (s.ifaces, s.pin_dir),
            (vec!["eth1".to_string()], PathBuf::from("/sys/fs/bpf/gatekeeper/edge"))
        );
        let e = file("iface = [\"eth0\", \"eth0\"]\nprotect = \"tcp/22\"\n").unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = file("iface = [\"a-name-far-too-long\"]\nprotect = \"tcp/22\"\n").unwrap_err();
        assert!(e.to_string().contains("1-15"), "{e}");
    }

    #[test]
    fn bad_files_name_the_key() {
        let e = file("iface = \"eth0\"\nprotect = \"tcp/0\"\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("tcp/0"), "{e}");
        let e = file("iface = \"eth0\"\nprotec = \"tcp/22\"\n").unwrap_err().to_string();
        assert!(e.contains("protec"), "{e}");
        let e = file("iface = \"eth0\"\nprotect = \"tcp/22\"\nidle_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("soon"), "{e}");
        let e = file("iface = \"eth0\"\nprotect = \"tcp/22\"\nwhitelist_capacity = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("whitelist_capacity"), "{e}");
        let e = file("iface = \"eth0\"\nprotect = \"tcp/22\"\n[knock]\nbudget = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("knock.budget"), "{e}");
        let e = file("iface = \"eth0\"\n").unwrap_err().to_string();
        assert!(e.contains("--protect"), "{e}");
    }
}
