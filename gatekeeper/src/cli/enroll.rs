//! `gatekeeper init` and `gatekeeper client`: the gateway's key and the
//! devices allowed to knock.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gatekeeper::{
    knock::keys,
    spec::{self, PortSet},
    state::{ClientRecord, DEFAULT_STATE_DIR, StateDir, unix_now, write_private},
    tunnels::Tunnels,
};
use serde_json::json;

#[derive(Args, Debug, Clone)]
pub struct StateArg {
    /// The gateway's state directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

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
        #[arg(long, value_name = "HOST:PORT", value_parser = gatekeeper::portal::parse_upstream)]
        portal_upstream: Option<String>,
        /// Where to write the credential [default: ./NAME.credential.toml]. It holds the
        /// device's secret key: hand it over privately, then delete this copy.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        state: StateArg,
    },
    /// List enrolled devices.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// Revoke a device: a running daemon refuses its knocks and closes its
    /// open entries within a second.
    Revoke {
        name: String,
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
    let state = StateDir::new(&args.state.state_dir);
    let public = state.init(&args.public_addr, args.force)?;
    println!("server key created in {}", state.root().display());
    println!("public key: {}", keys::encode(public.as_bytes()));
    println!(
        "next: gatekeeper client add NAME --allow tcp/22 --state-dir {}",
        state.root().display()
    );
    Ok(())
}

fn status(c: &ClientRecord, now: u64) -> &'static str {
    if !c.enabled {
        "revoked"
    } else if c.expired_at(now) {
        "expired"
    } else {
        "enabled"
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
            let state = StateDir::new(&state.state_dir);
            // The portal presents the gateway's certificate by default; the
            // credential pins it. Made before enrolling, so a failure leaves
            // no half-enrolled client; an uninitialised state is refused by
            // `add_client` with the way out.
            let fingerprint = if state.initialised() {
                Some(Tunnels::new(&state).identity()?.fingerprint().to_string())
            } else {
                None
            };
            let (rec, mut cred) = state.add_client(&name, &allow, expires, nat, portal_upstream)?;
            cred.tls_fingerprint = fingerprint;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.credential.toml")));
            let text = format!(
                "# Gatekeeper credential for {name:?}. It holds this device's secret key: keep it private (mode 0600).\n{}",
                toml::to_string(&cred).context("encoding the credential")?
            );
            write_private(&out, &text)?;
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
        }
        Client::List { json, state } => {
            let clients = StateDir::new(&state.state_dir).clients()?;
            let now = unix_now();
            if json {
                let rows: Vec<_> = clients
                    .iter()
                    .map(|c| json!({"name": c.name, "id": c.id, "allow": c.allow, "status": status(c, now), "nat": c.nat, "expires": c.expires, "created": c.created, "public_key": c.public_key, "portal_upstream": c.portal_upstream}))
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else if clients.is_empty() {
                println!("no clients enrolled: gatekeeper client add NAME --allow tcp/22");
            } else {
                println!(
                    "{:<24} {:>4} {:<8} {:<5} {:<12} ALLOW",
                    "NAME", "ID", "STATUS", "NAT", "EXPIRES"
                );
                for c in &clients {
                    let expires = c
                        .expires
                        .map(|e| gatekeeper::audit::rfc3339(e)[..10].to_string())
                        .unwrap_or_else(|| "never".into());
                    println!(
                        "{:<24} {:>4} {:<8} {:<5} {:<12} {}",
                        c.name,
                        c.id,
                        status(c, now),
                        if c.nat { "yes" } else { "no" },
                        expires,
                        c.allow
                    );
                }
            }
        }
        Client::Revoke { name, state } => {
            StateDir::new(&state.state_dir).set_enabled(&name, false)?;
            println!("revoked {name}: its knocks are refused and its open entries closed by the running daemon");
        }
        Client::Enable { name, state } => {
            let rec = StateDir::new(&state.state_dir).set_enabled(&name, true)?;
            if rec.expired_at(unix_now()) {
                bail!("{name} is enabled but its enrollment has expired: enroll the device again");
            }
            println!("enabled {name}");
        }
    }
    Ok(())
}
