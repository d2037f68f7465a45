//! `cargo xtask`: set up the machine, build, test, demo and benchmark.

mod clients;
mod package;
mod setup;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test, demo and benchmark Gatekeeper")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: the nightly's rust-src, bpf-linker built
    /// against the nightly's LLVM, and the Debian packages the tests use.
    /// Fast when nothing is missing.
    Setup,
    /// Build the XDP object and the release `gatekeeper` binary.
    Build,
    /// Setup, then every test tier: lints, unit tests, XDP verdicts through
    /// BPF_PROG_TEST_RUN, the CLI, and end-to-end tests in namespaces.
    Test,
    /// Setup and build, then show the gate working in a lab of network
    /// namespaces it creates (and removes).
    Demo,
    /// Setup and build, then run a benchmark against its baselines in the
    /// same run: `gate` (program cost, drop rate, throughput), `knock`
    /// (verification rate, knock-to-open latency vs fwknopd), `tunnel`
    /// (vs direct and rathole), `portal` (ClientHello knock vs mutual and
    /// plain TLS handshakes), `cluster` (grant propagation, knock-to-open
    /// vs a lone gateway, shared replay claims per second, a failover),
    /// `relay` (HTTP through Redis vs the TLS tunnel and the direct path)
    /// or `channel` (each cipher policy vs stunnel4 and the direct path).
    Bench {
        #[arg(default_value = "gate")]
        suite: String,
    },
    /// Build the Debian package (target/debian/gatekeeper_*.deb): the
    /// release binary, systemd units, the default config, the guidance
    /// page, man pages, shell completions and the docs.
    Package,
    /// Build the client-only `gatekeeper` (stable Rust, no eBPF toolchain)
    /// for Linux and Windows (target/client/TARGET/release/), and check
    /// it for macOS on arm64 and x86_64.
    Clients,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            cargo(&["build", "--release", "-p", "gatekeeper"])?;
            println!(
                "built target/release/gatekeeper (XDP object embedded; also at target/bpf/bpfel-unknown-none/release/gatekeeper)"
            );
            Ok(())
        }
        Task::Test => {
            require_root("the tests load XDP programs and create network namespaces")?;
            setup::run()?;
            test()
        }
        Task::Demo => {
            require_root("the demo loads an XDP program and creates network namespaces")?;
            setup::run()?;
            cargo(&["build", "--release", "-p", "gatekeeper"])?;
            clients::linux()?;
            cargo(&["run", "--release", "-q", "-p", "gatekeeper-tests", "--bin", "demo"])
        }
        Task::Package => {
            setup::run()?;
            package::build("release").map(drop)
        }
        Task::Clients => {
            setup::run()?;
            clients::build().map(drop)
        }
        Task::Bench { suite } => {
            require_root("the benchmarks load XDP programs and create network namespaces")?;
            setup::run()?;
            if suite == "tunnel" {
                setup::rathole()?;
            }
            cargo(&["build", "--release", "-p", "gatekeeper"])?;
            cargo(&[
                "run",
                "--release",
                "-q",
                "-p",
                "gatekeeper-tests",
                "--bin",
                "bench",
                "--",
                &suite,
            ])
        }
    }
}

fn test() -> Result<()> {
    const CLIENT: [&str; 7] = [
        "-p",
        "gatekeeper",
        "--no-default-features",
        "--features",
        "client",
        "--target-dir",
        "target/client",
    ];
    let client_lints = [&["clippy", "--all-targets"][..], &CLIENT, &["--", "-D", "warnings"]].concat();
    let windows_lints = [
        &["clippy", "--all-targets", "--target", "x86_64-pc-windows-gnu"][..],
        &CLIENT,
        &["--", "-D", "warnings"],
    ]
    .concat();
    let client_units = [&["test", "--lib"][..], &CLIENT].concat();
    let tiers: [(&str, &[&str]); 11] = [
        ("format", &["fmt", "--all", "--", "--check"]),
        (
            "format (XDP program)",
            &["fmt", "--manifest-path", "gatekeeper-ebpf/Cargo.toml", "--", "--check"],
        ),
        (
            "format (fuzz targets)",
            &["fmt", "--manifest-path", "gatekeeper/fuzz/Cargo.toml", "--", "--check"],
        ),
        (
            "lints",
            &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"],
        ),
        ("lints (client build)", &client_lints),
        ("lints (client build for Windows)", &windows_lints),
        ("unit tests", &["test", "--workspace", "--lib", "--bins"]),
        ("unit tests (client build)", &client_units),
        ("gatekeeper binary", &["build", "-p", "gatekeeper"]),
        (
            "XDP verdicts (BPF_PROG_TEST_RUN), CLI, fwknop's format",
            &[
                "test",
                "-p",
                "gatekeeper-tests",
                "--test",
                "verdicts",
                "--test",
                "cli",
                "--test",
                "fwknop_client",
            ],
        ),
        (
            "end to end in network namespaces",
            &[
                "test",
                "-p",
                "gatekeeper-tests",
                "--test",
                "gate_lab",
                "--test",
                "knock_lab",
                "--test",
                "fwknop_lab",
                "--test",
                "lifecycle_lab",
                "--test",
                "tunnel_lab",
                "--test",
                "portal_lab",
                "--test",
                "store_lab",
                "--test",
                "audit_lab",
                "--test",
                "metrics_lab",
                "--test",
                "package_lab",
                "--test",
                "flood_lab",
                "--test",
                "interfaces_lab",
                "--test",
                "cluster_lab",
                "--test",
                "relay_lab",
                "--test",
                "channel_lab",
                "--test",
                "clients_lab",
                "--test",
                "certificates_lab",
            ],
        ),
    ];
    // The end-to-end tier runs last, so the run closes on its results.
    let (early, late) = tiers.split_at(tiers.len() - 1);
    for (name, args) in early {
        println!("\n==> {name}: cargo {}", args.join(" "));
        cargo(args)?;
    }
    // Short runs; a long one is `cargo +nightly fuzz run --fuzz-dir gatekeeper/fuzz TARGET -- -max_total_time=3600`.
    for target in ["knock_wire", "knock_payload", "client_hello"] {
        let args = [
            "+nightly",
            "fuzz",
            "run",
            "--fuzz-dir",
            "gatekeeper/fuzz",
            target,
            "--",
            "-max_total_time=20",
        ];
        println!("\n==> fuzz (short run): cargo {}", args.join(" "));
        rustup_cargo(&args)?;
    }
    // The package the package test installs: the debug build the other
    // end-to-end tests run, packed as `cargo xtask package` packs a release.
    println!("\n==> Debian package (debug build)");
    package::build("dev")?;
    // The clients the Wine and client-build tests run.
    clients::build()?;
    for (name, args) in late {
        println!("\n==> {name}: cargo {}", args.join(" "));
        cargo(args)?;
    }
    Ok(())
}

/// Runs cargo with the toolchain that runs us (stable).
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs cargo through the rustup proxy, so `+nightly` selects the toolchain.
fn rustup_cargo(args: &[&str]) -> Result<()> {
    let status = Command::new("cargo")
        .args(args)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}
