//! `gatekeeper run`: the daemon.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::LogFormat;
use anyhow::{Context, Result};
use clap::Args;
use gatekeeper::{
    daemon::{self, Exit},
    gate::loader::XdpModeChoice,
    spec::{self, PortSet},
    store::{
        Store,
        cluster::ClusterStore,
        config::{ConfigFile, Cover, Mode, Overrides, PortalOverrides, Settings, StateConfig},
        files::{DEFAULT_STATE_DIR, FileStore},
    },
};

/// Load the gate on one or more interfaces and serve it.
///
/// Loads the XDP program on each interface, pins the gate's maps and one
/// link per interface under /sys/fs/bpf/gatekeeper/GATE (mounting bpffs if
/// needed), configures the protected ports, and then receives knocks and
/// sweeps expired entries. All interfaces share the maps: a knock through
/// one opens the tuple on every one. If a gate is already pinned there, its
/// entries are kept and the new program replaces the old one atomically.
///
/// Every few seconds the daemon looks for interfaces that receive traffic
/// for this host but are not gated (a VPN's wg0 or tun0, a VXLAN, a second
/// uplink), names them in the log and in `status`, and with --cover all
/// gates them too.
///
/// Stopping the daemon (Ctrl-C, SIGTERM, even SIGKILL) leaves the gate
/// closed and attached; `gatekeeper detach` removes it. SIGHUP reopens the
/// audit log (for logrotate).
///
/// Settings come from the state directory's gatekeeper.toml, then --config,
/// then flags. Whatever the daemon is configured to serve (knocks, tunnels,
/// the portal, the control socket) must start, or the daemon exits saying
/// why; a record in the state directory that cannot be used is named in the
/// log and skipped.
///
/// Example: gatekeeper run --iface eth0 --protect tcp/22,tcp/8000-8100,udp/53
///
/// Two uplinks and a VPN: ... --iface eth0,eth1,wg0 --cover all
///
/// With a portal: ... --protect all --portal 0.0.0.0:443 --portal-upstream 127.0.0.1:8080
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Interfaces to gate, comma-separated or repeated.
    #[arg(long, value_name = "IFACE", value_delimiter = ',')]
    iface: Option<Vec<String>>,
    /// The gate's name: its pins are /sys/fs/bpf/gatekeeper/GATE [default:
    /// the first interface's name].
    #[arg(long, value_name = "GATE")]
    gate: Option<String>,
    /// listed gates the --iface interfaces (and any attached earlier);
    /// all also gates every other interface that receives traffic for this
    /// host, as it appears [default: listed].
    #[arg(long, value_enum, value_name = "WHICH")]
    cover: Option<Cover>,
    /// A second TOML config (keys: gatekeeper/config.example.toml) over the
    /// state directory's gatekeeper.toml; flags win over both. It may not
    /// change what credentials and tokens carry (public_addrs,
    /// knock.udp_port, tunnel.port, tunnel.ports): set those in the state's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where to pin maps and links [default: /sys/fs/bpf/gatekeeper/GATE].
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Ports to gate: PROTO/PORT or PROTO/LOW-HIGH, comma-separated, plus
    /// `icmp` for echo requests; or `all` (every TCP/UDP port and echo).
    #[arg(long, value_name = "SPEC", value_parser = parse_protect)]
    protect: Option<PortSet>,
    /// auto tries native (driver) XDP and falls back to generic (skb).
    #[arg(long, value_enum, value_name = "MODE")]
    xdp_mode: Option<XdpModeChoice>,
    /// enforce drops; audit passes would-drop packets, counts and samples them.
    #[arg(long, value_enum, value_name = "MODE")]
    mode: Option<Mode>,
    /// How long an expired entry keeps passing a flow that is still active [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = spec::duration)]
    idle_timeout: Option<std::time::Duration>,
    /// Keys, enrolled clients, the config and the audit log (see `gatekeeper init`).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Serve the portal on ADDR:PORT (e.g. 0.0.0.0:443): TLS for everyone; a
    /// knock in the ClientHello gets the upstream, anything else the guidance
    /// page. The gate lets this port through.
    #[arg(long, value_name = "ADDR:PORT")]
    portal: Option<std::net::SocketAddr>,
    /// Where the portal relays authorized sessions (a local service, or a
    /// published tunnel's port on 127.0.0.1); `client add --portal-upstream`
    /// overrides it per client.
    #[arg(long, value_name = "HOST:PORT", value_parser = spec::upstream)]
    portal_upstream: Option<String>,
    /// Folder with the guidance page (index.html and the CSS, JS and images it
    /// refers to) [default: the built-in page].
    #[arg(long, value_name = "DIR")]
    portal_guidance: Option<PathBuf>,
    /// The portal's certificate (PEM, chain allowed); generated with its key if
    /// both files are absent [default: the gateway's certificate, which credentials pin].
    #[arg(long, value_name = "CERT.pem")]
    portal_cert: Option<PathBuf>,
    /// The portal certificate's private key (PEM).
    #[arg(long, value_name = "KEY.pem")]
    portal_key: Option<PathBuf>,
    /// Join a cluster: the records several gateways share (server key, TLS
    /// identity, clients, tunnels, the shared config) live in this Redis
    /// instead of the state directory, which keeps this node's own config,
    /// audit trail and control socket. redis://[USER:PASS@]HOST:PORT[/DB],
    /// rediss:// for TLS (a private CA in SSL_CERT_FILE), or
    /// redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] to follow
    /// the primary that Sentinel names through failovers.
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long, value_name = "NAME", requires = "cluster")]
    node: Option<String>,
    /// This node's own address in the cluster, where agents reach it and
    /// no other node (the shared address hashes them to any). Tunnel
    /// tokens issued in the cluster name every node's, and agents keep a
    /// session to each, so a visitor landing on any node is served there.
    #[arg(long, value_name = "ADDR", requires = "cluster")]
    advertise: Option<IpAddr>,
    /// Serve relayed hosts on ADDR:PORT (e.g. 0.0.0.0:8080): HTTP requests
    /// routed by their Host header to the agent that publishes that host
    /// (`gatekeeper relay issue`), carried through the cluster's Redis.
    /// The gate protects this port; each relay's --allow clients may knock
    /// for it. Needs --cluster (one gateway is a cluster of one).
    #[arg(long, value_name = "ADDR:PORT")]
    relay_http: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g.
    /// 127.0.0.1:9477; `[metrics] listen`). Anyone who reaches it may
    /// read them: keep it on loopback or a management network.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn parse_protect(s: &str) -> Result<PortSet, spec::SpecError> {
    s.parse()
}

