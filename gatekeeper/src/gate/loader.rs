//! Loading the embedded XDP object with its maps pinned (or adopted from an
//! earlier run), attaching it, and replacing a pinned attachment in place so
//! a restart never leaves the interface ungated.

use std::path::Path;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapData,
    programs::{ProgramError, Xdp, XdpMode, links::FdLink, links::PinnedLink},
};
use gatekeeper_common::maps::{self as names};
use thiserror::Error;
use tracing::warn;

use super::{
    maps::{Gate, GateError},
    pins,
};

/// The XDP object built from `gatekeeper-ebpf` by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gatekeeper.bpf.o"));
/// The program's name inside [`OBJECT`].
pub const PROGRAM: &str = "gatekeeper";

#[derive(Debug, Error)]
pub enum LoaderError {
    #[error("loading the XDP object")]
    Load(#[from] EbpfError),
    #[error("the XDP object has no program named {PROGRAM}")]
    MissingProgram,
    #[error("loading the XDP program into the kernel")]
    Program(#[source] ProgramError),
    #[error("attaching to {iface} ({mode})")]
    Attach {
        iface: String,
        mode: &'static str,
        source: ProgramError,
    },
    #[error("pinning the XDP link at {path}: {reason}")]
    PinLink { path: String, reason: String },
    #[error(
        "the pinned map {path} has the layout of another version ({found}; this one needs {needed}), and its entries cannot be carried over: `gatekeeper detach --pin-dir {dir}` removes the old gate (the ports are open until the new one starts), then start again"
    )]
    Incompatible {
        path: String,
        dir: String,
        found: String,
        needed: String,
    },
    #[error("counting the whitelist into a new PRESENCE map")]
    Seed(#[source] Box<GateError>),
    #[error("reading the pinned map {path}")]
    Pinned {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("removing the outdated pinned map {path}")]
    Unpin {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What this version's program needs of one pinned map.
struct Layout {
    name: &'static str,
    key: usize,
    value: usize,
    /// `None`: set by the operator (the whitelist's capacity).
    entries: Option<u32>,
    /// Holds what the gate must not forget (entries, prefixes, nonces);
    /// the others the daemon writes afresh at every start.
    keeps_state: bool,
}

impl Layout {
    fn describe(key: u32, value: u32, entries: u32) -> String {
        format!("key {key} B, value {value} B, {entries} entries")
    }
}

const LAYOUTS: [Layout; 13] = {
    use std::mem::size_of;

    use gatekeeper_common::{
        decide::STATS_LEN,
        maps::{
            ALLOWLIST_MAX, AllowValue, Config, EVENTS_BYTES, IFACE_NAME_LEN, KEY_ID_LEN, KNOCK_KEYS_MAX,
            KNOCK_RATE_MAX, KnockBucket, MAX_IFACES, NONCE_LEN, PRESENCE_SLOTS, PROTECTED_WORDS, REPLAY_MAX,
            TAG_KEY_SLOTS, TagKey, WhitelistKey, WhitelistValue,
        },
    };
    const fn layout(name: &'static str, key: usize, value: usize, entries: Option<u32>, keeps_state: bool) -> Layout {
        Layout {
            name,
            key,
            value,
            entries,
            keeps_state,
        }
    }
    [
        layout(
            names::WHITELIST,
            size_of::<WhitelistKey>(),
            size_of::<WhitelistValue>(),
            None,
            true,
        ),
        // An LPM key: the prefix length, then the address.
        layout(
            names::ALLOWLIST,
            4 + 16,
            size_of::<AllowValue>(),
            Some(ALLOWLIST_MAX),
            true,
        ),
        layout(names::PROTECTED, 4, 8, Some(PROTECTED_WORDS), false),
        layout(names::CONFIG, 4, size_of::<Config>(), Some(1), false),
        layout(names::EVENTS, 0, 0, Some(EVENTS_BYTES), false),
        layout(
            names::KNOCK_RATE,
            16,
            size_of::<KnockBucket>(),
            Some(KNOCK_RATE_MAX),
            false,
        ),
        layout(names::STATS, 4, 8, Some(STATS_LEN * MAX_IFACES), false),
        layout(names::REPLAY, NONCE_LEN, 8, Some(REPLAY_MAX), true),
        layout(
            names::KNOCK_KEYS,
            KEY_ID_LEN,
            size_of::<KnockBucket>(),
            Some(KNOCK_KEYS_MAX),
            false,
        ),
        layout(names::KNOCK_BUDGET, 4, size_of::<KnockBucket>(), Some(1), false),
        layout(names::IFACES, 4, IFACE_NAME_LEN, Some(MAX_IFACES), false),
        // Rebuilt from the whitelist when replaced (see `load_pinned`).
        layout(names::PRESENCE, 4, 8, Some(PRESENCE_SLOTS), false),
        layout(
            names::KNOCK_TAG_KEYS,
            4,
            size_of::<TagKey>(),
            Some(TAG_KEY_SLOTS),
            false,
        ),
    ]
};

/// Makes the maps pinned under `pin_dir` fit this version's program (an
/// upgrade, a gate pinned by an older release): a map whose layout differs
/// and that the daemon rewrites at start anyway (config, counters, buckets)
/// is unpinned, so a fresh one takes its place; one that holds state
/// (whitelist, allowlist, replay cache) is refused, naming the way out.
/// Returns the maps replaced.
pub fn retire_outdated_pins(pin_dir: &Path) -> Result<Vec<&'static str>, LoaderError> {
    let mut replaced = Vec::new();
    for l in &LAYOUTS {
        let path = pin_dir.join(l.name);
        if !path.exists() {
            continue;
        }
        let shown = path.display().to_string();
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|source| LoaderError::Pinned {
                path: shown.clone(),
                source,
            })?;
        let fits = info.key_size() as usize == l.key
            && info.value_size() as usize == l.value
            && l.entries.is_none_or(|n| n == info.max_entries());
        if fits {
            continue;
        }
        if l.keeps_state {
            return Err(LoaderError::Incompatible {
                path: shown,
                dir: pin_dir.display().to_string(),
                found: Layout::describe(info.key_size(), info.value_size(), info.max_entries()),
                needed: Layout::describe(l.key as u32, l.value as u32, l.entries.unwrap_or(info.max_entries())),
            });
        }
        std::fs::remove_file(&path).map_err(|source| LoaderError::Unpin { path: shown, source })?;
        replaced.push(l.name);
    }
    Ok(replaced)
}

/// How to attach: native (driver) with a fallback to generic, or one of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeChoice {
    #[default]
    Auto,
    Driver,
    Skb,
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// A pinned link from an earlier run now runs this program.
    Adopted,
    Native,
    Generic,
}

