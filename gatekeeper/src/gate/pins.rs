//! Where a gate's pinned objects live: one directory per interface on bpffs,
//! holding every map (named as in `gatekeeper_common::maps`) and the XDP
//! link. The pins outlive the daemon, so a crash neither opens the gate nor
//! forgets authorizations, and the CLI works with the daemon stopped.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// The root of all gates' pins.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Each interface's gate is pinned under here by name.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/gatekeeper";
/// The pinned XDP link inside a pin directory.
pub const LINK: &str = "link";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Error)]
pub enum PinError {
    #[error(
        "no gate is pinned at {0}: start one with `gatekeeper run --iface IFACE`, or pass the --iface/--pin-dir it was started with"
    )]
    NotPinned(PathBuf),
    #[error("no gate is pinned under {DEFAULT_ROOT}: start one with `gatekeeper run --iface IFACE`, or pass --pin-dir")]
    NoGates,
    #[error("several gates are pinned ({0}): pick one with --iface")]
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

/// The pin directory for `iface` under the default root.
pub fn dir_for_iface(iface: &str) -> PathBuf {
    Path::new(DEFAULT_ROOT).join(iface)
}

/// The pin directory a command means: `--pin-dir`, else `--iface`, else the
/// only gate pinned under the default root.
pub fn resolve(iface: Option<&str>, pin_dir: Option<&Path>) -> Result<PathBuf, PinError> {
    let dir = match (pin_dir, iface) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(i)) => dir_for_iface(i),
        (None, None) => only_gate()?,
    };
    if !dir.join(gatekeeper_common::maps::WHITELIST).exists() {
        return Err(PinError::NotPinned(dir));
    }
    Ok(dir)
}

fn only_gate() -> Result<PathBuf, PinError> {
    let entries = match std::fs::read_dir(DEFAULT_ROOT) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(PinError::NoGates),
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

/// Removes a gate's pins: the link first (which detaches the program once no
/// process holds it), then every map, then the directory.
pub fn unpin_all(dir: &Path) -> Result<bool, PinError> {
    let link = dir.join(LINK);
    let had_link = link.exists();
    for name in std::iter::once(LINK).chain(gatekeeper_common::maps::ALL) {
        let path = dir.join(name);
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