pub fn run(args: RunArgs) -> Result<()> {
    super::init_logging(args.log_format);
    let overrides = Overrides {
        ifaces: args.iface,
        gate: args.gate,
        cover: args.cover,
        pin_dir: args.pin_dir,
        protect: args.protect,
        xdp_mode: args.xdp_mode,
        mode: args.mode,
        idle_timeout: args.idle_timeout,
        portal: PortalOverrides {
            listen: args.portal,
            upstream: args.portal_upstream,
            guidance: args.portal_guidance,
            cert: args.portal_cert,
            key: args.portal_key,
        },
        cluster: args.cluster,
        node: args.node,
        advertise: args.advertise,
        relay_listen: args.relay_http,
        metrics_listen: args.metrics,
    };
    let files = FileStore::new(&args.state_dir);
    let own = files.config_path();
    let own_config = own.exists().then(|| files.config()).transpose()?;
    let extra = args.config.as_deref().map(ConfigFile::load).transpose()?;
    let cluster_url = overrides
        .cluster
        .clone()
        .or_else(|| extra.as_ref().and_then(|c| c.cluster_url().map(str::to_string)))
        .or_else(|| own_config.as_ref().and_then(|c| c.cluster_url().map(str::to_string)));
    // Alone, the state directory's config is the state's; in a cluster
    // the shared one in Redis is, and this node's own file is one of the
    // layers over it.
    let (shared, location, mut local) = match &cluster_url {
        Some(url) => {
            let cluster = ClusterStore::open(url)?;
            let shared = cluster.config()?;
            let location = format!("the cluster's config at {}", cluster.location());
            let local: Vec<&Path> = own_config.as_ref().map(|_| own.as_path()).into_iter().collect();
            (Some(shared), location, local)
        }
        None => (own_config, own.display().to_string(), Vec::new()),
    };
    local.extend(args.config.as_deref());
    let state = shared.as_ref().map(|file| StateConfig {
        location: &location,
        file,
    });
    let settings = Settings::resolve(&args.state_dir, state, &local, overrides)?;
    // Two workers: a tunnel's encryption and its public side's copying run
    // on both cores instead of taking turns on one.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let exit = runtime.block_on(daemon::run(settings, shutdown_signal()))?;
    if exit == Exit::Detached {
        eprintln!("gatekeeper: the gate was detached; exiting");
    }
    Ok(())
}

pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
