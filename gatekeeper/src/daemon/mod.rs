//! The running daemon: prepares everything it will serve, loads or adopts
//! the gate, then serves the event ring, the portal's questions and the
//! control socket, follows the state and sweeps, until told to stop.
//! Stopping leaves the program attached and the entries in place (fail
//! closed); only `gatekeeper detach` removes the gate, and the daemon exits
//! when it sees that.
//!
//! One policy for what cannot start: everything the daemon is configured
//! to serve (knock verification, the tunnel listener, the portal, the audit
//! trail, the control socket) is prepared before the gate goes up, and if
//! any of it fails the daemon exits with a message naming the cause. A
//! record in the state that cannot be used is not such a failure: it is
//! named in the log, the audit trail and `client list`, and skipped.
//!
//! - [`coverage`]: which interfaces the gate spans, and which it misses.
//! - [`knock_service`]: verifying knocks, opening what they grant.
//! - [`cluster`]: what a cluster node shares at once: the replay cache and
//!   the grants.
//! - [`certificates`]: the served certificates, renewed and replaced
//!   while the listeners serve.

pub mod certificates;
pub mod cluster;
pub mod coverage;
pub mod fwknop_tcp;
pub mod knock_service;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use gatekeeper_common::{
    maps::{CFG_FWKNOP, KEY_ID_LEN, TAG_KEY_SLOTS, TagKey},
    ratelimit,
};
use serde_json::json;
use thiserror::Error;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    audit::Audit,
    clock::unix_now,
    control::{self, Applied, Asked, ClientsStatus, ClosedInfo, ClusterStatus, NodeStatus, Reply, Request, Status},
    error_chain,
    gate::{
        Gate, GateError,
        interfaces::InterfacesError,
        loader::{self, Instance, LoaderError},
        pins::{self, PinError},
        ring::{self, Record},
        sweeper,
    },
    knock::{ask::Ask, keys::ServerKeys, note::KeyNote, verify::Knock, wire},
    metrics::{
        Events,
        server::{self as metrics_server, MetricsError},
    },
    portal::{
        self,
        acme::{Acme, Failure},
        listener::{Portal, PortalError},
    },
    relay::gateway::{RelayError, RelayGateway},
    spec::{PortRange, PortSet, Proto},
    store::{
        Store, StoreError, Version,
        cluster::{ClusterStore, NodeReport},
        config::{PortalCertificate, Settings, ephemeral_ports},
        files::FileStore,
        watch::{Change, Watcher},
    },
    tunnels::gateway::{Gateway, GatewayError, SessionTiming},
};
use certificates::{CertificateError, Served};
use cluster::{Event, Link};
use coverage::Coverage;
use knock_service::KnockService;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error(transparent)]
    Interfaces(#[from] InterfacesError),
    #[error("watching the event ring")]
    Ring(#[source] std::io::Error),
    #[error(
        "no interface named {0:?} in this network namespace: check `ip link`, or run inside the interface's namespace"
    )]
    NoSuchInterface(String),
    #[error(transparent)]
    Portal(#[from] PortalError),
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error(
        "[portal.acme] is not available in a cluster: the CA's validation may land on any node. Have your ACME client write the certificate to every node and set [portal] cert and key"
    )]
    AcmeInCluster,
    #[error(
        "the portal verifies knocks with the state's keys, and {0} is not initialised: run `gatekeeper init --state-dir {0} --public-addr ADDR` first"
    )]
    PortalWithoutState(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tunnels(#[from] GatewayError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("the audit log {path}")]
    Audit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the control socket {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listening for signals")]
    Signal(#[source] std::io::Error),
    #[error("listening on tcp/{port} for fwknop's `-P tcp` (`[knock] fwknop_tcp`)")]
    FwknopTcp {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    /// `reason`: the Redis client's error as text (it names its cause).
    #[error("joining the cluster's grants at {location}: {reason}")]
    ClusterLink { location: String, reason: String },
}

/// Why [`run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A signal: the gate stays attached.
    Stopped,
    /// Every link pin vanished (`gatekeeper detach`): the gate is gone.
    Detached,
}

/// Counts of what the daemon has seen since it started.
#[derive(Debug, Default)]
struct Seen {
    knocks: u64,
    audit_samples: u64,
    unknown: u64,
}

/// What serves knocks, once the state is initialised.
struct Knocks {
    service: KnockService,
    watcher: Watcher,
    audit: Audit,
    gateway: Arc<Gateway>,
    /// The relay's public side, on a cluster node that serves it.
    relay: Option<RelayGateway>,
    /// The gateway's certificate first, then the portal's own, if any.
    certificates: Vec<Served>,
}

/// The running daemon's parts the loop and the control socket need.
struct Daemon {
    settings: Settings,
    gate: Gate,
    coverage: Option<Coverage>,
    started: u64,
    knocks: Option<Knocks>,
    /// Closing the entries of clients no longer allowed failed: try again
    /// at the next look.
    close_pending: bool,
    /// The enrolled key ids the gate should hold, while writing them has
    /// failed: tried again at the next look.
    keys_pending: Option<BTreeSet<[u8; KEY_ID_LEN]>>,
    /// This daemon's place in a cluster, if it is in one.
    node: Option<Node>,
    /// The cluster's grants were lost since the last time they were read.
    cluster_lost: bool,
    /// Whitelist entries in the gate at the last sweep.
    entries: u64,
    /// Some client knocks with fwknop: the gate hands over base64 text on
    /// the knock port.
    fwknop: bool,
    /// The v2 flood tag keys in the gate.
    tag_keys: TagKeys,
    /// What happened since the start, counted for metrics and status.
    events: Arc<Events>,
}

/// The gateway's knock keys, and the v2 flood tag keys last written into
/// the gate for them (none: not yet, or the write failed). The previous
/// key's tag key leaves the gate when its overlap ends.
#[derive(Default)]
struct TagKeys {
    server: Option<ServerKeys>,
    written: Option<[TagKey; TAG_KEY_SLOTS as usize]>,
}

impl TagKeys {
    /// Writes the tag keys the gate should hold now, if they changed:
    /// after a reload, and when a rotation's overlap ends.
    fn sync(&mut self, gate: &Gate) {
        let Some(keys) = &self.server else {
            return;
        };
        let wanted = wire::v2::tag_keys(keys, unix_now());
        if self.written == Some(wanted) {
            return;
        }
        match gate.set_tag_keys(&wanted) {
            Ok(()) => self.written = Some(wanted),
            Err(e) => {
                warn!(error = %error_chain(&e), "writing v2 knocks' flood tag keys into the gate failed; retrying in 2 s")
            }
        }
    }
}

/// A cluster node: the shared store, and what the node last reported
/// to the others.
struct Node {
    store: Arc<ClusterStore>,
    report: NodeReport,
    /// When the last report went out (CLOCK_MONOTONIC_COARSE ns); none: never.
    reported_ns: Option<u64>,
}

impl Node {
    fn new(store: Arc<ClusterStore>, name: &str, advertise: Option<IpAddr>) -> Node {
        Node {
            store,
            report: NodeReport {
                name: name.to_string(),
                applied: 0,
                seen_ms: 0,
                pid: std::process::id(),
                release: crate::VERSION.into(),
                started: unix_now(),
                advertise,
                tunnels: Vec::new(),
            },
            reported_ns: None,
        }
    }

    fn status(&self) -> ClusterStatus {
        let now_ms = crate::clock::unix_now_ms();
        let nodes = match self.store.nodes() {
            Ok(nodes) => nodes,
            Err(e) => {
                warn!(error = %error_chain(&e), "reading the cluster's nodes failed");
                Vec::new()
            }
        };
        ClusterStatus {
            location: self.store.location(),
            node: self.report.name.clone(),
            nodes: nodes
                .into_iter()
                .map(|report| NodeStatus {
                    live: report.live_at(now_ms),
                    report,
                })
                .collect(),
        }
    }

    /// Tells the others which records are in force here and which
    /// tunnels' agents hold a session here: at once when that changed,
    /// else once a second as a heartbeat.
    fn report(&mut self, applied: Option<Version>, tunnels: Vec<String>) {
        let now = crate::clock::now_ns();
        let changed = applied.is_some_and(|v| v.0 != self.report.applied) || tunnels != self.report.tunnels;
        self.report.tunnels = tunnels;
        let due = self.reported_ns.is_none_or(|t| now.saturating_sub(t) >= 1_000_000_000);
        if !changed && !due {
            return;
        }
        if let Some(v) = applied {
            self.report.applied = v.0;
        }
        self.report.seen_ms = crate::clock::unix_now_ms();
        match self.store.report_node(&self.report) {
            Ok(()) => self.reported_ns = Some(now),
            Err(e) => warn!(error = %error_chain(&e), "reporting to the cluster failed; retrying"),
        }
    }
}

/// Raises the soft limit on open files to the hard one: every portal and
/// tunnel connection is a descriptor, and the usual soft limit of 1024
/// would let a few idle connections starve the rest.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit with a valid out-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs the daemon until `shutdown` completes or the gate is detached.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<Exit, DaemonError> {
    if let Some(missing) = settings.ifaces.iter().find(|i| !interface_exists(i)) {
        return Err(DaemonError::NoSuchInterface(missing.clone()));
    }
    let dir = settings.pin_dir.clone();
    let _pin_lock = pins::lock(&dir)?;
    raise_open_files();
    let files = FileStore::new(&settings.state_dir);
    let cluster = match &settings.cluster {
        Some(c) => {
            let store = Arc::new(ClusterStore::open(&c.url)?);
            // Reachable and initialised, or a clear reason not to start;
            // and read once, to be written back should Redis lose it.
            store.server_secret()?;
            store.config()?;
            files.prepare()?;
            Some(Node::new(store, &c.node, c.advertise))
        }
        None => None,
    };
    let initialised = cluster.is_some() || files.initialised();
    if settings.portal.is_some() && !initialised {
        return Err(DaemonError::PortalWithoutState(files.location()));
    }
    let _state_lock = if initialised { Some(files.lock_daemon()?) } else { None };
    let store: Arc<dyn Store> = match &cluster {
        Some(node) => node.store.clone(),
        None => Arc::new(files.clone()),
    };

    // Everything the daemon will serve, prepared before the gate goes up.
    let (ask, mut asked) = mpsc::channel::<Ask>(1024);
    let (control_tx, mut control_rx) = mpsc::channel::<Asked>(16);
    // Knocks read from connections (fwknop's `-P tcp`), not from the ring.
    let (streamed_tx, mut streamed) = mpsc::channel::<Knock>(256);
    let mut fwknop_listener = None;
    let mut knocks = None;
    let mut first_change = None;
    let mut cluster_events = None;
    let mut portals = Vec::new();
    let events = Arc::new(Events::default());
    let metrics = match settings.metrics_listen {
        Some(addr) => Some(metrics_server::bind(addr).await?),
        None => None,
    };
    if initialised {
        let (audit, _writer) = Audit::start(&settings.audit, events.clone()).map_err(|source| DaemonError::Audit {
            path: settings.audit.path.clone(),
            source,
        })?;
        let (watcher, change) = Watcher::start(store.clone(), unix_now())?;
        let mut service = KnockService::new(&settings, audit.clone());
        if let (Some(c), Some(node)) = (&settings.cluster, &cluster) {
            let (link, events) =
                Link::start(node.store.target().clone(), &c.node)
                    .await
                    .map_err(|e| DaemonError::ClusterLink {
                        location: store.location(),
                        reason: e.to_string(),
                    })?;
            service.join(link, c.when_unreachable);
            cluster_events = Some(events);
        }
        let mut own = Served::gateway(store.clone())?;
        let (gateway, tunnel_listener) = Gateway::bind(
            settings.tunnel_port,
            own.serve("tunnel"),
            own.pin(),
            SessionTiming {
                heartbeat: settings.tunnel_heartbeat,
                rekey: settings.tunnel_rekey,
                idle_timeout: settings.tunnel_idle_timeout,
            },
            audit.clone(),
        )
        .await?;
        let relay = match (&settings.relay, &settings.cluster, &cluster) {
            (Some(r), Some(c), Some(node)) => {
                let (relay, listener) = RelayGateway::bind(
                    r.clone(),
                    settings.pin_dir.clone(),
                    &c.node,
                    store.server_secret()?,
                    node.store.target().clone(),
                    audit.clone(),
                )
                .await?;
                tokio::spawn(relay.clone().serve(listener));
                Some(relay)
            }
            _ => None,
        };
        let mut certificates = vec![own];
        if let Some(p) = &settings.portal {
            let index = match &p.certificate {
                PortalCertificate::Gateway => 0,
                PortalCertificate::Files { cert, key } => {
                    certificates.push(Served::files(cert, key, store.config()?.certificate_names())?);
                    certificates.len() - 1
                }
                PortalCertificate::Acme(a) => {
                    if cluster.is_some() {
                        return Err(DaemonError::AcmeInCluster);
                    }
                    let acme = Acme::new(a.clone(), &settings.state_dir);
                    let failure = Failure::default();
                    let served = Served::acme(&acme, a, failure.clone())?;
                    tokio::spawn(portal::acme::run(acme, served.live(), failure, audit.clone()));
                    certificates.push(served);
                    certificates.len() - 1
                }
            };
            let served = &mut certificates[index];
            let (portal, listener) = Portal::prepare(
                p,
                served.serve("portal"),
                served.pin(),
                ask.clone(),
                audit.clone(),
                relay.clone(),
            )
            .await?;
            portals.push((Arc::new(portal), listener));
        }
        if settings.fwknop_tcp {
            let port = settings.knock_udp_port;
            let listener = fwknop_tcp::bind(port)
                .await
                .map_err(|source| DaemonError::FwknopTcp { port, source })?;
            fwknop_listener = Some(listener);
        }
        let socket = files.control_socket();
        let control = control::bind(&socket).map_err(|source| DaemonError::Control { path: socket, source })?;
        tokio::spawn(control::serve(control, control_tx.clone()));
        tokio::spawn(gateway.clone().serve(tunnel_listener));
        first_change = Some(change);
        knocks = Some(Knocks {
            service,
            watcher,
            audit,
            gateway,
            relay,
            certificates,
        });
    } else {
        info!(state_dir = %settings.state_dir.display(), "the state is not initialised: the gate runs without knocks, tunnels or a control socket (`gatekeeper init` sets them up)");
    }
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;

    pins::prepare(&dir)?;
    pins::adopt_legacy_link(&dir, &settings.ifaces[0])?;
    // The maps, pinned (or adopted, or migrated) before any program runs;
    // each interface's instance is loaded when it is attached.
    drop(loader::load_pinned(
        &dir,
        settings.whitelist_capacity,
        Instance::default(),
    )?);
    let gate = Gate::open(&dir)?;
    // Configure before attaching: an unconfigured program gates nothing.
    let gated = gated_ports(&settings, initialised);
    gate.set_protected(&gated)?;
    let mut daemon = Daemon {
        settings,
        gate,
        coverage: None,
        started: unix_now(),
        knocks,
        close_pending: false,
        keys_pending: None,
        node: cluster,
        cluster_lost: false,
        entries: 0,
        fwknop: false,
        tag_keys: TagKeys::default(),
        events: events.clone(),
    };
    if let Some(change) = first_change {
        // The enrolled key ids are in the gate before the config tells a
        // program (an adopted one may already run) to check them, and
        // whatever was revoked while no daemon ran is closed before any
        // packet meets this one's program.
        daemon.apply(change, true);
    }
    let ephemeral = ephemeral_ports();
    let settings = &daemon.settings;
    daemon
        .gate
        .set_config(&settings.map_config(ephemeral, initialised, daemon.fwknop))?;
    daemon
        .gate
        .fill_knock_budget(ratelimit::full(settings.knock_budget, crate::clock::now_ns()))?;
    if let Some(k) = &daemon.knocks {
        k.service.load_grants(&daemon.gate).await;
    }
    let coverage = Coverage::start(&daemon.settings, &daemon.gate)?;
    let spans: Vec<String> = coverage.status(&daemon.gate).into_iter().map(|i| i.name).collect();
    daemon.coverage = Some(coverage);
    let settings = &daemon.settings;
    info!(
        event = "started",
        gate = %settings.gate,
        ifaces = %spans.join(","),
        pin_dir = %dir.display(),
        protect = %gated,
        mode = ?settings.mode,
        knock_udp_port = settings.knock_udp_port,
        ephemeral = format!("{}-{}", ephemeral.0, ephemeral.1),
        entries = daemon.gate.whitelist().map(|w| w.len()).unwrap_or(0),
        "gate up"
    );
    for (portal, listener) in portals {
        tokio::spawn(portal.serve(listener));
    }
    if let Some(listener) = metrics {
        tokio::spawn(metrics_server::serve(listener, events, control_tx.clone()));
    }
    if let Some(listener) = fwknop_listener {
        tokio::spawn(fwknop_tcp::serve(listener, streamed_tx));
    }

    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for
    // as long as the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(daemon.gate.events()?, Interest::READABLE) }
        .map_err(|e| DaemonError::Ring(e.into()))?;
    let mut sweep = tokio::time::interval(daemon.settings.sweep_interval.max(Duration::from_millis(10)));
    let idle_ns = daemon.settings.idle_timeout.as_nanos().min(u64::MAX as u128) as u64;
    // Interfaces come and go (a VPN's tun, a container's veth): look at
    // them every few seconds.
    let mut look = tokio::time::interval(Duration::from_secs(2));
    let mut seen = Seen::default();
    // Revocations must bite within a second.
    let mut follow = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);

    let exit = loop {
        tokio::select! {
            _ = &mut shutdown => break Exit::Stopped,
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(DaemonError::Ring)?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    daemon.record(&item, &mut seen);
                }
                guard.clear_ready();
            }
            Some(event) = next_event(&mut cluster_events) => daemon.cluster_event(event),
            Some(knock) = streamed.recv() => daemon.knock(&knock, &mut seen),
            Some(ask) = asked.recv() => {
                if let Some(k) = daemon.knocks.as_mut() {
                    k.service.handle_portal(&daemon.gate, ask);
                }
            }
            Some((request, reply)) = control_rx.recv() => {
                let answer = match request {
                    Request::Status => Reply::Status(Box::new(daemon.status())),
                    Request::Reload => Reply::Applied(daemon.reload()),
                };
                let _ = reply.send(answer);
            }
            _ = follow.tick() => daemon.follow(),
            _ = look.tick() => {
                if let Some(c) = daemon.coverage.as_mut() {
                    c.look(&daemon.gate);
                }
                daemon.tag_keys.sync(&daemon.gate);
                daemon.look_at_certificates();
            }
            _ = hangup.recv() => {
                if let Some(k) = &daemon.knocks {
                    info!("SIGHUP: reopening the audit log");
                    k.audit.reopen();
                }
            }
            _ = sweep.tick() => {
                if !pins::has_links(&dir) {
                    break Exit::Detached;
                }
                match sweeper::sweep(&daemon.gate, idle_ns) {
                    Ok(swept) => daemon.entries = swept.entries_live as u64,
                    Err(e) => warn!(error = %error_chain(&e), "sweep failed; retrying next tick"),
                }
                if let Some(k) = daemon.knocks.as_mut() {
                    k.service.sweep(&daemon.gate);
                }
            }
        }
    };
    info!(
        event = "stopped",
        ?exit,
        knocks = seen.knocks,
        audit_samples = seen.audit_samples,
        unknown_events = seen.unknown,
        "daemon stopping; {}",
        match exit {
            Exit::Stopped => "the gate stays attached with its entries",
            Exit::Detached => "the gate was detached",
        }
    );
    if let Some(k) = &daemon.knocks
        && !k.audit.flush(Duration::from_secs(2))
    {
        warn!("the audit writer did not finish in time; its last lines may be lost");
    }
    Ok(exit)
}

