//! `gatekeeper init` and `gatekeeper client`: the gateway's key and the
//! devices allowed to knock.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gatekeeper::{
    clock::{rfc3339, unix_now},
    knock::keys,
    private_file,
    spec::{self, PortSet},
    store::NewClient,
};
use serde_json::json;

use super::{Confirmed, StateArg, confirm};

/// Create the gateway's key pair and a starter config in the state directory.
///
/// Example: gatekeeper init --state-dir /var/lib/gatekeeper --public-addr 203.0.113.7
#[derive(Args, Debug)]
pub struct Init {
    #[command(flatten)]
    state: StateArg,
    /// The addresses clients knock on (comma-separated); written into the
    /// credentials, and a knock naming another address is refused.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',', required = true)]
    public_addr: Vec<IpAddr>,
    /// Replace an existing server key: every enrolled client then needs a new credential.
    #[arg(long)]
    force: bool,
}

/// Enroll, list, revoke and re-enable devices. One device, one key.
///
/// Changes go to the state directory; a running daemon applies them at
/// once and says so (or within a second by itself).
#[derive(Subcommand, Debug)]
pub enum Client {
    /// Enroll a device: make its key pair and write the credential it imports.
    ///
    /// Example: gatekeeper client add laptop --allow tcp/22,udp/53 --expires 90d
    Add {
        /// A name for the device: letters, digits, '.', '-', '_'.
        name: String,
        /// What it may open: PROTO/PORT or PROTO/LOW-HIGH, comma-separated, and `icmp`.
        #[arg(long, value_name = "PORTS", value_parser = parse_ports)]
        allow: PortSet,
        /// Refuse its knocks after this long (e.g. 30d); default: never.
        #[arg(long, value_name = "DURATION", value_parser = spec::duration)]
        expires: Option<Duration>,
        /// Accept its knocks from behind NAT (its own address may differ from the one seen).
        #[arg(long)]
        nat: bool,
        /// Where the portal relays this device's sessions, instead of the portal's
        /// --portal-upstream (e.g. 127.0.0.1:8080). Its policy must allow the portal's port.
        #[arg(long, value_name = "HOST:PORT", value_parser = spec::upstream)]
        portal_upstream: Option<String>,
        /// Where to write the credential [default: ./NAME.credential.toml]. It holds the
        /// device's secret key: hand it over privately, then delete this copy.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        state: StateArg,
    },
    /// List enrolled devices, and name every client file that cannot be used.
    List {
        /// One JSON object for scripts: {"clients": [...], "problems": [...]}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// Revoke a device: the running daemon refuses its knocks and closes
    /// its open entries, and says when it has.
    Revoke {
        name: String,
        /// One JSON object for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// Re-enable a revoked device.
    Enable {
        name: String,
        #[command(flatten)]
        state: StateArg,
    },
}

fn parse_ports(s: &str) -> Result<PortSet, spec::SpecError> {
    s.parse()
}

pub fn init(args: Init) -> Result<()> {
    let store = args.state.store()?;
    let public = store.init(&args.public_addr, args.force)?;
    println!("server key created in {}", store.location());
    println!("public key: {}", keys::encode(public.as_bytes()));
    let place = match &args.state.cluster {
        Some(url) => format!("--cluster {url}"),
        None => format!("--state-dir {}", args.state.state_dir.display()),
    };
    println!("next: gatekeeper client add NAME --allow tcp/22 {place}");
    Ok(())
}

/// One line on what the daemon did with a revocation.
fn revocation_said(name: &str, confirmed: &Confirmed) -> String {
    match confirmed {
        Confirmed::Applied(applied) => {
            let entries = applied
                .clients_closed
                .iter()
                .find(|c| c.name == name)
                .map_or(0, |c| c.closed);
            format!(
                "revoked {name}: applied by the running daemon, which refuses its knocks from now on and closed {entries} open {}",
                if entries == 1 { "entry" } else { "entries" }
            )
        }
        Confirmed::Nodes(nodes) => format!(
            "revoked {name}: applied by every running node ({}), which refuse its knocks from now on and closed its open entries",
            nodes.join(", ")
        ),
        Confirmed::NoDaemon => format!(
            "revoked {name}. No daemon is running for this state: the revocation holds from the moment one starts, which first closes any entries {name} still has"
        ),
        Confirmed::Unconfirmed(why) => format!(
            "revoked {name}, but the running daemon did not confirm it ({why}); it applies the change by itself within a second"
        ),
    }
}

pub fn client(cmd: Client) -> Result<()> {
    match cmd {
        Client::Add {
            name,
            allow,
            expires,
            nat,
            portal_upstream,
            out,
            state,
        } => {
            let store = state.store()?;
            let (rec, cred) = store.add_client(&NewClient {
                name: name.clone(),
                allow,
                expires_in: expires,
                nat,
                portal_upstream,
            })?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.credential.toml")));
            private_file::write(&out, &cred.to_file_text())
                .with_context(|| format!("writing the credential {}", out.display()))?;
            println!("enrolled {} (id {}), allowed {}", rec.name, rec.id, rec.allow);
            println!(
                "credential written to {} (0600); use it with: gatekeeper knock --credential {}",
                out.display(),
                out.display()
            );
            if cred.servers.is_empty() {
                println!(
                    "note: the state has no public_addrs, so the credential names no server: pass --server when knocking"
                );
            }
            match confirm(&state) {
                Confirmed::Applied(_) => println!("the running daemon accepts its knocks now"),
                Confirmed::Nodes(nodes) => println!("every running node accepts its knocks now ({})", nodes.join(", ")),
                Confirmed::NoDaemon => {}
                Confirmed::Unconfirmed(why) => println!(
                    "note: the running daemon did not confirm it ({why}); it accepts the device's knocks within a second"
                ),
            }
        }
        Client::List { json, state } => {
            let snapshot = state.store()?.snapshot()?;
            let now = unix_now();
            if json {
                let rows: Vec<_> = snapshot
                    .clients
                    .iter()
                    .map(|c| json!({"name": c.name, "id": c.id, "allow": c.allow, "status": c.status(now), "nat": c.nat, "expires": c.expires, "created": c.created, "public_key": c.public_key, "portal_upstream": c.portal_upstream}))
                    .collect();
                println!("{}", json!({"clients": rows, "problems": snapshot.problems}));
                return Ok(());
            }
            if snapshot.clients.is_empty() {
                println!("no clients enrolled: gatekeeper client add NAME --allow tcp/22");
            } else {
                println!(
                    "{:<24} {:>4} {:<8} {:<5} {:<12} ALLOW",
                    "NAME", "ID", "STATUS", "NAT", "EXPIRES"
                );
                for c in &snapshot.clients {
                    let expires = c
                        .expires
                        .map(|e| rfc3339(e)[..10].to_string())
                        .unwrap_or_else(|| "never".into());
                    println!(
                        "{:<24} {:>4} {:<8} {:<5} {:<12} {}",
                        c.name,
                        c.id,
                        c.status(now),
                        if c.nat { "yes" } else { "no" },
                        expires,
                        c.allow
                    );
                }
            }
            if !snapshot.problems.is_empty() {
                println!(
                    "\n{} record(s) cannot be used and are skipped (fix or remove them):",
                    snapshot.problems.len()
                );
                for p in &snapshot.problems {
                    println!("  {}: {}", p.path, p.reason);
                }
            }
        }
        Client::Revoke { name, json, state } => {
            let store = state.store()?;
            store.set_client_enabled(&name, false)?;
            let confirmed = confirm(&state);
            if json {
                let (applied, entries, detail) = match &confirmed {
                    Confirmed::Applied(a) => (
                        json!(true),
                        json!(a.clients_closed.iter().find(|c| c.name == name).map_or(0, |c| c.closed)),
                        json!(null),
                    ),
                    Confirmed::Nodes(nodes) => (json!(true), json!(null), json!({ "nodes": nodes })),
                    Confirmed::NoDaemon => (json!(false), json!(null), json!("no daemon is running")),
                    Confirmed::Unconfirmed(why) => (json!(null), json!(null), json!(why)),
                };
                println!(
                    "{}",
                    json!({"revoked": name, "applied": applied, "entries_closed": entries, "detail": detail})
                );
            } else {
                println!("{}", revocation_said(&name, &confirmed));
            }
        }
        Client::Enable { name, state } => {
            let store = state.store()?;
            let rec = store.set_client_enabled(&name, true)?;
            if rec.expired_at(unix_now()) {
                bail!("{name} is enabled but its enrollment has expired: enroll the device again");
            }
            match confirm(&state) {
                Confirmed::Applied(_) => println!("enabled {name}: the running daemon accepts its knocks again"),
                Confirmed::Nodes(nodes) => println!(
                    "enabled {name}: every running node accepts its knocks again ({})",
                    nodes.join(", ")
                ),
                Confirmed::NoDaemon => println!("enabled {name} (no daemon is running for this state directory)"),
                Confirmed::Unconfirmed(why) => println!(
                    "enabled {name}, but the running daemon did not confirm it ({why}); it applies the change within a second"
                ),
            }
        }
    }
    Ok(())
}
