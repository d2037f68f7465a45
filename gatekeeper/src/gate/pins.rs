//! Where a gate's pinned objects live: one directory per gate on bpffs
//! (`/sys/fs/bpf/gatekeeper/GATE/`, the gate named after its first
//! interface unless `--gate` names it), holding every map (named as in
//! `gatekeeper_common::maps`) and one XDP link per interface it spans
//! (`link-IFACE`). The pins outlive the daemon, so a crash neither opens the
//! gate nor forgets authorizations, and the CLI works with the daemon
//! stopped.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// The root of all gates' pins.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Each gate is pinned under here by name.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/gatekeeper";
/// The one link a gate pinned before it could span several interfaces.
pub const LEGACY_LINK: &str = "link";
/// An interface's link inside a pin directory: `link-IFACE`.
const LINK_PREFIX: &str = "link-";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Error)]
pub enum PinError {
    #[error(
        "no gate is pinned at {0}: start one with `gatekeeper run --iface IFACE`, or pass the --gate/--iface/--pin-dir it was started with"
    )]
    NotPinned(PathBuf),
    #[error("no gate is pinned under {DEFAULT_ROOT}: start one with `gatekeeper run --iface IFACE`, or pass --pin-dir")]
    NoGates,
    #[error("several gates are pinned ({0}): pick one with --gate or --iface")]
    Ambiguous(String),
    #[error("{path} is not on a BPF filesystem: use a directory under {BPFFS}")]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {BPFFS} failed (are you root?)")]
    Mount(#[source] io::Error),
    #[error(
        "another gatekeeper daemon (pid {pid}) is serving {what}: stop it first, one daemon serves one gate and one state directory"
    )]
    Busy { what: String, pid: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `name` as bpffs takes it: it refuses dots in names, which interface
/// names (a VLAN's `eth0.100`) may hold and never a colon.
fn pin_name(name: &str) -> String {
    name.replace('.', ":")
}

/// The pin directory of gate `name` under the default root.
pub fn dir_for_gate(name: &str) -> PathBuf {
    Path::new(DEFAULT_ROOT).join(pin_name(name))
}

/// The link pin of `iface` in a gate's pin directory.
pub fn link_path(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{}", pin_name(iface)))
}

/// The interfaces a gate has a pinned link for, in name order.
pub fn linked_ifaces(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some(e.file_name().to_str()?.strip_prefix(LINK_PREFIX)?.replace(':', ".")))
        .collect();
    names.sort();
    names
}

/// Gives the single link a gate pinned before it could span several
/// interfaces (`link`) its interface's name, so it is adopted like any
/// other. `iface` is the interface it was pinned for: the gate's name.
pub fn adopt_legacy_link(dir: &Path, iface: &str) -> Result<bool, PinError> {
    let legacy = dir.join(LEGACY_LINK);
    if !legacy.exists() {
        return Ok(false);
    }
    let named = link_path(dir, iface);
    std::fs::rename(&legacy, &named).map_err(|source| PinError::Io { path: named, source })?;
    Ok(true)
}

/// Whether any interface is still gated from `dir`.
pub fn has_links(dir: &Path) -> bool {
    dir.join(LEGACY_LINK).exists() || !linked_ifaces(dir).is_empty()
}

/// The pin directory a command means: `--pin-dir`, else `--gate`, else the
/// gate that spans `--iface` (or is named after it), else the only gate
/// pinned under the default root.
pub fn resolve(gate: Option<&str>, iface: Option<&str>, pin_dir: Option<&Path>) -> Result<PathBuf, PinError> {
    let dir = match (pin_dir, gate, iface) {
        (Some(d), _, _) => d.to_path_buf(),
        (None, Some(g), _) => dir_for_gate(g),
        (None, None, Some(i)) => gate_spanning(i)?.unwrap_or_else(|| dir_for_gate(i)),
        (None, None, None) => only_gate()?,
    };
    if !dir.join(gatekeeper_common::maps::WHITELIST).exists() {
        return Err(PinError::NotPinned(dir));
    }
    Ok(dir)
}

/// The gate under the default root with a link on `iface`, if any.
fn gate_spanning(iface: &str) -> Result<Option<PathBuf>, PinError> {
    Ok(gates()?.into_iter().find(|dir| link_path(dir, iface).exists()))
}

/// Every gate's pin directory under the default root.
fn gates() -> Result<Vec<PathBuf>, PinError> {
    let entries = match std::fs::read_dir(DEFAULT_ROOT) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PinError::Io {
                path: DEFAULT_ROOT.into(),
                source,
            });
        }
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    Ok(dirs)
}

