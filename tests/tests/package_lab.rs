//! The Debian package as an operator gets it: `dpkg -i` on this machine,
//! every file where it belongs with its owner and mode, both systemd
//! units accepted by `systemd-analyze verify`, the daemon unit's own
//! command line run (with the installed binary and config) in a lab
//! namespace until a client's knock gets through, and `dpkg --purge`
//! leaving nothing behind but the state it must keep. Needs root and
//! `target/debian/gatekeeper_*.deb` (`cargo xtask test` builds it first;
//! `cargo xtask package` builds the release one).

use std::{
    fs::File,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use gatekeeper_tests::lab::{ChildGuard, Lab, Role, eventually, gw};

const PACKAGE: &str = "gatekeeper";
const MAINTAINER: &str = "Gatekeeper developers";
const STATE: &str = "/var/lib/gatekeeper";

/// The newest package `cargo xtask package` (or the test tier) built.
fn deb() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let mut debs: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("no {}: run `cargo xtask package` first", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    debs.pop()
        .with_context(|| format!("no .deb in {}: run `cargo xtask package` first", dir.display()))
}

fn run(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output()?)
}

fn run_ok(args: &[&str]) -> Result<String> {
    let out = run(args)?;
    ensure!(
        out.status.success(),
        "`{}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn installed() -> bool {
    run(&["dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE]).is_ok_and(|o| o.stdout == b"installed")
}

/// The package installed for the test's length: purged however the test
/// ends, with the state directory if the test's install made it.
struct Installed {
    made_state: bool,
}

impl Installed {
    fn new(deb: &Path) -> Result<Installed> {
        if installed() {
            // Ours, left by an interrupted run: start clean. Anyone
            // else's package of that name is not ours to remove.
            let by = run_ok(&["dpkg-query", "-W", "-f=${Maintainer}", PACKAGE])?;
            ensure!(
                by == MAINTAINER,
                "a package named {PACKAGE} by {by} is installed here; the test will not replace it"
            );
            run_ok(&["dpkg", "--purge", PACKAGE])?;
        }
        let made_state = !Path::new(STATE).exists();
        run_ok(&["dpkg", "-i", deb.to_str().context("utf-8 path")?])?;
        Ok(Installed { made_state })
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() {
            let _ = run(&["dpkg", "--purge", PACKAGE]);
        }
        if self.made_state {
            let _ = std::fs::remove_dir_all(STATE);
        }
    }
}

/// Asserts `path` exists as a file or directory with `mode`, owned by root.
fn owned_by_root(path: &str, mode: u32) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("{path} was not installed"))?;
    ensure!(
        meta.uid() == 0 && meta.gid() == 0,
        "{path} is owned by {}:{}",
        meta.uid(),
        meta.gid()
    );
    ensure!(
        meta.permissions().mode() & 0o7777 == mode,
        "{path} has mode {:o}, not {mode:o}",
        meta.permissions().mode() & 0o7777
    );
    Ok(())
}

/// The unit's ExecStart as systemd would run it, `$GATEKEEPER_ARGS`
/// expanded to `args`.
fn exec_start(unit: &str, args: &[String]) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(unit)?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .with_context(|| format!("{unit} has no ExecStart"))?;
    let mut argv = Vec::new();
    for word in line.split_whitespace() {
        if word == "$GATEKEEPER_ARGS" {
            argv.extend(args.iter().cloned());
        } else if word.starts_with('$') {
            bail!("{unit} uses {word}, which this test does not expand");
        } else {
            argv.push(word.to_string());
        }
    }
    Ok(argv)
}