impl Daemon {
    fn knock(&mut self, knock: &Knock, seen: &mut Seen) {
        seen.knocks += 1;
        match self.knocks.as_mut() {
            Some(k) => k.service.handle(&self.gate, knock),
            None => info!(event = "knock_received", src = %knock.src, sport = knock.sport, dst = %knock.dst,
                dport = knock.dport, carrier = knock.carrier.name(), len = knock.payload.len(), total = seen.knocks,
                "knock received (not verified: the state is not initialised)"),
        }
    }

    fn record(&mut self, bytes: &[u8], seen: &mut Seen) {
        match ring::decode(bytes) {
            None => seen.unknown += 1,
            Some(Record::Knock(knock)) => self.knock(&knock, seen),
            Some(Record::AuditSample {
                src,
                sport,
                dst,
                dport,
                proto,
                reason,
            }) => {
                seen.audit_samples += 1;
                info!(event = "audit_would_drop", %src, sport, %dst, dport, proto,
                    reason = reason.map(|r| r.name()).unwrap_or("unknown"), "audit mode passed a packet enforce mode would drop");
            }
        }
    }

    /// What the cluster's link reports: claims answered, grants other
    /// nodes published.
    fn cluster_event(&mut self, event: Event) {
        let Some(k) = self.knocks.as_mut() else {
            return;
        };
        match event {
            Event::Claimed { id, claimed } => k.service.claimed(&self.gate, id, claimed),
            Event::Grant(grant) => k.service.shared_grant(&self.gate, &grant),
            Event::Resync(all) => {
                for grant in &all {
                    k.service.shared_grant(&self.gate, grant);
                }
                info!(grants = all.len(), "read the cluster's live grants");
                // Redis was away, and may have come back empty.
                if std::mem::take(&mut self.cluster_lost) {
                    k.service.republish(&self.gate);
                }
            }
            Event::Lost(why) => {
                self.cluster_lost = true;
                warn!(error = %why, "lost the cluster's grants; subscribing again");
            }
            Event::Asked(question) if question.what == "whitelist" => {
                let now = crate::clock::now_ns();
                let views: Vec<_> = match self.gate.whitelist() {
                    Ok(entries) => entries.iter().map(|e| e.view(now)).collect(),
                    Err(e) => {
                        warn!(error = %error_chain(&e), "reading the whitelist for the cluster failed");
                        return;
                    }
                };
                k.service.answer(&question, serde_json::json!(views));
            }
            Event::Asked(_) => {}
        }
    }

