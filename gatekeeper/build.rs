//! Builds the XDP program (nightly, bpfel-unknown-none, build-std) so the
//! gateway build of `gatekeeper` can embed it. `cargo xtask setup` installs
//! what this needs: the nightly's rust-src and bpf-linker. The client-only
//! build (`--no-default-features --features client`) has no gate and skips
//! this, so it builds on stable Rust alone, for any target.
//!
//! Also names the revision the binary is built from (`--version`, the
//! status, the metrics): `GATEKEEPER_REVISION` if set (a package built
//! outside git), else git's commit.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("gatekeeper/ sits in the workspace root")
        .to_path_buf();
    println!("cargo:rustc-env=GATEKEEPER_REVISION={}", revision(&root));
    if env::var_os("CARGO_FEATURE_GATEWAY").is_some() {
        build_xdp(&root);
    }
}

fn build_xdp(root: &std::path::Path) {
    let ebpf = root.join("gatekeeper-ebpf");
    for watched in [
        "gatekeeper-ebpf/src",
        "gatekeeper-ebpf/Cargo.toml",
        "gatekeeper-common/src",
        "gatekeeper-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("bpf");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        // bpf-linker's default defers memcpy to the BPF expander and leaves
        // every memset and memmove a call to a byte-at-a-time loop; without
        // it LLVM writes them inline as word moves.
        "-Clink-arg=--disable-expand-memcpy-in-order".into(),
        // v3 (kernel 5.1+): 32-bit jumps and ALU, fewer instructions.
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .arg("--manifest-path")
    .arg(ebpf.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer (stable) build's settings must not leak into the nightly one.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run rustup to build the XDP program: {e}; run `cargo xtask setup`"));
    if !status.success() {
        panic!(
            "building the XDP program failed (see above); `cargo xtask setup` installs the nightly rust-src and bpf-linker it needs"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/gatekeeper");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("gatekeeper.bpf.o");
    std::fs::copy(&object, &out).unwrap_or_else(|e| panic!("copying {} failed: {e}", object.display()));
}

fn revision(root: &std::path::Path) -> String {
    println!("cargo:rerun-if-env-changed=GATEKEEPER_REVISION");
    if let Ok(given) = env::var("GATEKEEPER_REVISION") {
        return given;
    }
    // Moves on every commit, checkout and reset.
    for watched in [".git/logs/HEAD", ".git/HEAD"] {
        if root.join(watched).exists() {
            println!("cargo:rerun-if-changed={}", root.join(watched).display());
        }
    }
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
