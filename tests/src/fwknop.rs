//! The stock fwknop client (Debian's `fwknop-client`) on a lab host, with
//! the `.fwknoprc` stanza `gatekeeper client add --fwknop` printed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::lab::{Lab, Role};

/// The stanza `[name]` in what `client add NAME --fwknop` printed, written
/// into the lab's scratch directory as an rc file; its path and its text.
pub fn write_stanza(lab: &Lab, printed: &str, name: &str) -> Result<(PathBuf, String)> {
    let header = format!("[{name}]");
    let stanza: String = printed[printed.find(&header).with_context(|| format!("no stanza {header}"))?..]
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    let rc = lab.scratch().join(format!("{name}.fwknoprc"));
    gatekeeper::private_file::write(&rc, &stanza)?;
    Ok((rc, stanza))
}

/// Runs the client on `role`'s host with `rc`'s stanza `name` and `extra`
/// arguments; the packet it made, as it printed it (`--test` builds it
/// without sending).
pub fn knock(lab: &Lab, role: Role, rc: &Path, name: &str, extra: &[&str]) -> Result<Vec<u8>> {
    let rc = rc.to_str().context("utf-8 path")?;
    let mut args = vec!["fwknop", "--rc-file", rc, "-n", name, "-v"];
    args.extend_from_slice(extra);
    let out = lab.exec(role, &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "fwknop {extra:?}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Final SPA Data: "))
        .map(|p| p.as_bytes().to_vec())
        .with_context(|| format!("fwknop printed no packet: {text}"))
}
