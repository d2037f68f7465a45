//! Files only their owner may read (keys, credentials, records), written
//! so that a crash leaves the old file or the new one, never half, and so
//! that nothing planted in the directory can redirect them: the new
//! content goes to a fresh temporary file created exclusively (never
//! through an existing file or a symbolic link), which then replaces the
//! target in one rename.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use rand_core::{OsRng, RngCore};

use crate::platform;

/// A temporary name next to `path`, unique to this write.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{:016x}.tmp", OsRng.next_u64()))
}

/// Writes `text` to a new temporary file next to `path` (this user's
/// alone, created exclusively, never through a link), synced, and returns
/// its name.
fn write_temporary(path: &Path, text: &[u8]) -> io::Result<PathBuf> {
    let tmp = temporary(path);
    let mut f = platform::create_private(&tmp)?;
    let written = f.write_all(text).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Writes `text` to `path` (this user's alone), replacing what is there. A symbolic
/// link at `path` is replaced, not followed.
pub fn write(path: &Path, text: &str) -> io::Result<()> {
    let tmp = write_temporary(path, text.as_bytes())?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    platform::sync_dir(path)
}

/// Writes `text` to `path` (this user's alone) only if nothing exists there yet:
/// `ErrorKind::AlreadyExists` otherwise. Two writers racing for one name
/// cannot both succeed.
pub fn create(path: &Path, text: &str) -> io::Result<()> {
    let tmp = write_temporary(path, text.as_bytes())?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked?;
    platform::sync_dir(path)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gk-private-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_planted_link_is_replaced_never_followed() {
        let d = dir("link");
        let victim = d.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let target = d.join("device.key");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        // The old scheme wrote through `device.tmp`; plant that too.
        std::os::unix::fs::symlink(&victim, d.join("device.tmp")).unwrap();
        write(&target, "secret").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.file_type().is_file(), "the link itself was replaced");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "secret");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn create_refuses_an_existing_name_and_leaves_no_temporaries() {
        let d = dir("create");
        let p = d.join("alice.toml");
        create(&p, "first").unwrap();
        let e = create(&p, "second").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "first");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "no temporary left behind");
        std::fs::remove_dir_all(d).unwrap();
    }
}