    /// The periodic look at the state.
    fn follow(&mut self) {
        if let Some(k) = self.knocks.as_mut() {
            let change = k.watcher.poll(unix_now());
            self.apply(change, false);
        }
        self.report();
    }

    /// Renews what is due, and serves what the state now holds.
    fn look_at_certificates(&mut self) {
        if let Some(k) = self.knocks.as_mut() {
            let now = unix_now();
            for served in &mut k.certificates {
                served.look(&k.audit, now);
            }
        }
    }

    /// In a cluster, tells the others what is in force here.
    fn report(&mut self) {
        let applied = self.knocks.as_ref().and_then(|k| k.watcher.version());
        let tunnels = self
            .knocks
            .as_ref()
            .map_or_else(Vec::new, |k| k.gateway.status().into_iter().map(|t| t.name).collect());
        if let Some(node) = self.node.as_mut() {
            node.report(applied, tunnels);
        }
    }

    /// `gatekeeper ... ` changed the state and asks for it to be applied now.
    fn reload(&mut self) -> Applied {
        let applied = match self.knocks.as_mut() {
            Some(k) => {
                let change = k.watcher.reload(unix_now());
                self.apply(change, false)
            }
            None => Applied {
                failed: Some("this daemon runs without a state: it verifies no knocks".into()),
                ..Applied::default()
            },
        };
        self.report();
        applied
    }

