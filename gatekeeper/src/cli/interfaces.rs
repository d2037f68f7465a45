//! `gatekeeper attach|detach`: which interfaces a gate spans.

use anyhow::{Context, Result, bail};
use clap::Args;
use gatekeeper::gate::{
    Gate, interfaces,
    loader::{self, Instance, XdpModeChoice},
    pins,
};

use super::Target;

/// Put a running gate on one more interface.
///
/// The interface gets its own instance of the program (its own counters,
/// and its device's framing: Ethernet, or bare IP for WireGuard, GRE and
/// other tunnels) over the gate's maps, so every entry and every knock
/// counts on it at once. Its link is pinned beside the gate's others, and
/// a running daemon shows it in `status` and sweeps for it like the rest.
///
/// Example: gatekeeper attach wg0 --gate eth0
#[derive(Args, Debug)]
pub struct Attach {
    /// The interface to gate.
    #[arg(value_name = "IFACE")]
    iface: String,
    /// The gate's name [default: the only gate pinned].
    #[arg(long, value_name = "GATE")]
    gate: Option<String>,
    /// Pin directory the gate was started with (overrides --gate).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<std::path::PathBuf>,
    /// auto tries native (driver) XDP and falls back to generic (skb).
    #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
    xdp_mode: XdpModeChoice,
}

/// Take the gate off an interface, or remove it entirely.
///
/// With --iface on a gate that spans other interfaces, only that
/// interface's link goes: it is open to everyone again; the others stay
/// gated with every entry. Otherwise the whole gate goes: its links and
/// every map, which opens its interfaces and forgets every whitelist entry;
/// a running daemon notices within one sweep interval and exits.
#[derive(Args, Debug)]
pub struct Detach {
    #[command(flatten)]
    target: Target,
}

pub fn attach(a: Attach) -> Result<()> {
    let dir = pins::resolve(a.gate.as_deref(), None, a.pin_dir.as_deref())?;
    let present = interfaces::list()?;
    let Some(iface) = present.iter().find(|i| i.name == a.iface) else {
        bail!(
            "no interface named {:?} in this network namespace: check `ip link`, or run inside the interface's namespace",
            a.iface
        );
    };
    if pins::link_path(&dir, &iface.name).exists() {
        println!("{} is already gated by {}", iface.name, dir.display());
        return Ok(());
    }
    let gate = Gate::open(&dir)?;
    let slot = gate.claim_slot(&iface.name)?;
    let instance = Instance {
        slot,
        bare_ip: iface.bare_ip,
    };
    let how = loader::attach_instance(&dir, gate.whitelist_capacity()?, instance, &iface.name, a.xdp_mode)
        .with_context(|| format!("attaching the gate at {} to {}", dir.display(), iface.name))?;
    println!(
        "attached: {} now gated by {} ({}{})",
        iface.name,
        dir.display(),
        how.name(),
        if iface.bare_ip { ", bare IP packets" } else { "" }
    );
    Ok(())
}

pub fn detach(d: Detach) -> Result<()> {
    let dir = d.target.resolve()?;
    let spans = pins::linked_ifaces(&dir);
    if let Some(iface) = &d.target.iface
        && !spans.contains(iface)
        && !spans.is_empty()
    {
        bail!(
            "the gate at {} does not span {iface} (it spans {}): name one of those, or leave out --iface to remove the whole gate",
            dir.display(),
            spans.join(", ")
        );
    }
    if let Some(iface) = &d.target.iface
        && spans.iter().any(|i| i != iface)
    {
        pins::unpin_link(&dir, iface)?;
        Gate::open(&dir)?.release_slot(iface)?;
        let rest: Vec<&str> = spans.iter().filter(|i| *i != iface).map(String::as_str).collect();
        println!(
            "detached {iface}: it is open again; {} stays gated by {}",
            rest.join(", "),
            dir.display()
        );
        return Ok(());
    }
    let had_link = gatekeeper::gate::unpin_all(&dir)?;
    if had_link {
        println!("detached: removed the gate and its maps at {}", dir.display());
    } else {
        println!("removed the maps at {} (no program was attached)", dir.display());
    }
    Ok(())
}