#[test]
fn the_package_installs_verifies_runs_and_purges_cleanly() -> Result<()> {
    let deb = deb()?;
    let _installed = Installed::new(&deb)?;

    // Every file where it belongs, root's, with its mode.
    for (path, mode) in [
        ("/usr/bin/gatekeeper", 0o755),
        ("/lib/systemd/system/gatekeeper.service", 0o644),
        ("/lib/systemd/system/gatekeeper-agent@.service", 0o644),
        ("/etc/gatekeeper/gatekeeper.toml", 0o600),
        ("/etc/gatekeeper/agents", 0o700),
        ("/etc/default/gatekeeper", 0o644),
        (STATE, 0o700),
        ("/usr/share/gatekeeper/guidance/index.html", 0o644),
        ("/usr/share/man/man1/gatekeeper.1.gz", 0o644),
        ("/usr/share/man/man1/gatekeeper-run.1.gz", 0o644),
        ("/usr/share/bash-completion/completions/gatekeeper", 0o644),
        ("/usr/share/zsh/vendor-completions/_gatekeeper", 0o644),
        ("/usr/share/fish/vendor_completions.d/gatekeeper.fish", 0o644),
        ("/usr/share/doc/gatekeeper/metrics.md", 0o644),
        ("/usr/share/doc/gatekeeper/grafana-dashboard.json", 0o644),
    ] {
        owned_by_root(path, mode)?;
    }
    let listed = run_ok(&["dpkg", "-L", PACKAGE])?;
    for path in listed.lines().filter(|l| l.starts_with('/')) {
        let meta = std::fs::symlink_metadata(path).with_context(|| format!("dpkg lists {path}, which is missing"))?;
        ensure!(meta.uid() == 0, "{path} is not root's");
        // A link's own mode means nothing (/lib on a merged /usr).
        ensure!(
            meta.file_type().is_symlink() || meta.permissions().mode() & 0o022 == 0,
            "{path} is writable by others"
        );
    }
    // The installed binary is the one this tree built, revision and all.
    let version = run_ok(&["/usr/bin/gatekeeper", "--version"])?;
    ensure!(
        version.starts_with("gatekeeper ") && version.contains('(') && !version.contains("unknown"),
        "{version}"
    );
    let page = run_ok(&["man", "-w", "gatekeeper-audit"])?;
    ensure!(page.trim() == "/usr/share/man/man1/gatekeeper-audit.1.gz", "{page}");

    // The units as systemd reads them, with the binary and pages they name.
    for unit in ["/lib/systemd/system/gatekeeper.service", "gatekeeper-agent@web.service"] {
        let out = run(&["systemd-analyze", "verify", unit])?;
        let said = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit}: {said}"
        );
    }

    // The daemon unit's own command line, in a lab namespace: installed
    // binary, installed config, the lab's interface and state.
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let alice = lab.enroll("alice", &["--allow", "tcp/22"])?;
    let lab_args = [
        "--iface",
        "gw0",
        "--protect",
        "tcp/22",
        "--pin-dir",
        lab.pin_dir().to_str().context("utf-8")?,
        "--state-dir",
        lab.state_dir().to_str().context("utf-8")?,
    ]
    .map(String::from);
    let argv = exec_start("/lib/systemd/system/gatekeeper.service", &lab_args)?;
    ensure!(argv[0] == "/usr/bin/gatekeeper" && argv[1] == "run", "{argv:?}");
    let log_path = lab.scratch().join("unit.log");
    let log = File::create(&log_path)?;
    let daemon = ChildGuard::new(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.ns(Role::Gateway)))
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let up = eventually(Duration::from_secs(20), || {
        Ok(std::fs::read_to_string(&log_path)?.contains("gate up"))
    })?;
    ensure!(
        up,
        "the unit's command line did not bring the gate up: {}",
        std::fs::read_to_string(&log_path)?
    );
    ensure!(
        !lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "the intruder got in"
    );
    let knocked = lab.udp_knock(Role::Client, &alice, 22, Some(40122), &[])?;
    ensure!(knocked.status.success(), "{knocked:?}");
    ensure!(
        eventually(Duration::from_secs(3), || lab.tcp_echo_works(
            Role::Client,
            gw(22),
            Some(40122)
        ))?,
        "the knock did not open the gate the installed daemon runs"
    );
    drop(daemon);
    drop(lab);

    // Purge: nothing of the package is left but the state it keeps.
    run_ok(&["dpkg", "--purge", PACKAGE])?;
    ensure!(!installed(), "still installed after purge");
    for path in listed.lines().filter(|l| l.starts_with('/')) {
        let p = Path::new(path);
        ensure!(p.is_dir() || !p.exists(), "{path} outlived the purge");
    }
    for path in [
        "/usr/bin/gatekeeper",
        "/etc/gatekeeper",
        "/usr/share/gatekeeper",
        "/usr/share/doc/gatekeeper",
    ] {
        ensure!(!Path::new(path).exists(), "{path} outlived the purge");
    }
    ensure!(Path::new(STATE).is_dir(), "the purge removed the gateway's state");
    Ok(())
}