    /// Puts a change of the state into force: the registry, the enrolled
    /// key ids in the kernel, the tunnel records, and, for whoever is no
    /// longer allowed, their whitelist entries and sessions. `start`: also
    /// close entries of owners the state does not allow (revoked while no
    /// daemon ran).
    fn apply(&mut self, change: Change, start: bool) -> Applied {
        let Some(k) = self.knocks.as_mut() else {
            return Applied::default();
        };
        if let Some(why) = &change.failed {
            warn!(error = %why, "reading the state failed; the last records stay in force, retrying");
            k.audit.event("state_unreadable", json!({"detail": why}));
        }
        if change.recovered {
            info!("the state is readable again");
        }
        for p in &change.new_problems {
            warn!(path = %p.path, reason = %p.reason, "skipping a record that cannot be used");
            k.audit
                .event("state_problem", json!({"path": p.path, "reason": p.reason}));
        }
        for p in &change.fixed_problems {
            info!(path = %p.path, "a record that could not be used is fixed or gone");
            k.audit.event("state_problem_fixed", json!({"path": p.path}));
        }
        if let Some(snapshot) = &change.reloaded {
            let (keys, problems) = k.service.set_clients(snapshot);
            let fwknop = k.service.reads_fwknop();
            if fwknop != self.fwknop {
                self.fwknop = fwknop;
                // At the start the config is written once everything is applied.
                if !start && let Err(e) = set_fwknop_flag(&self.gate, fwknop) {
                    warn!(error = %error_chain(&e), "telling the gate about fwknop clients failed");
                }
            }
            for p in problems {
                warn!(path = %p.path, reason = %p.reason, "skipping a client that cannot verify knocks");
            }
            self.keys_pending = Some(keys);
            k.gateway.set_records(snapshot.tunnels.clone());
            if let Some(keys) = &snapshot.server_keys {
                k.gateway.set_note(KeyNote::of(keys));
                self.tag_keys.server = Some(keys.clone());
                self.tag_keys.sync(&self.gate);
            }
            if let Some(relay) = &k.relay {
                relay.set_records(snapshot);
            }
        }
        if let Some(keys) = self.keys_pending.take() {
            let fresh = ratelimit::full(self.settings.knock_key_burst, crate::clock::now_ns());
            match self.gate.sync_knock_keys(&keys, fresh) {
                Ok((added, removed)) if added + removed > 0 => {
                    info!(
                        added,
                        removed,
                        keys = keys.len(),
                        "enrolled key ids updated in the gate"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %error_chain(&e), "updating the enrolled key ids failed; retrying");
                    self.keys_pending = Some(keys);
                }
            }
        }
        let mut applied = Applied {
            clients_allowed: k
                .watcher
                .snapshot()
                .clients
                .iter()
                .filter(|c| c.allowed_at(unix_now()))
                .count(),
            problems: k.watcher.snapshot().problems.clone(),
            failed: change.failed.clone(),
            ..Applied::default()
        };
        if start || self.close_pending || !change.closed_clients.is_empty() {
            let watcher = &k.watcher;
            let closed = match self.gate.whitelist_close_owners(|owner| watcher.allows_owner(owner)) {
                Ok(closed) => {
                    self.close_pending = false;
                    closed
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "closing the entries of clients no longer allowed failed; retrying");
                    self.close_pending = true;
                    BTreeMap::new()
                }
            };
            for c in &change.closed_clients {
                let entries = c.id.and_then(|id| closed.get(&id)).copied().unwrap_or(0);
                info!(client = %c.name, why = c.why, entries_closed = entries, "client no longer allowed; its entries are closed");
                k.audit.event(
                    "client_closed",
                    json!({"client": c.name, "why": c.why, "entries_closed": entries}),
                );
                applied.clients_closed.push(ClosedInfo {
                    name: c.name.clone(),
                    why: c.why.into(),
                    closed: entries,
                });
            }
            let named: Vec<u32> = change.closed_clients.iter().filter_map(|c| c.id).collect();
            let others: usize = closed
                .iter()
                .filter(|(id, _)| !named.contains(id))
                .map(|(_, n)| n)
                .sum();
            if others > 0 {
                info!(entries = others, "closed entries whose owners the state does not allow");
            }
        }
        for t in &change.closed_tunnels {
            let ended = k.gateway.close(&t.name, t.why);
            applied.tunnels_closed.push(ClosedInfo {
                name: t.name.clone(),
                why: t.why.into(),
                closed: usize::from(ended),
            });
        }
        applied
    }

    fn status(&self) -> Status {
        let s = &self.settings;
        let counters = self
            .gate
            .stats()
            .map(|stats| stats.into_iter().map(|(r, n)| (r.name().to_string(), n)).collect())
            .unwrap_or_default();
        let now = unix_now();
        let relay = self
            .knocks
            .as_ref()
            .and_then(|k| k.relay.as_ref())
            .map(RelayGateway::status);
        let (clients, tunnels, audit, tunnel_port) = match &self.knocks {
            Some(k) => {
                let snap = k.watcher.snapshot();
                (
                    ClientsStatus {
                        enrolled: snap.clients.len(),
                        allowed: snap.clients.iter().filter(|c| c.allowed_at(now)).count(),
                        problems: snap.problems.clone(),
                    },
                    k.gateway.status(),
                    k.audit.status(),
                    Some(k.gateway.port()),
                )
            }
            None => (
                ClientsStatus {
                    enrolled: 0,
                    allowed: 0,
                    problems: Vec::new(),
                },
                Vec::new(),
                Default::default(),
                None,
            ),
        };
        Status {
            pid: std::process::id(),
            version: crate::VERSION.into(),
            started: self.started,
            gate: s.gate.clone(),
            pin_dir: s.pin_dir.display().to_string(),
            interfaces: self.coverage.as_ref().map(|c| c.status(&self.gate)).unwrap_or_default(),
            uncovered: self.coverage.as_ref().map(|c| c.uncovered()).unwrap_or_default(),
            mode: format!("{:?}", s.mode).to_lowercase(),
            protect: gated_ports(s, self.knocks.is_some()).to_string(),
            state_dir: s.state_dir.display().to_string(),
            knocks: self.knocks.is_some(),
            entries: self.entries,
            knock_totals: self.events.knock_totals(),
            clients,
            tunnel_port,
            tunnels,
            portal: s.portal.as_ref().map(|p| p.listen.to_string()),
            audit,
            counters,
            cluster: self.node.as_ref().map(Node::status),
            relay,
            certificates: self
                .knocks
                .as_ref()
                .map_or_else(Vec::new, |k| k.certificates.iter().map(Served::status).collect()),
        }
    }
}

