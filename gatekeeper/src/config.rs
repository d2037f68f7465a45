//! The daemon's settings: built-in defaults, then the TOML file, then flags.
//! Every key of the file is documented in `gatekeeper/config.example.toml`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use gatekeeper_common::maps::{CFG_ANY_TCP, CFG_ANY_UDP, CFG_PROTECT_ECHO, Config, MODE_AUDIT, MODE_ENFORCE};
use serde::Deserialize;
use thiserror::Error;

use crate::{
    pins,
    spec::{self, PortSet, Proto, SpecError},
};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("`{key}` is not set: {hint}")]
    Missing { key: &'static str, hint: &'static str },
    #[error("`{key}` = {value}: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: String,
    },
}

/// Enforce drops; audit passes what enforce would drop, counts and samples it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// How to attach: native (driver) with a fallback to generic, or one of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeChoice {
    #[default]
    Auto,
    Driver,
    Skb,
}

/// Values that came from the command line; they win over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub iface: Option<String>,
    pub pin_dir: Option<PathBuf>,
    pub protect: Option<PortSet>,
    pub xdp_mode: Option<XdpModeChoice>,
    pub mode: Option<Mode>,
    pub idle_timeout: Option<Duration>,
    pub state_dir: Option<PathBuf>,
    pub portal: PortalOverrides,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    iface: Option<String>,
    /// Addresses clients knock on (the state directory's own config sets it).
    public_addrs: Option<Vec<std::net::IpAddr>>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortalSection {
    listen: Option<SocketAddr>,
    upstream: Option<String>,
    guidance: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// The portal's settings, when it is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalSettings {
    pub listen: SocketAddr,
    /// Default upstream, `HOST:PORT`; a client record may name its own.
    pub upstream: String,
    /// Folder of the guidance page; `None`: the built-in page.
    pub guidance: Option<PathBuf>,
    /// Certificate (chain) and key, PEM; generated there if absent. `None`:
    /// the gateway's own certificate, which credentials pin.
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelSection {
    port: Option<u16>,
    #[serde(default, deserialize_with = "de_parse")]
    ports: Option<crate::spec::PortRange>,
    #[serde(default, deserialize_with = "de_duration")]
    heartbeat: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KnockSection {
    udp_port: Option<u16>,
    rate: Option<u32>,
    burst: Option<u32>,
    #[serde(default, deserialize_with = "de_duration")]
    window: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    open_for: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditSection {
    sample_every: Option<u32>,
}

pub(crate) fn de_parse<'de, D: serde::Deserializer<'de>, T: std::str::FromStr<Err = SpecError>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    spec::duration(&s).map(Some).map_err(serde::de::Error::custom)
}

fn portal_settings(cli: PortalOverrides, f: PortalSection) -> Result<Option<PortalSettings>, ConfigError> {
    let Some(listen) = cli.listen.or(f.listen) else {
        return Ok(None);
    };
    let upstream = cli.upstream.or(f.upstream).ok_or(ConfigError::Missing {
        key: "portal.upstream",
        hint: "the portal needs somewhere to send authorized sessions: pass --portal-upstream HOST:PORT or set `upstream` in [portal]",
    })?;
    let upstream =
        crate::portal::parse_upstream(&upstream).map_err(|why| invalid("portal.upstream", &upstream, &why))?;
    let cert_and_key = match (cli.cert.or(f.cert), cli.key.or(f.key)) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
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
    Ok(Some(PortalSettings {
        listen,
        upstream,
        guidance: cli.guidance.or(f.guidance),
        cert_and_key,
    }))
}

/// Resolved settings of one daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub iface: String,
    pub pin_dir: PathBuf,
    pub protect: PortSet,
    pub xdp_mode: XdpModeChoice,
    pub mode: Mode,
    pub idle_timeout: Duration,
    pub sweep_interval: Duration,
    pub whitelist_capacity: u32,
    /// 0: knocks only on protected ports.
    pub knock_udp_port: u16,
    pub knock_rate: u32,
    pub knock_burst: u32,
    /// A knock's timestamp may be this far from now, either way.
    pub knock_window: Duration,
    /// How long an accepted knock opens its tuple for new connections.
    pub knock_open_for: Duration,
    pub audit_sample_every: u32,
    /// Keys, enrolled clients and the audit log.
    pub state_dir: PathBuf,
    /// Addresses clients may knock on; empty: the address each knock was sent to.
    pub public_addrs: Vec<std::net::IpAddr>,
    /// Where agents dial in (TLS), behind the gate.
    pub tunnel_port: u16,
    /// Published ports are leased from this range.
    pub tunnel_ports: crate::spec::PortRange,
    /// An agent silent for this long is dropped and its port closed.
    pub tunnel_heartbeat: Duration,
    pub portal: Option<PortalSettings>,
}

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_WHITELIST_CAPACITY: u32 = 65536;
/// fwknop's default SPA port, so existing firewall holes keep working.
pub const DEFAULT_KNOCK_UDP_PORT: u16 = 62201;
pub const DEFAULT_KNOCK_RATE: u32 = 20;
pub const DEFAULT_KNOCK_BURST: u32 = 40;
pub const DEFAULT_AUDIT_SAMPLE_EVERY: u32 = 64;
pub const DEFAULT_KNOCK_WINDOW: Duration = Duration::from_secs(120);
pub const DEFAULT_KNOCK_OPEN_FOR: Duration = Duration::from_secs(30);
pub const DEFAULT_TUNNEL_HEARTBEAT: Duration = Duration::from_secs(30);

impl Settings {
    /// Defaults, then `file` (if any; else the state directory's
    /// `gatekeeper.toml` when it exists), then `cli`.
    pub fn resolve(file: Option<&Path>, cli: Overrides) -> Result<Settings, ConfigError> {
        let state_dir = cli
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::state::DEFAULT_STATE_DIR));
        let state_config = state_dir.join(crate::state::CONFIG_FILE);
        let file = file.or_else(|| state_config.exists().then_some(state_config.as_path()));
        let f = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.into(),
                    source: Box::new(e),
                })?
            }
            None => FileConfig::default(),
        };
        let iface = cli.iface.or(f.iface).ok_or(ConfigError::Missing {
            key: "iface",
            hint: "pass --iface IFACE or set `iface` in the config file",
        })?;
        let protect = cli.protect.or(f.protect).ok_or(ConfigError::Missing {
            key: "protect",
            hint: "pass --protect (for example tcp/22,udp/53 or all) or set `protect` in the config file",
        })?;
        let pin_dir = cli.pin_dir.or(f.pin_dir).unwrap_or_else(|| pins::dir_for_iface(&iface));
        let whitelist_capacity = f.whitelist_capacity.unwrap_or(DEFAULT_WHITELIST_CAPACITY);
        if !(1024..=1 << 24).contains(&whitelist_capacity) {
            return Err(invalid(
                "whitelist_capacity",
                whitelist_capacity,
                "use a number from 1024 to 16777216",
            ));
        }
        let knock_rate = f.knock.rate.unwrap_or(DEFAULT_KNOCK_RATE);
        if knock_rate == 0 {
            return Err(invalid(
                "knock.rate",
                knock_rate,
                "use at least 1 knock per second per source",
            ));
        }
        let knock_burst = f.knock.burst.unwrap_or(DEFAULT_KNOCK_BURST);
        if knock_burst == 0 {
            return Err(invalid("knock.burst", knock_burst, "use at least 1"));
        }
        let portal = portal_settings(cli.portal, f.portal)?;
        Ok(Settings {
            portal,
            iface,
            pin_dir,
            protect,
            xdp_mode: cli.xdp_mode.or(f.xdp_mode).unwrap_or_default(),
            mode: cli.mode.or(f.mode).unwrap_or_default(),
            idle_timeout: cli.idle_timeout.or(f.idle_timeout).unwrap_or(DEFAULT_IDLE_TIMEOUT),
            sweep_interval: f.sweep_interval.unwrap_or(DEFAULT_SWEEP_INTERVAL),
            whitelist_capacity,
            knock_udp_port: f.knock.udp_port.unwrap_or(DEFAULT_KNOCK_UDP_PORT),
            knock_rate,
            knock_burst,
            knock_window: f.knock.window.unwrap_or(DEFAULT_KNOCK_WINDOW),
            knock_open_for: f.knock.open_for.unwrap_or(DEFAULT_KNOCK_OPEN_FOR),
            audit_sample_every: f.audit.sample_every.unwrap_or(DEFAULT_AUDIT_SAMPLE_EVERY),
            state_dir,
            public_addrs: f.public_addrs.unwrap_or_default(),
            tunnel_port: f.tunnel.port.unwrap_or(crate::tunnels::DEFAULT_TUNNEL_PORT),
            tunnel_ports: f.tunnel.ports.unwrap_or(crate::tunnels::DEFAULT_LEASE_RANGE),
            tunnel_heartbeat: f.tunnel.heartbeat.unwrap_or(DEFAULT_TUNNEL_HEARTBEAT),
        })
    }

    /// The CONFIG map entry for these settings, with the host's ephemeral
    /// port range (see [`ephemeral_ports`]).
    pub fn map_config(&self, ephemeral: (u16, u16)) -> Config {
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
            _pad2: 0,
        }
    }
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

    fn file(text: &str) -> Result<Settings, ConfigError> {
        let dir = std::env::temp_dir().join(format!("gk-config-test-{}-{}", std::process::id(), text.len()));
        std::fs::write(&dir, text).unwrap();
        let r = Settings::resolve(Some(&dir), Overrides::default());
        std::fs::remove_file(&dir).unwrap();
        r
    }

    #[test]
    fn full_file_parses() {
        let s = file(
            "iface = \"eth0\"\nprotect = \"tcp/22,udp/53\"\nmode = \"audit\"\nidle_timeout = \"2m\"\n[knock]\nudp_port = 0\nrate = 5\n[audit]\nsample_every = 1\n",
        )
        .unwrap();
        assert_eq!(s.mode, Mode::Audit);
        assert_eq!(s.idle_timeout, Duration::from_secs(120));
        assert_eq!(s.knock_udp_port, 0);
        assert_eq!(s.pin_dir, PathBuf::from("/sys/fs/bpf/gatekeeper/eth0"));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"));
        let s = Settings::resolve(Some(path), Overrides::default()).expect("config.example.toml must stay valid");
        assert_eq!(
            (s.iface.as_str(), s.knock_window.as_secs(), s.public_addrs.len()),
            ("eth0", 120, 1)
        );
    }

    #[test]
    fn portal_settings_need_an_upstream_and_whole_certificate_pairs() {
        let s = file(
            "iface = \"eth0\"\nprotect = \"all\"\n[portal]\nlisten = \"0.0.0.0:443\"\nupstream = \"127.0.0.1:8080\"\n",
        )
        .unwrap();
        let p = s.portal.unwrap();
        assert_eq!(
            (p.listen.port(), p.upstream.as_str(), p.cert_and_key),
            (443, "127.0.0.1:8080", None)
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
    fn flags_win_over_file() {
        let dir = std::env::temp_dir().join(format!("gk-config-flags-{}", std::process::id()));
        std::fs::write(&dir, "iface = \"eth0\"\nprotect = \"tcp/22\"\n").unwrap();
        let cli = Overrides {
            iface: Some("eth1".into()),
            mode: Some(Mode::Audit),
            ..Default::default()
        };
        let s = Settings::resolve(Some(&dir), cli).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!((s.iface.as_str(), s.mode), ("eth1", Mode::Audit));
    }

    #[test]
    fn bad_files_name_the_key() {
        let e = file("iface = \"eth0\"\nprotect = \"tcp/0\"\n").unwrap_err().to_string();
        assert!(e.contains("protect") && e.contains("tcp/0"), "{e}");
        let e = file("iface = \"eth0\"\nprotec = \"tcp/22\"\n").unwrap_err().to_string();
        assert!(e.contains("protec"), "{e}");
        let e = file("iface = \"eth0\"\nprotect = \"tcp/22\"\nidle_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("idle_timeout") && e.contains("soon"), "{e}");
        let e = file("iface = \"eth0\"\nprotect = \"tcp/22\"\nwhitelist_capacity = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("whitelist_capacity"), "{e}");
        let e = file("iface = \"eth0\"\n").unwrap_err().to_string();
        assert!(e.contains("--protect"), "{e}");
    }
}