fn only_gate() -> Result<PathBuf, PinError> {
    let mut dirs = gates()?;
    match dirs.len() {
        0 => Err(PinError::NoGates),
        1 => Ok(dirs.remove(0)),
        _ => {
            let names: Vec<String> = dirs
                .iter()
                .filter_map(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            Err(PinError::Ambiguous(names.join(", ")))
        }
    }
}

fn is_bpffs(path: &Path) -> Result<bool, PinError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| PinError::Io {
        path: path.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: statfs fills `buf`; `c` is a valid NUL-terminated path.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(PinError::Io {
            path: path.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(buf.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on bpffs, mounting bpffs at [`BPFFS`] when the
/// directory is meant to live there and nothing is mounted yet.
pub fn prepare(dir: &Path) -> Result<(), PinError> {
    if dir.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS))? {
        mount_bpffs()?;
    }
    std::fs::create_dir_all(dir).map_err(|source| PinError::Io {
        path: dir.into(),
        source,
    })?;
    if !is_bpffs(dir)? {
        return Err(PinError::NotBpffs { path: dir.into() });
    }
    Ok(())
}

fn mount_bpffs() -> Result<(), PinError> {
    let target = CString::new(BPFFS).map_err(|e| PinError::Mount(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; no mount data.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(PinError::Mount(io::Error::last_os_error()));
    }
    Ok(())
}

/// Where daemons take their per-gate locks (bpffs holds no regular files).
const LOCK_DIR: &str = "/run/gatekeeper";

/// Held by the daemon serving a pin directory; the kernel releases it when
/// the process dies, however it dies.
#[derive(Debug)]
pub struct DaemonLock {
    _file: std::fs::File,
}

/// Takes the lock for the pin directory `dir`, so two daemons never serve
/// one gate.
pub fn lock(dir: &Path) -> Result<DaemonLock, PinError> {
    std::fs::create_dir_all(LOCK_DIR).map_err(|source| PinError::Io {
        path: LOCK_DIR.into(),
        source,
    })?;
    let name = dir.to_string_lossy().replace('/', "_");
    lock_file(
        &Path::new(LOCK_DIR).join(format!("{name}.lock")),
        &dir.display().to_string(),
    )
}

/// Takes an exclusive lock on the file at `path` for `what`, writing our
/// pid into it; fails naming the holder's pid when another process has it.
pub fn lock_file(path: &Path, what: &str) -> Result<DaemonLock, PinError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;

    let io = |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        return Err(PinError::Busy {
            what: what.to_string(),
            pid: pid.trim().to_string(),
        });
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DaemonLock { _file: file })
}

/// Removes a gate's pins: the links first (each detaches its program once
/// no process holds it), then every map, then the directory. Returns
/// whether any interface was gated.
pub fn unpin_all(dir: &Path) -> Result<bool, PinError> {
    let had_link = has_links(dir);
    let links = linked_ifaces(dir).into_iter().map(|i| link_path(dir, &i));
    let maps = std::iter::once(LEGACY_LINK)
        .chain(gatekeeper_common::maps::ALL)
        .map(|name| dir.join(name));
    for path in links.chain(maps) {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(PinError::Io { path, source }),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PinError::Io {
                path: dir.into(),
                source,
            });
        }
    }
    Ok(had_link)
}

/// Removes the link of `iface` alone, which takes the gate off that
/// interface; the maps stay. Returns whether there was one.
pub fn unpin_link(dir: &Path, iface: &str) -> Result<bool, PinError> {
    let path = link_path(dir, iface);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(PinError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip_through_what_bpffs_takes() {
        let dir = std::env::temp_dir().join(format!("gk-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for iface in ["eth0.100", "wg0", "br-lan"] {
            let link = link_path(&dir, iface);
            assert!(!link.file_name().unwrap().to_str().unwrap().contains('.'), "{link:?}");
            std::fs::write(link, b"").unwrap();
        }
        std::fs::write(dir.join(LEGACY_LINK), b"").unwrap();
        std::fs::write(dir.join("WHITELIST"), b"").unwrap();
        assert_eq!(linked_ifaces(&dir), ["br-lan", "eth0.100", "wg0"]);
        assert!(adopt_legacy_link(&dir, "eth1").unwrap());
        assert_eq!(linked_ifaces(&dir), ["br-lan", "eth0.100", "eth1", "wg0"]);
        assert_eq!(dir_for_gate("eth0.100"), Path::new("/sys/fs/bpf/gatekeeper/eth0:100"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