/// The next event from the cluster's link; never, outside a cluster.
async fn next_event(events: &mut Option<mpsc::Receiver<Event>>) -> Option<Event> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What the gate protects: the configured ports and, when the daemon
/// serves tunnels, the tunnel port and the range published ports are
/// leased from, and the relay's HTTP port; never the portal's port, which
/// is the gateway's public face.
fn gated_ports(settings: &Settings, tunnels: bool) -> PortSet {
    let mut ports = settings.protect.clone();
    if let Some(portal) = &settings.portal {
        ports = ports.without(Proto::Tcp, portal.listen.port());
    }
    if settings.fwknop_tcp {
        ports = ports.without(Proto::Tcp, settings.knock_udp_port);
    }
    if let (true, Some(relay)) = (tunnels, &settings.relay) {
        let port = relay.listen.port();
        ports.ranges.push((Proto::Tcp, PortRange { lo: port, hi: port }));
    }
    if tunnels {
        let tunnel = PortRange {
            lo: settings.tunnel_port,
            hi: settings.tunnel_port,
        };
        ports
            .ranges
            .extend([(Proto::Tcp, tunnel), (Proto::Tcp, settings.tunnel_ports)]);
    }
    ports
}

fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Sets or clears the gate's fwknop flag: whether base64 text on the knock
/// port is handed over.
fn set_fwknop_flag(gate: &Gate, on: bool) -> Result<(), GateError> {
    let mut cfg = gate.config()?;
    cfg.flags &= !CFG_FWKNOP;
    if on {
        cfg.flags |= CFG_FWKNOP;
    }
    gate.set_config(&cfg)
}
