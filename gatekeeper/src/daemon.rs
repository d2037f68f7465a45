//! The running daemon: loads or adopts the gate, configures it, then serves
//! the event ring and sweeps until told to stop. Stopping leaves the program
//! attached and the entries in place (fail closed); only `gatekeeper
//! detach` removes the gate, and the daemon exits when it sees that.

use std::{future::Future, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    config::{Settings, ephemeral_ports},
    events::{self, Kind},
    gate::{Gate, GateError},
    knocks::KnockService,
    loader::{self, LoaderError},
    pins::{self, PinError},
    portal::server::{Portal, PortalError},
    state::StateDir,
    sweeper,
};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("watching the event ring: {0}")]
    Ring(std::io::Error),
    #[error(
        "no interface named {0:?} in this network namespace: check `ip link`, or run inside the interface's namespace"
    )]
    NoSuchInterface(String),
    #[error(transparent)]
    Portal(#[from] PortalError),
    #[error("the portal verifies knocks with the state directory's keys: {0}; run `gatekeeper init` first")]
    PortalWithoutState(crate::state::StateError),
}

/// Why [`run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A signal: the gate stays attached.
    Stopped,
    /// The link pin vanished (`gatekeeper detach`): the gate is gone.
    Detached,
}

/// Counts of what the daemon has seen since it started.
#[derive(Debug, Default)]
struct Seen {
    knocks: u64,
    audit_samples: u64,
    unknown: u64,
}

/// Runs the daemon until `shutdown` completes or the gate is detached.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<Exit, DaemonError> {
    if !interface_exists(&settings.iface) {
        return Err(DaemonError::NoSuchInterface(settings.iface.clone()));
    }
    let dir = &settings.pin_dir;
    let _lock = pins::lock(dir)?;
    let mut knocks = match KnockService::start(&settings) {
        Ok(k) => Some(k),
        Err(e) if settings.portal.is_some() => return Err(DaemonError::PortalWithoutState(e)),
        Err(e) => {
            warn!(error = %e, "knock verification off: knocks are counted and logged, never accepted");
            None
        }
    };
    let (ask, mut asked) = mpsc::channel(1024);
    let portal = match &settings.portal {
        Some(p) => Some(Portal::prepare(p, &StateDir::new(&settings.state_dir), ask).await?),
        None => None,
    };
    pins::prepare(dir)?;
    let mut ebpf = loader::load_pinned(dir, settings.whitelist_capacity)?;
    let gate = Gate::open(dir)?;
    // Configure before attaching: an unconfigured program gates nothing.
    let gated = gated_ports(&settings);
    gate.set_protected(&gated)?;
    let ephemeral = ephemeral_ports();
    gate.set_config(&settings.map_config(ephemeral))?;
    let attachment = loader::attach(&mut ebpf, &settings.iface, dir, settings.xdp_mode)?;
    info!(
        event = "started",
        iface = %settings.iface,
        pin_dir = %dir.display(),
        attachment = attachment.name(),
        protect = %gated,
        mode = ?settings.mode,
        knock_udp_port = settings.knock_udp_port,
        ephemeral = format!("{}-{}", ephemeral.0, ephemeral.1),
        entries = gate.whitelist().map(|w| w.len()).unwrap_or(0),
        "gate up"
    );

    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for
    // as long as the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(gate.events()?, Interest::READABLE) }
        .map_err(|e| DaemonError::Ring(e.into()))?;
    let mut sweep = tokio::time::interval(settings.sweep_interval.max(Duration::from_millis(10)));
    let idle_ns = settings.idle_timeout.as_nanos().min(u64::MAX as u128) as u64;
    let link = dir.join(pins::LINK);
    let mut seen = Seen::default();
    if let Some((portal, listener)) = portal {
        tokio::spawn(Arc::new(portal).serve(listener));
    }
    if knocks.is_some() {
        let (state, port, heartbeat) = (
            settings.state_dir.clone(),
            settings.tunnel_port,
            settings.tunnel_heartbeat,
        );
        tokio::spawn(async move {
            if let Err(e) = crate::tunnels::service::run(state, port, heartbeat).await {
                warn!(error = %e, "the tunnel gateway stopped");
            }
        });
    }
    // Revocations must bite within a second.
    let mut registry_poll = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);

    let exit = loop {
        tokio::select! {
            _ = &mut shutdown => break Exit::Stopped,
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(DaemonError::Ring)?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    record(&item, &mut seen, &gate, knocks.as_mut());
                }
                guard.clear_ready();
                if let Some(k) = knocks.as_mut() {
                    k.flush();
                }
            }
            Some(ask) = asked.recv() => {
                if let Some(k) = knocks.as_mut() {
                    k.handle_portal(&gate, ask);
                    // Whatever else queued meanwhile, then one write for all.
                    while let Ok(ask) = asked.try_recv() {
                        k.handle_portal(&gate, ask);
                    }
                    k.flush();
                }
            }
            _ = registry_poll.tick() => {
                if let Some(k) = knocks.as_mut() {
                    k.follow_registry(&gate);
                }
            }
            _ = sweep.tick() => {
                if !link.exists() {
                    break Exit::Detached;
                }
                if let Err(e) = sweeper::sweep(&gate, idle_ns) {
                    warn!(error = %e, "sweep failed; retrying next tick");
                }
                if let Some(k) = knocks.as_mut() {
                    k.sweep(&gate);
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
    Ok(exit)
}

/// What the gate protects: the configured ports and, once the state is
/// initialised (so the tunnel gateway runs), the tunnel port and the range
/// published ports are leased from; never the portal's port, which is the
/// gateway's public face.
fn gated_ports(settings: &Settings) -> crate::spec::PortSet {
    let mut ports = settings.protect.clone();
    if let Some(portal) = &settings.portal {
        ports = ports.without(crate::spec::Proto::Tcp, portal.listen.port());
    }
    if StateDir::new(&settings.state_dir).initialised() {
        let tunnel = crate::spec::PortRange {
            lo: settings.tunnel_port,
            hi: settings.tunnel_port,
        };
        ports.ranges.extend([
            (crate::spec::Proto::Tcp, tunnel),
            (crate::spec::Proto::Tcp, settings.tunnel_ports),
        ]);
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

fn record(bytes: &[u8], seen: &mut Seen, gate: &Gate, knocks: Option<&mut KnockService>) {
    let Some(ev) = events::decode(bytes) else {
        seen.unknown += 1;
        return;
    };
    match ev.kind {
        Kind::Knock => {
            seen.knocks += 1;
            match knocks {
                Some(k) => k.handle(gate, &ev),
                None => {
                    info!(event = "knock_received", src = %ev.src, sport = ev.sport, dst = %ev.dst, dport = ev.dport,
                    proto = ev.proto, len = ev.payload.len(), total = seen.knocks, "knock received")
                }
            }
        }
        Kind::AuditSample(reason) => {
            seen.audit_samples += 1;
            info!(event = "audit_would_drop", src = %ev.src, sport = ev.sport, dst = %ev.dst, dport = ev.dport, proto = ev.proto,
                reason = reason.map(|r| r.name()).unwrap_or("unknown"), "audit mode passed a packet enforce mode would drop");
        }
    }
}
