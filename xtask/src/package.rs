//! `cargo xtask package`: the Debian package. The man pages and shell
//! completions come from the binary itself (`gatekeeper generate`), so
//! they match its `--help`; cargo-deb then packs what
//! `[package.metadata.deb]` in gatekeeper/Cargo.toml lists.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cargo;

/// Builds the package from the `release` or the `dev` profile (the tests
/// install the debug build they already have) and returns its path.
pub fn build(profile: &str) -> Result<PathBuf> {
    let dir = if profile == "dev" { "debug" } else { profile };
    cargo(&["build", "--profile", profile, "-p", "gatekeeper"])?;
    let binary = Path::new("target").join(dir).join("gatekeeper");
    let out = Path::new("target/package");
    let _ = fs::remove_dir_all(out);
    let man = out.join("man");
    run(
        &binary,
        &["generate", "man", "--out", man.to_str().context("utf-8 path")?],
        None,
    )?;
    for page in fs::read_dir(&man)? {
        let page = page?.path();
        let status = Command::new("gzip").args(["-9n"]).arg(&page).status()?;
        if !status.success() {
            bail!("gzip {} failed", page.display());
        }
    }
    let completions = out.join("completions");
    fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "gatekeeper.bash"),
        ("zsh", "_gatekeeper"),
        ("fish", "gatekeeper.fish"),
    ] {
        run(
            &binary,
            &["generate", "completions", shell],
            Some(&completions.join(file)),
        )?;
    }
    let deb = Command::new("cargo")
        .args(["deb", "-p", "gatekeeper", "--no-build", "--profile", profile])
        .output()
        .context("running cargo deb (`cargo xtask setup` installs it)")?;
    if !deb.status.success() {
        bail!("cargo deb failed: {}", String::from_utf8_lossy(&deb.stderr));
    }
    let path = String::from_utf8(deb.stdout)?
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo deb named no package")?;
    println!("built {}", path.display());
    Ok(path)
}

/// Runs the built binary; its stdout into `to`, if given.
fn run(binary: &Path, args: &[&str], to: Option<&Path>) -> Result<()> {
    let out = Command::new(binary)
        .args(args)
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "`gatekeeper {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(path) = to {
        fs::write(path, &out.stdout).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
