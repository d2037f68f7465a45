//! The client-only builds `cargo xtask clients` makes, and Wine to run
//! the Windows one on a lab host.
//!
//! Wine runs each program's sockets in its wineserver, so the server must
//! start inside the lab namespace: every [`Wine`] has a prefix of its own
//! (no server shared with anything outside the lab), started there, and
//! stopped on drop.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::lab::{Lab, Role, output_within, target_dir};

pub const LINUX: &str = "x86_64-unknown-linux-gnu";
pub const WINDOWS: &str = "x86_64-pc-windows-gnu";

/// Debian's 64-bit Wine loader.
const WINE64: &str = "/usr/lib/wine/wine64";

/// The client-only `gatekeeper` for `target` (`file` is its name there).
pub fn client_bin(target: &str, file: &str) -> Result<PathBuf> {
    let path = client_dir()?.join(target).join("release").join(file);
    if !path.is_file() {
        bail!(
            "no {}: build the clients first with `cargo xtask clients`",
            path.display()
        );
    }
    Ok(path)
}

/// Where `cargo xtask clients` builds (target/client).
pub fn client_dir() -> Result<PathBuf> {
    Ok(target_dir()?.join("client"))
}

/// The Windows client under Wine on one lab host.
pub struct Wine {
    ns: String,
    prefix: PathBuf,
    /// Holds gatekeeper.exe and the DLL Wine lacks; the programs' working
    /// directory (Z:\...), so relative paths name files here.
    dir: PathBuf,
}

impl Wine {
    /// Copies the Windows client into the lab's scratch directory and
    /// makes a Wine prefix for it, inside `role`'s namespace.
    pub fn new(lab: &Lab, role: Role) -> Result<Wine> {
        let exe = client_bin(WINDOWS, "gatekeeper.exe")?;
        let dir = lab.scratch().join("windows");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&exe, dir.join("gatekeeper.exe"))?;
        std::fs::copy(process_prng()?, dir.join("bcryptprimitives.dll"))?;
        let wine = Wine {
            ns: lab.ns(role),
            prefix: lab.scratch().join("wineprefix"),
            dir,
        };
        let boot = wine
            .command(WINE64)
            .args(["wineboot", "--init"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting wine64 (`cargo xtask setup` installs it)")?;
        let out = output_within(boot, Duration::from_secs(180))?;
        if !out.status.success() {
            bail!("wineboot failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(wine)
    }

    /// `program` run in the namespace with this prefix, quietly.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program])
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            // No Mono or Gecko installers: nothing here needs them.
            .env("WINEDLLOVERRIDES", "mscoree,mshtml=")
            .current_dir(&self.dir);
        c
    }

    /// The directory the Windows programs run in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `gatekeeper.exe ARGS` with piped stdio.
    pub fn spawn(&self, args: &[&str]) -> Result<std::process::Child> {
        Ok(self
            .command(WINE64)
            .arg("gatekeeper.exe")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// Runs `gatekeeper.exe ARGS` with `input` on its stdin; its output
    /// once it exits (killed past `limit`).
    pub fn run(&self, args: &[&str], input: &[u8], limit: Duration) -> Result<Output> {
        let mut child = self.spawn(args)?;
        child.stdin.take().context("stdin")?.write_all(input)?;
        output_within(child, limit)
    }

    /// [`Wine::run`] with no input, failing with its stderr unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args, b"", Duration::from_secs(60))?;
        if !out.status.success() {
            bail!(
                "gatekeeper.exe {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        let _ = self
            .command("wineserver")
            .arg("--kill")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `bcryptprimitives.dll` with the one function Rust's standard library
/// takes from it, which Debian 12's Wine lacks; built once with MinGW
/// into target/wine/.
fn process_prng() -> Result<PathBuf> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let dll = target_dir()?.join("wine/bcryptprimitives.dll");
    if dll.is_file() {
        return Ok(dll);
    }
    std::fs::create_dir_all(dll.parent().context("target/wine")?)?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("wine");
    let out = Command::new("x86_64-w64-mingw32-gcc")
        .args(["-O2", "-shared", "-o"])
        .arg(&dll)
        .arg(src.join("bcryptprimitives.c"))
        .arg(src.join("bcryptprimitives.def"))
        .arg("-ladvapi32")
        .output()
        .context("running x86_64-w64-mingw32-gcc (`cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "building bcryptprimitives.dll: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dll)
}
