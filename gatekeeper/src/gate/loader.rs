//! Loading the embedded XDP object with its maps pinned (or adopted from an
//! earlier run), attaching it, and replacing a pinned attachment in place so
//! a restart never leaves the interface ungated.

use std::path::Path;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{ProgramError, Xdp, XdpMode, links::FdLink, links::PinnedLink},
};
use gatekeeper_common::maps::{self as names};
use thiserror::Error;
use tracing::warn;

use super::pins;

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

/// Loads the object with every map pinned under `pin_dir`: maps already
/// pinned there are reused with their contents, missing ones are created
/// and pinned. The program is loaded into the kernel but not attached.
pub fn load_pinned(pin_dir: &Path, whitelist_capacity: u32) -> Result<Ebpf, LoaderError> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(names::WHITELIST, whitelist_capacity);
    for name in names::ALL {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let mut ebpf = loader.load(OBJECT)?;
    program(&mut ebpf)?.load().map_err(LoaderError::Program)?;
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

/// Attaches the loaded program to `iface` and pins the link. When a link is
/// already pinned (an earlier daemon), the new program replaces the old one
/// inside that link atomically, so no packet ever meets an ungated NIC.
pub fn attach(ebpf: &mut Ebpf, iface: &str, pin_dir: &Path, choice: XdpModeChoice) -> Result<Attachment, LoaderError> {
    let prog = program(ebpf)?;
    let link_path = pin_dir.join(pins::LINK);
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
    prog.attach_to_link(link).map_err(|e| e.to_string())?;
    Ok(())
}
