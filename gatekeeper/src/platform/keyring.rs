//! Where a passphrase typed at the prompt is kept for a while, so the
//! commands that follow do not ask again: the Linux kernel's user keyring
//! (keyrings(7)), through its system calls. Other systems keep nothing
//! here: each use asks (or reads `GATEKEEPER_PASSPHRASE`).

use std::path::Path;

/// The key's description: the file, by its full path.
pub fn name(path: &Path) -> String {
    let full = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    format!("gatekeeper:passphrase:{}", full.display())
}

/// Whether this system keeps typed passphrases at all.
pub const KEEPS: bool = cfg!(target_os = "linux");

#[cfg(target_os = "linux")]
pub use linux::{find, forget, keep};

#[cfg(target_os = "linux")]
mod linux {
    use std::{ffi::CString, time::Duration};

    const KIND: &[u8] = b"user\0";

    /// The key called `name` in the user keyring, if any.
    fn search(name: &str) -> Option<libc::c_long> {
        let name = CString::new(name).ok()?;
        // SAFETY: both strings are NUL-terminated; the kernel copies them.
        let id = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_SEARCH,
                libc::KEY_SPEC_USER_KEYRING,
                KIND.as_ptr(),
                name.as_ptr(),
                0,
            )
        };
        (id >= 0).then_some(id)
    }

    pub fn find(name: &str) -> Option<String> {
        let id = search(name)?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is writable for its whole length, which is passed.
        let n = unsafe { libc::syscall(libc::SYS_keyctl, libc::KEYCTL_READ, id, buf.as_mut_ptr(), buf.len()) };
        let n = usize::try_from(n).ok().filter(|n| *n <= buf.len())?;
        buf.truncate(n);
        String::from_utf8(buf).ok()
    }

    /// Keeps `secret` as `name` for `for_how_long`; a keyring that refuses
    /// only means the next use asks again.
    pub fn keep(name: &str, secret: &str, for_how_long: Duration) {
        let Ok(c_name) = CString::new(name) else {
            return;
        };
        // SAFETY: NUL-terminated strings and a payload of the given length.
        let id = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                KIND.as_ptr(),
                c_name.as_ptr(),
                secret.as_ptr(),
                secret.len(),
                libc::KEY_SPEC_USER_KEYRING,
            )
        };
        if id >= 0 {
            // SAFETY: plain integers.
            unsafe { libc::syscall(libc::SYS_keyctl, libc::KEYCTL_SET_TIMEOUT, id, for_how_long.as_secs()) };
        }
    }

    pub fn forget(name: &str) -> bool {
        let Some(id) = search(name) else {
            return false;
        };
        // SAFETY: a plain integer.
        unsafe { libc::syscall(libc::SYS_keyctl, libc::KEYCTL_INVALIDATE, id) == 0 }
    }
}

#[cfg(not(target_os = "linux"))]
pub use elsewhere::{find, forget, keep};

/// No keyring: nothing is found, kept or dropped.
#[cfg(not(target_os = "linux"))]
mod elsewhere {
    use std::time::Duration;

    pub fn find(_name: &str) -> Option<String> {
        None
    }

    pub fn keep(_name: &str, _secret: &str, _for_how_long: Duration) {}

    pub fn forget(_name: &str) -> bool {
        false
    }
}
