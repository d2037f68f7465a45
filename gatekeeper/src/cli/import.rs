//! `gatekeeper import`: clients from another tool's configuration, so a
//! gateway can move to Gatekeeper while its devices keep their clients.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gatekeeper::{
    clock::unix_now,
    knock::fwknop::access::{self, Mapped},
    store::NewClient,
};
use serde_json::json;

use super::{StateArg, enroll};

/// Enroll clients from another tool's configuration, so devices keep
/// their clients while the gateway moves to Gatekeeper.
#[derive(Subcommand, Debug)]
pub enum Import {
    /// Enroll a client for each stanza of fwknopd's access.conf, with the
    /// same keys and ports, so its devices keep knocking with the stock
    /// fwknop client.
    ///
    /// Each stanza becomes client PREFIX-N, N its place in the file. A
    /// stanza is imported only if nothing it restricts is loosened; every
    /// other one is listed with each reason, and the file can be fixed and
    /// imported again (imported names are then refused as taken). What an
    /// imported stanza sets that Gatekeeper does another way is listed
    /// with it. The exit status is 1 when any stanza was not imported.
    ///
    /// Example: gatekeeper import fwknop /etc/fwknop/access.conf --dry-run
    Fwknop(FwknopImport),
}

#[derive(Args, Debug)]
pub struct FwknopImport {
    /// fwknopd's access.conf.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Name the clients PREFIX-1, PREFIX-2, ... by their stanza's place.
    #[arg(long, value_name = "PREFIX", default_value = "fwknop")]
    name_prefix: String,
    /// Import stanzas whose SOURCE is not ANY as clients that may knock
    /// from anywhere (Gatekeeper's clients are not tied to networks).
    #[arg(long)]
    any_source: bool,
    /// Say what would be imported; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// One JSON object for scripts: {"imported": [...], "refused": [...]},
    /// each with the stanza's line and name.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    state: StateArg,
}

pub fn import(i: Import) -> Result<()> {
    match i {
        Import::Fwknop(args) => fwknop(args),
    }
}

fn fwknop(args: FwknopImport) -> Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let stanzas =
        access::parse(&text).with_context(|| format!("{} is not fwknopd's access.conf", args.file.display()))?;
    let store = if args.dry_run { None } else { Some(args.state.store()?) };
    let now = unix_now();
    let (mut imported, mut refused) = (Vec::new(), Vec::new());
    for (n, stanza) in stanzas.iter().enumerate() {
        let name = format!("{}-{}", args.name_prefix, n + 1);
        let added = stanza.map(now, args.any_source).and_then(|mapped| match &store {
            None => Ok(mapped),
            Some(store) => store
                .add_client(&new_client(&name, &mapped, now))
                .map(|_| mapped)
                .map_err(|e| vec![gatekeeper::error_chain(&e)]),
        });
        match added {
            Ok(m) => imported.push(json!({"line": stanza.line, "name": name, "allow": m.allow.to_string(),
                "expires": m.expires.map(gatekeeper::clock::rfc3339), "open_for_secs": m.open_for, "notes": m.notes})),
            Err(why) => refused.push(json!({"line": stanza.line, "name": name, "reasons": why})),
        }
    }
    if args.json {
        println!(
            "{}",
            json!({"file": args.file, "dry_run": args.dry_run, "imported": imported, "refused": refused})
        );
    } else {
        say(&args, &imported, &refused);
    }
    if !args.dry_run && !imported.is_empty() {
        enroll::say_enrolled(&args.state);
    }
    if !refused.is_empty() {
        bail!(
            "{} of {} stanzas in {} not imported (each reason is listed above)",
            refused.len(),
            stanzas.len(),
            args.file.display()
        );
    }
    Ok(())
}

fn new_client(name: &str, mapped: &Mapped, now: u64) -> NewClient {
    NewClient {
        name: name.to_string(),
        allow: mapped.allow.clone(),
        expires_in: mapped.expires.map(|e| Duration::from_secs(e.saturating_sub(now))),
        nat: false,
        portal_upstream: None,
        public_key: None,
        gateway: None,
        fwknop: Some(mapped.keys.clone()),
        open_for: mapped.open_for.map(Duration::from_secs),
    }
}

fn say(args: &FwknopImport, imported: &[serde_json::Value], refused: &[serde_json::Value]) {
    let verb = if args.dry_run { "would import" } else { "imported" };
    for i in imported {
        println!(
            "{verb} {} (stanza at line {}): allowed {}{}{}",
            i["name"].as_str().unwrap_or_default(),
            i["line"],
            i["allow"].as_str().unwrap_or_default(),
            i["open_for_secs"]
                .as_u64()
                .map(|s| format!(", opened for {s} s"))
                .unwrap_or_default(),
            i["expires"]
                .as_str()
                .map(|e| format!(", until {e}"))
                .unwrap_or_default()
        );
        for note in i["notes"].as_array().into_iter().flatten() {
            println!("  {}", note.as_str().unwrap_or_default());
        }
    }
    for r in refused {
        println!(
            "not imported: the stanza at line {} ({}):",
            r["line"],
            r["name"].as_str().unwrap_or_default()
        );
        for why in r["reasons"].as_array().into_iter().flatten() {
            println!("  {}", why.as_str().unwrap_or_default());
        }
    }
    if !imported.is_empty() {
        println!(
            "the devices keep their fwknop keys and ~/.fwknoprc; point SPA_SERVER at this gateway. Their Gatekeeper credentials were not kept: a device that moves to `gatekeeper knock` is enrolled anew"
        );
    }
}
