//! `cargo xtask clients`: the client-only build (`--no-default-features
//! --features client`) for each system a device runs. Linux and Windows
//! binaries are built on stable Rust, with a rustup home that holds the
//! stable toolchain alone, so a build that reached for the nightly (the
//! XDP program's) fails here; macOS, which needs Apple's SDK to link, is
//! type-checked for both of its architectures. ring, the TLS
//! stack's cryptography, compiles C for each target: MinGW's gcc for
//! Windows, and for macOS `zig cc`, which carries macOS's C headers.
//!
//! Everything goes to target/client/TARGET/release/, apart from the
//! gateway build, so neither rebuilds the other.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::setup;

const TARGET_DIR: &str = "target/client";
const LINUX: &str = "x86_64-unknown-linux-gnu";
const WINDOWS: &str = "x86_64-pc-windows-gnu";
const MACOS: [(&str, &str); 2] = [
    ("aarch64-apple-darwin", "aarch64-macos"),
    ("x86_64-apple-darwin", "x86_64-macos"),
];

/// Builds the Linux and Windows clients and checks the macOS ones; the
/// binaries built.
pub fn build() -> Result<Vec<PathBuf>> {
    let stable_only = stable_only_rustup()?;
    let built = vec![
        build_for(LINUX, "gatekeeper", &stable_only)?,
        build_for(WINDOWS, "gatekeeper.exe", &stable_only)?,
    ];
    let zig = setup::zig_binary()?;
    for (target, zig_target) in MACOS {
        println!("\n==> client for {target} (cargo check: linking needs Apple's SDK)");
        let cc = wrapper(&zig, "cc", zig_target)?;
        let ar = wrapper(&zig, "ar", zig_target)?;
        let var = target.replace('-', "_");
        client_cargo(
            "check",
            target,
            &[
                ("RUSTUP_HOME".into(), stable_only.clone()),
                (format!("CC_{var}"), cc),
                (format!("AR_{var}"), ar),
            ],
        )?;
    }
    for path in &built {
        let size = std::fs::metadata(path)
            .with_context(|| format!("{} was not built", path.display()))?
            .len();
        println!("built {} ({:.1} MiB)", path.display(), size as f64 / (1024.0 * 1024.0));
    }
    println!("checked {}", MACOS.map(|(t, _)| t).join(" and "));
    Ok(built)
}

/// The Linux client alone (for the demo).
pub fn linux() -> Result<PathBuf> {
    build_for(LINUX, "gatekeeper", &stable_only_rustup()?)
}

/// Builds the client for `target`; the path of `file`, the binary.
fn build_for(target: &str, file: &str, stable_only: &Path) -> Result<PathBuf> {
    println!("\n==> client for {target}");
    client_cargo("build", target, &[("RUSTUP_HOME".into(), stable_only.to_path_buf())])?;
    Ok(Path::new(TARGET_DIR).join(target).join("release").join(file))
}

/// A rustup home whose only toolchain is this machine's stable one.
fn stable_only_rustup() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+stable", "--print", "sysroot"])
        .output()
        .context("running rustc +stable")?;
    if !out.status.success() {
        bail!(
            "rustc +stable --print sysroot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sysroot = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let name = sysroot.file_name().context("the stable sysroot's name")?;
    let home = std::fs::canonicalize("target")?.join("tools/rustup-stable-only");
    let toolchains = home.join("toolchains");
    std::fs::create_dir_all(&toolchains)?;
    let link = toolchains.join(name);
    if std::fs::read_link(&link).ok().as_deref() != Some(sysroot.as_path()) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&sysroot, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(home)
}

/// `cargo COMMAND` of the client-only build for `target`, on the stable
/// toolchain.
fn client_cargo(command: &str, target: &str, env: &[(String, PathBuf)]) -> Result<()> {
    let args = [
        command,
        "--release",
        "-p",
        "gatekeeper",
        "--no-default-features",
        "--features",
        "client",
        "--target",
        target,
        "--target-dir",
        TARGET_DIR,
    ];
    let mut c = Command::new("cargo");
    c.args(args).env("RUSTUP_TOOLCHAIN", "stable").env_remove("CARGO");
    for (k, v) in env {
        c.env(k, v);
    }
    if !c.status().context("running cargo")?.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

/// A script that runs `zig TOOL` for `zig_target`, as the `cc` crate
/// calls a C compiler or archiver: it passes clang's `--target=`, which
/// zig spells `-target`.
fn wrapper(zig: &Path, tool: &str, zig_target: &str) -> Result<PathBuf> {
    let dir = Path::new("target/tools");
    std::fs::create_dir_all(dir)?;
    let path = std::fs::canonicalize(dir)?.join(format!("zig-{tool}-{zig_target}"));
    let target_flag = if tool == "cc" {
        format!(" -target {zig_target}")
    } else {
        String::new()
    };
    let script = format!(
        "#!/bin/sh\nfor a; do shift; case \"$a\" in --target=*) ;; *) set -- \"$@\" \"$a\";; esac; done\nexec '{}' {tool}{target_flag} \"$@\"\n",
        zig.display()
    );
    std::fs::write(&path, script)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}
