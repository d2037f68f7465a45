//! Which interfaces the gate spans. Every interface gets its own instance
//! of the program (its own counter slot, and its device's framing), all
//! sharing the gate's maps, so a knock through one interface opens the
//! tuple on every other. The daemon attaches the interfaces it was given
//! and adopts every link already pinned (it keeps gating what an earlier
//! run gated: fail closed); then it keeps looking: an interface that
//! receives traffic for the host but is not gated is named in the log and
//! in `status`, and covered at once with `--cover all`; an interface that
//! is gone, or whose link `gatekeeper detach --iface` removed, is let go.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tracing::{info, warn};

use super::DaemonError;
use crate::{
    control::InterfaceStatus,
    error_chain,
    gate::{
        Gate,
        interfaces::{self, Interface},
        loader::{self, Instance, XdpModeChoice},
        pins,
    },
    store::config::{Cover, Settings},
};

pub struct Coverage {
    dir: PathBuf,
    capacity: u32,
    mode: XdpModeChoice,
    cover: Cover,
    /// The interfaces this daemon attached or adopted.
    attached: BTreeSet<String>,
    /// Interfaces receiving traffic for the host that the gate does not
    /// span, as last reported.
    uncovered: BTreeSet<String>,
}

impl Coverage {
    /// Attaches every listed interface and adopts every pinned link.
    pub fn start(settings: &Settings, gate: &Gate) -> Result<Coverage, DaemonError> {
        let mut c = Coverage {
            dir: settings.pin_dir.clone(),
            capacity: settings.whitelist_capacity,
            mode: settings.xdp_mode,
            cover: settings.cover,
            attached: BTreeSet::new(),
            uncovered: BTreeSet::new(),
        };
        let present = list()?;
        for name in &settings.ifaces {
            let iface = present
                .iter()
                .find(|i| &i.name == name)
                .ok_or_else(|| DaemonError::NoSuchInterface(name.clone()))?;
            c.attach(gate, iface)?;
        }
        for name in pins::linked_ifaces(&c.dir) {
            if c.attached.contains(&name) {
                continue;
            }
            match present.iter().find(|i| i.name == name) {
                Some(iface) => {
                    c.attach(gate, iface)?;
                    warn!(iface = %name, "still gated from an earlier start though not listed now; `gatekeeper detach --iface {name}` takes the gate off it");
                }
                None => c.let_go(gate, &name, "it no longer exists"),
            }
        }
        // Slots of interfaces whose links went while no daemon ran.
        for (_, name) in gate.iface_slots()? {
            if !pins::link_path(&c.dir, &name).exists() {
                gate.release_slot(&name)?;
            }
        }
        Ok(c)
    }

    fn attach(&mut self, gate: &Gate, iface: &Interface) -> Result<(), DaemonError> {
        let slot = gate.claim_slot(&iface.name)?;
        let instance = Instance {
            slot,
            bare_ip: iface.bare_ip,
        };
        let how = loader::attach_instance(&self.dir, self.capacity, instance, &iface.name, self.mode)?;
        info!(iface = %iface.name, kind = iface.kind.as_deref().unwrap_or("-"), bare_ip = iface.bare_ip, slot, attachment = how.name(), "gate attached");
        self.attached.insert(iface.name.clone());
        Ok(())
    }

    /// Forgets `name`: its link, its slot, its instance.
    fn let_go(&mut self, gate: &Gate, name: &str, why: &str) {
        self.attached.remove(name);
        if let Err(e) = pins::unpin_link(&self.dir, name) {
            warn!(iface = name, error = %error_chain(&e), "removing the link failed");
        }
        if let Err(e) = gate.release_slot(name) {
            warn!(iface = name, error = %error_chain(&e), "releasing the counter slot failed");
        }
        info!(iface = name, why, "the gate no longer spans this interface");
    }

    /// Looks at the interfaces again: lets go of what left, names what
    /// is not gated, and covers it with `--cover all`.
    pub fn look(&mut self, gate: &Gate) {
        let present = match list() {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %error_chain(&e), "listing the interfaces failed; looking again later");
                return;
            }
        };
        let linked: BTreeSet<String> = pins::linked_ifaces(&self.dir).into_iter().collect();
        let known: BTreeSet<String> = linked.iter().chain(self.attached.iter()).cloned().collect();
        for name in known {
            if !present.iter().any(|i| i.name == name) {
                self.let_go(gate, &name, "it no longer exists");
            } else if !linked.contains(&name) {
                // `detach --iface` unpinned it, which took the gate off.
                self.attached.remove(&name);
                info!(iface = %name, "the gate was detached from this interface");
            }
        }
        let linked: BTreeSet<String> = pins::linked_ifaces(&self.dir).into_iter().collect();
        let uncovered: BTreeSet<String> = present
            .iter()
            .filter(|i| i.receives_local() && !linked.contains(&i.name) && !self.attached.contains(&i.name))
            .map(|i| i.name.clone())
            .collect();
        for name in uncovered.difference(&self.uncovered) {
            let kind = present
                .iter()
                .find(|i| &i.name == name)
                .and_then(|i| i.kind.clone())
                .unwrap_or_else(|| "device".into());
            warn!(iface = %name, kind, "receives traffic for this host but is not gated: protected ports can be reached through it (`gatekeeper attach {name}`, or run with --cover all)");
        }
        self.uncovered = uncovered;
        if self.cover == Cover::All {
            for name in self.uncovered.clone() {
                let Some(iface) = present.iter().find(|i| i.name == name) else {
                    continue;
                };
                match self.attach(gate, iface) {
                    Ok(()) => {
                        self.uncovered.remove(&name);
                    }
                    Err(e) => {
                        warn!(iface = %name, error = %error_chain(&e), "covering the interface failed; trying again")
                    }
                }
            }
        }
    }

    /// The interfaces the gate spans, for `status`, each with how its
    /// program runs as the kernel reports it.
    pub fn status(&self, gate: &Gate) -> Vec<InterfaceStatus> {
        let by_iface = gate.stats_by_iface().unwrap_or_default();
        let present = list().unwrap_or_default();
        pins::linked_ifaces(&self.dir)
            .into_iter()
            .map(|name| {
                let attachment = match present.iter().find(|i| i.name == name).map(|i| i.xdp) {
                    Some(Some(mode)) if self.attached.contains(&name) => mode.to_string(),
                    Some(Some(mode)) => format!("{mode}, attached by `gatekeeper attach`"),
                    Some(None) => "no program runs: the link is stale".to_string(),
                    None => "the interface is gone".to_string(),
                };
                let counters = by_iface
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, c)| {
                        c.iter()
                            .filter(|(_, n)| *n > 0)
                            .map(|(r, n)| (r.name().to_string(), *n))
                            .collect()
                    })
                    .unwrap_or_default();
                InterfaceStatus {
                    name,
                    attachment,
                    counters,
                }
            })
            .collect()
    }

    /// Interfaces receiving traffic for the host that the gate does not span.
    pub fn uncovered(&self) -> Vec<String> {
        // Less whatever `gatekeeper attach` covered since the last look.
        self.uncovered
            .iter()
            .filter(|name| !pins::link_path(&self.dir, name).exists())
            .cloned()
            .collect()
    }
}

fn list() -> Result<Vec<Interface>, DaemonError> {
    interfaces::list().map_err(DaemonError::Interfaces)
}
