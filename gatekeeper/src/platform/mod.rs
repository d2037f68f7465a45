//! What differs between the systems the client runs on (Linux, macOS,
//! Windows), in one place, so the rest of the client reads the same on
//! each:
//!
//! - private files: on Unix mode 0600, never opened through a symbolic
//!   link; on Windows an ACL granting the current user alone, with the
//!   folder's inherited entries cut ([`acl`]);
//! - the host's name, for the audit log and enrollment requests;
//! - raw sockets: who may open them, and that Windows sends no raw TCP;
//! - the operator's stop: SIGTERM or Ctrl-C on Unix; Ctrl-C, Ctrl-Break,
//!   the console closing or the system shutting down on Windows;
//! - [`keyring`]: where a typed passphrase is kept for a while (the Linux
//!   kernel's user keyring; nowhere on the other systems).

#[cfg(windows)]
mod acl;
pub mod keyring;

use std::{
    fs::{File, OpenOptions},
    io,
    path::Path,
};

/// Creates `path` for writing, readable by this user alone; fails if
/// anything, a symbolic link included, is there already.
pub fn create_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW).mode(0o600);
    }
    let file = options.open(path)?;
    if let Err(e) = restrict(&file, path) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

/// Opens `path` for appending, creating it if missing, readable by this
/// user alone.
pub fn append_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options.open(path)?;
    restrict(&file, path)?;
    Ok(file)
}

/// Leaves the open file `file` at `path` to its owner alone.
#[cfg(unix)]
fn restrict(file: &File, _path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

#[cfg(windows)]
fn restrict(_file: &File, path: &Path) -> io::Result<()> {
    acl::owner_only(path)
}

/// Makes a rename or link in `path`'s directory durable.
#[cfg(unix)]
pub fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// Windows offers no directory handle to sync; NTFS journals the rename
/// itself.
#[cfg(windows)]
pub fn sync_dir(_path: &Path) -> io::Result<()> {
    Ok(())
}

/// This host's name.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Whether this system lets a program send TCP segments it wrote itself.
/// Windows refuses raw TCP to every program, Administrators included.
pub const RAW_TCP: bool = cfg!(not(windows));

/// Who may open a raw socket here, for the error that says so.
pub const RAW_SOCKET_NEEDS: &str = if cfg!(target_os = "linux") {
    "root or CAP_NET_RAW (setcap cap_net_raw+ep gatekeeper)"
} else if cfg!(windows) {
    "an Administrator"
} else {
    "root"
};

/// Resolves when the operator stops the program: SIGTERM or Ctrl-C on
/// Unix; Ctrl-C, Ctrl-Break, the console closing or shutdown on Windows.
pub async fn stopped() -> io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => Ok(()),
            interrupted = tokio::signal::ctrl_c() => interrupted,
        }
    }
    #[cfg(windows)]
    {
        use tokio::signal::windows::{ctrl_break, ctrl_close, ctrl_shutdown};
        let (mut brk, mut close, mut shutdown) = (ctrl_break()?, ctrl_close()?, ctrl_shutdown()?);
        tokio::select! {
            _ = brk.recv() => Ok(()),
            _ = close.recv() => Ok(()),
            _ = shutdown.recv() => Ok(()),
            interrupted = tokio::signal::ctrl_c() => interrupted,
        }
    }
}