impl Attachment {
    pub const fn name(self) -> &'static str {
        match self {
            Attachment::Adopted => "adopted pinned link",
            Attachment::Native => "native (driver)",
            Attachment::Generic => "generic (skb)",
        }
    }
}

/// One interface's instance of the program: every instance shares the
/// gate's maps, and counts under its own slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Instance {
    /// The interface's counters in STATS (see `gate::maps::Gate::claim_slot`).
    pub slot: u32,
    /// The device hands over bare IP packets (WireGuard, GRE, IPIP, SIT),
    /// not Ethernet frames.
    pub bare_ip: bool,
}

/// Loads an instance of the object with every map pinned under `pin_dir`:
/// maps already pinned there are reused with their contents (after
/// [`retire_outdated_pins`]), missing ones are created and pinned. The
/// program is loaded into the kernel but not attached.
pub fn load_pinned(pin_dir: &Path, whitelist_capacity: u32, instance: Instance) -> Result<Ebpf, LoaderError> {
    for name in retire_outdated_pins(pin_dir)? {
        warn!(map = name, pin_dir = %pin_dir.display(), "a pinned map had another version's layout; replaced by a fresh one");
    }
    let bare_ip = u8::from(instance.bare_ip);
    let mut loader = EbpfLoader::new();
    loader
        .override_global("IFACE_SLOT", &instance.slot, true)
        .override_global("BARE_IP", &bare_ip, true);
    loader.map_max_entries(names::WHITELIST, whitelist_capacity);
    for name in names::ALL {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let counted = pin_dir.join(names::PRESENCE).exists();
    let mut ebpf = loader.load(OBJECT)?;
    program(&mut ebpf)?.load().map_err(LoaderError::Program)?;
    if !counted {
        // A fresh PRESENCE beside an older whitelist: count its entries
        // before the program is attached, or their sources would be
        // taken for strangers.
        let seeded = Gate::open(pin_dir)
            .and_then(|g| g.presence_seed())
            .map_err(|e| LoaderError::Seed(Box::new(e)))?;
        if seeded > 0 {
            warn!(
                entries = seeded,
                "counted the existing whitelist entries into a new PRESENCE map"
            );
        }
    }
    Ok(ebpf)
}

/// Loads the object with private, unpinned maps (for tests and benchmarks
/// that drive the program with `BPF_PROG_TEST_RUN`).
pub fn load_private() -> Result<Ebpf, LoaderError> {
    let mut ebpf = EbpfLoader::new().load(OBJECT)?;
    program(&mut ebpf)?.load().map_err(LoaderError::Program)?;
    Ok(ebpf)
}

pub fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoaderError> {
    ebpf.program_mut(PROGRAM)
        .ok_or(LoaderError::MissingProgram)?
        .try_into()
        .map_err(LoaderError::Program)
}

/// Attaches the loaded program to `iface` and pins the link in `pin_dir`.
/// When that interface's link is already pinned (an earlier daemon), the
/// new program replaces the old one inside it atomically, so no packet
/// ever meets an ungated NIC.
/// Loads `instance` over the maps pinned under `pin_dir` and attaches it
/// to `iface`, its link pinned there too; the link keeps the program, so
/// nothing loaded needs to outlive this call.
pub fn attach_instance(
    pin_dir: &Path,
    whitelist_capacity: u32,
    instance: Instance,
    iface: &str,
    choice: XdpModeChoice,
) -> Result<Attachment, LoaderError> {
    let mut ebpf = load_pinned(pin_dir, whitelist_capacity, instance)?;
    attach(&mut ebpf, iface, pin_dir, choice)
}

pub fn attach(ebpf: &mut Ebpf, iface: &str, pin_dir: &Path, choice: XdpModeChoice) -> Result<Attachment, LoaderError> {
    let prog = program(ebpf)?;
    let link_path = pins::link_path(pin_dir, iface);
    if link_path.exists() {
        match adopt(prog, &link_path) {
            Ok(()) => return Ok(Attachment::Adopted),
            Err(e) => {
                warn!(link = %link_path.display(), error = %e, "pinned link is stale; attaching afresh");
                let _ = std::fs::remove_file(&link_path);
            }
        }
    }
    let modes: &[(XdpMode, Attachment)] = match choice {
        XdpModeChoice::Auto => &[
            (XdpMode::Driver, Attachment::Native),
            (XdpMode::Skb, Attachment::Generic),
        ],
        XdpModeChoice::Driver => &[(XdpMode::Driver, Attachment::Native)],
        XdpModeChoice::Skb => &[(XdpMode::Skb, Attachment::Generic)],
    };
    let mut last = None;
    for &(mode, attachment) in modes {
        match prog.attach(iface, mode) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(LoaderError::Program)?;
                let fd = FdLink::try_from(link).map_err(|e| LoaderError::PinLink {
                    path: link_path.display().to_string(),
                    reason: e.to_string(),
                })?;
                fd.pin(&link_path).map_err(|e| LoaderError::PinLink {
                    path: link_path.display().to_string(),
                    reason: e.to_string(),
                })?;
                return Ok(attachment);
            }
            Err(source) => {
                if choice == XdpModeChoice::Auto {
                    warn!(iface, mode = attachment.name(), error = %source, "attach failed");
                }
                last = Some(LoaderError::Attach {
                    iface: iface.to_string(),
                    mode: attachment.name(),
                    source,
                });
            }
        }
    }
    Err(last.unwrap_or(LoaderError::MissingProgram))
}

fn adopt(prog: &mut Xdp, link_path: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(link_path).map_err(|e| e.to_string())?;
    let fd = FdLink::from(pinned);
    let link = aya::programs::xdp::XdpLink::try_from(fd).map_err(|e| e.to_string())?;
    let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
    // The pin stays the link's only holder, so unpinning it (`gatekeeper
    // detach`) takes the program off at once, whoever loaded it.
    drop(prog.take_link(id).map_err(|e| e.to_string())?);
    Ok(())
}
