//! Installs what building and testing need (the nightly's rust-src,
//! bpf-linker, cargo-fuzz, Debian packages), and nothing twice: each step
//! checks first, so a machine that has everything is done in a moment.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The bpf-linker release that works with the pinned aya versions.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests, demo and benchmarks run.
const PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "util-linux",
    "nmap",
    "iperf3",
    "nftables",
    "iptables",
    "ethtool",
    "fwknop-client",
    "fwknop-server",
    "openssh-client",
    "openssh-server",
    "curl",
    "openssl",
    "python3",
    "chromium",
    "fonts-dejavu-core",
    "redis-server",
    "redis-sentinel",
    "wrk",
    "nginx-light",
    "tshark",
    "stunnel4",
    "prometheus",
    // The portal's certificates: an ACME server, and a TLS scanner.
    "pebble",
    "testssl.sh",
    // certutil: the NSS database headless Chromium trusts the ACME root in.
    "libnss3-tools",
    // The package test: `man -w` and `systemd-analyze verify`.
    "man-db",
    "systemd",
    // Perl and make build Tongsuo, the channel tests' SM peer.
    "perl",
    "make",
    // The Windows client: linked by MinGW, run by Wine in the lab.
    "gcc-mingw-w64-x86-64",
    "wine64",
];

/// The systems the client-only build is built or checked for, beside
/// this one (`cargo xtask clients`).
pub const CLIENT_TARGETS: &[&str] = &["x86_64-pc-windows-gnu", "aarch64-apple-darwin", "x86_64-apple-darwin"];

/// The zig release whose `zig cc` compiles ring's C for the macOS check:
/// it carries macOS's C headers, which no Debian compiler has.
const ZIG_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    cargo_deb()?;
    packages()?;
    client_targets()?;
    zig()?;
    Ok(())
}

fn client_targets() -> Result<()> {
    let installed = output("rustup", &["target", "list", "--toolchain", "stable", "--installed"])?;
    let missing: Vec<&str> = CLIENT_TARGETS
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "setup: adding the client's targets to the stable toolchain: {}",
        missing.join(" ")
    );
    let mut args = vec!["target", "add", "--toolchain", "stable"];
    args.extend(&missing);
    status("rustup", &args, &[])
}

/// The `zig` binary, installed under ~/.local/share (outside target/, so
/// `cargo clean` keeps it).
pub fn zig_binary() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home)
        .join(".local/share/gatekeeper-zig")
        .join(ZIG_VERSION)
        .join("ziglang/zig"))
}

/// zig from its Python wheel on PyPI (the one channel this machine
/// reaches besides Debian's and crates.io), unpacked, not pip-installed.
fn zig() -> Result<()> {
    let zig = zig_binary()?;
    if Command::new(&zig)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == ZIG_VERSION)
    {
        return Ok(());
    }
    println!("setup: fetching zig {ZIG_VERSION} (its `zig cc` has macOS's C headers, for the macOS check)");
    let root = zig.ancestors().nth(2).context("zig's directory")?.to_path_buf();
    let wheels = root.join("wheel");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&wheels)?;
    let wheels_arg = wheels.to_str().context("utf-8 path")?;
    let spec = format!("ziglang=={ZIG_VERSION}");
    let download = [
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        wheels_arg,
        &spec,
    ];
    if status("python3", &download, &[]).is_err() {
        // No pip for the python3 first on PATH: Debian's, with its pip.
        install_packages(&["python3-pip"])?;
        status("/usr/bin/python3", &download, &[])?;
    }
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no zig wheel")?;
    let unpack = "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])";
    let root_arg = root.to_str().context("utf-8 path")?;
    status(
        "python3",
        &["-c", unpack, wheel.to_str().context("utf-8 path")?, root_arg],
        &[],
    )?;
    std::fs::remove_dir_all(&wheels)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&zig, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// rathole 0.5, the tunnel benchmark's baseline, with its build needs.
pub fn rathole() -> Result<()> {
    if Command::new("rathole")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    install_packages(&["libssl-dev", "pkg-config"])?;
    println!("setup: installing rathole 0.5 (the tunnel benchmark's baseline)");
    status("cargo", &["install", "rathole", "--version", "0.5.0"], &[])
}

fn cargo_fuzz() -> Result<()> {
    if Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz (for the fuzzing tier)");
    status("cargo", &["install", "cargo-fuzz", "--locked"], &[])
}

fn cargo_deb() -> Result<()> {
    if Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    println!("setup: installing cargo-deb (for the Debian package)");
    status("cargo", &["install", "cargo-deb", "--locked"], &[])
}

fn output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("`{cmd} {}` failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &str, args: &[&str], env: &[(&str, &Path)]) -> Result<()> {
    let mut c = Command::new(cmd);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    if !c.status().with_context(|| format!("running {cmd}"))?.success() {
        bail!("`{cmd} {}` failed", args.join(" "));
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain (for -Z build-std=core)");
    status(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
        &[],
    )
}

/// Where bpf-linker finds the nightly's libLLVM; outside target/ so that
/// `cargo clean` cannot break the linker's rpath.
fn llvm_prefix() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share/gatekeeper-llvm"))
}

fn bpf_linker() -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if works {
        return Ok(());
    }
    let sysroot = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?.trim());
    let version = output("rustc", &["+nightly", "-vV"])?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV names no LLVM version")?
        .to_string();
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)");
    let prefix = llvm_prefix()?;
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let mut main_lib = None;
    for entry in std::fs::read_dir(sysroot.join("lib"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("libLLVM") && name.contains(".so") {
            symlink(&path, &lib.join(&name))?;
            if name.starts_with("libLLVM.so.") {
                main_lib = Some(path.clone());
            }
        }
    }
    let main_lib = main_lib.with_context(|| format!("no libLLVM.so.* in {}/lib", sysroot.display()))?;
    symlink(&main_lib, &lib.join("libLLVM.so"))?;
    let feature = format!("llvm-{major}");
    status(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &feature,
        ],
        &[("LLVM_PREFIX", &prefix)],
    )
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {}", link.display()))
}

fn packages() -> Result<()> {
    install_packages(PACKAGES)
}

/// Installs those of `packages` that are missing, with apt.
fn install_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Status}", p])
                .output()
                .is_ok_and(|o| o.stdout == b"installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    status("apt-get", &["update", "-qq"], &[])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    let mut c = Command::new("apt-get");
    c.args(&args).env("DEBIAN_FRONTEND", "noninteractive");
    if !c.status().context("running apt-get")?.success() {
        bail!("installing {} failed", missing.join(" "));
    }
    Ok(())
}
