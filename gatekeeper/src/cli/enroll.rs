//! The gateway's side of enrollment: `init` and `rotate-key` (its knock
//! keys) and `client add|approve|list|revoke|enable` (the devices allowed
//! to knock). The device's side is in `device`.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use gatekeeper::{
    clock::{rfc3339, unix_now},
    knock::{enrollment, fwknop::FwknopKeys, keys},
    private_file,
    spec::{self, PortSet},
    store::NewClient,
};
use serde_json::json;
use x25519_dalek::PublicKey;

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
    /// Replace an existing server key outright: every enrolled client then needs a new
    /// credential (`rotate-key` changes it with an overlap instead).
    #[arg(long)]
    force: bool,
}

/// Make the gateway's next knock key; the current one stays accepted for an overlap.
///
/// Devices learn the new key with `client refresh`, which asks the gateway;
/// after --overlap the old key's v1 knocks are refused and audited as
/// `retired_server_key`, and its v2 knocks are dropped by the gate (their
/// flood tag key leaves it). New credentials name the new key at once.
///
/// Example: gatekeeper rotate-key --overlap 7d
///
/// After a credential leaked: gatekeeper client revoke NAME, then
/// gatekeeper rotate-key --overlap 1h (the leaked v2 flood tag key is
/// dead an hour later; the revoked credential cannot learn the new one).
#[derive(Args, Debug)]
pub struct RotateKey {
    #[command(flatten)]
    state: StateArg,
    /// How long knocks sealed for the replaced key are still accepted.
    #[arg(long, value_name = "DURATION", value_parser = spec::duration, default_value = "7d")]
    overlap: Duration,
    /// One JSON object for scripts.
    #[arg(long)]
    json: bool,
}

/// What an enrolled device may do.
#[derive(Args, Debug)]
pub struct Policy {
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
    /// How long its knocks open the gate (whole seconds or more, e.g. 2m); default:
    /// the daemon's `[knock] open_for`. Connections made in that time stay up.
    #[arg(long, value_name = "DURATION", value_parser = open_for)]
    open_for: Option<Duration>,
}

impl Policy {
    fn new_client(self, name: String, public_key: Option<PublicKey>, gateway: Option<String>) -> NewClient {
        NewClient {
            name,
            allow: self.allow,
            expires_in: self.expires,
            nat: self.nat,
            portal_upstream: self.portal_upstream,
            public_key,
            gateway,
            fwknop: None,
            open_for: self.open_for,
        }
    }
}

fn open_for(s: &str) -> Result<Duration, String> {
    let d = spec::duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s} is under a second: give whole seconds or more (e.g. 30s)"));
    }
    Ok(d)
}

fn parse_ports(s: &str) -> Result<PortSet, spec::SpecError> {
    s.parse()
}

pub fn rotate_key(args: RotateKey) -> Result<()> {
    let store = args.state.store()?;
    let rotated = store.rotate_server_key(args.overlap)?;
    let public = keys::encode(rotated.public().as_bytes());
    let until = rotated.previous.as_ref().map_or(0, |p| p.accepted_until);
    let confirmed = confirm(&args.state);
    if args.json {
        let applied = !matches!(confirmed, Confirmed::NoDaemon | Confirmed::Unconfirmed(_));
        println!(
            "{}",
            json!({"server_public_key": public, "previous_accepted_until": until, "applied": applied})
        );
        return Ok(());
    }
    println!("new knock key: {public}");
    println!(
        "the previous key is accepted until {} (--overlap); devices learn the new one with `gatekeeper client refresh`, and new credentials name it already",
        rfc3339(until)
    );
    match confirmed {
        Confirmed::Applied(_) => println!("the running daemon accepts both now"),
        Confirmed::Nodes(nodes) => println!("every running node accepts both now ({})", nodes.join(", ")),
        Confirmed::NoDaemon => {}
        Confirmed::Unconfirmed(why) => {
            println!("note: the running daemon did not confirm it ({why}); it takes the new key within a second")
        }
    }
    Ok(())
}

/// One line on whether the daemon accepts a new device's knocks yet.
pub fn say_enrolled(state: &StateArg) {
    match confirm(state) {
        Confirmed::Applied(_) => println!("the running daemon accepts its knocks now"),
        Confirmed::Nodes(nodes) => println!("every running node accepts its knocks now ({})", nodes.join(", ")),
        Confirmed::NoDaemon => {}
        Confirmed::Unconfirmed(why) => println!(
            "note: the running daemon did not confirm it ({why}); it accepts the device's knocks within a second"
        ),
    }
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

/// `client add`: enrolls a device and writes its credential.
pub fn add(
    name: String,
    policy: Policy,
    public_key: Option<PublicKey>,
    out: Option<PathBuf>,
    fwknop: bool,
    state: StateArg,
) -> Result<()> {
    let store = state.store()?;
    let (rec, cred) = store.add_client(&NewClient {
        fwknop: fwknop.then(FwknopKeys::generate),
        ..policy.new_client(name.clone(), public_key, None)
    })?;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.credential.toml")));
    private_file::write(&out, &cred.to_file_text())
        .with_context(|| format!("writing the credential {}", out.display()))?;
    println!("enrolled {} (id {}), allowed {}", rec.name, rec.id, rec.allow);
    if cred.secret_key.is_some() {
        println!(
            "credential written to {} (0600; it holds the device's secret: hand it over privately, then delete this copy); use it with: gatekeeper knock --credential {}",
            out.display(),
            out.display()
        );
    } else {
        println!(
            "credential written to {} (no secret in it); on the device: gatekeeper client install {} --key KEYFILE",
            out.display(),
            out.display()
        );
        println!("device key fingerprint: {}", enrollment::fingerprint(&rec.public()?));
    }
    if cred.servers.is_empty() {
        println!("note: the state has no public_addrs, so the credential names no server: pass --server when knocking");
    }
    if let Some(keys) = &rec.fwknop {
        let server = cred.servers.first().map_or("GATEWAY", String::as_str);
        println!(
            "\nfor the stock fwknop client, add this to the device's ~/.fwknoprc (it holds secrets: hand it over privately) and knock with `fwknop -n {}`:\n\n{}",
            rec.name,
            keys.rc_stanza(&rec.name, server, cred.knock_port, &rec.policy())
        );
    }
    say_enrolled(&state);
    Ok(())
}

/// `client approve`: enrolls the device a request line names.
pub fn approve(
    request: String,
    policy: Policy,
    fingerprint: Option<String>,
    json: bool,
    state: StateArg,
) -> Result<()> {
    let req = enrollment::Request::from_line(&request)?;
    if let Some(expected) = fingerprint
        && expected.trim() != req.fingerprint()
    {
        bail!(
            "the request's key has fingerprint {}, not {expected}: do not approve it; ask the device's owner to send the request again",
            req.fingerprint()
        );
    }
    let public = keys::decode_public(&req.public_key)?;
    let store = state.store()?;
    let (rec, cred) =
        store.add_client(&policy.new_client(req.name.clone(), Some(public), Some(req.gateway.clone())))?;
    let line = enrollment::credential_line(&cred);
    if json {
        println!(
            "{}",
            json!({"enrolled": rec.name, "id": rec.id, "fingerprint": req.fingerprint(), "hostname": req.hostname, "platform": req.platform, "credential": line})
        );
        return Ok(());
    }
    println!(
        "enrolled {} (id {}, host {:?}, {}), allowed {}; key fingerprint {}",
        rec.name,
        rec.id,
        req.hostname,
        req.platform,
        rec.allow,
        req.fingerprint()
    );
    println!("send this line back to the device (it holds no secret):\n\n{line}\n");
    say_enrolled(&state);
    Ok(())
}

/// `client list`.
pub fn list(json: bool, state: StateArg) -> Result<()> {
    let snapshot = state.store()?.snapshot()?;
    let now = unix_now();
    if json {
        let rows: Vec<_> = snapshot
            .clients
            .iter()
            .map(|c| json!({"name": c.name, "id": c.id, "allow": c.allow, "status": c.status(now), "nat": c.nat, "expires": c.expires, "created": c.created, "public_key": c.public_key, "portal_upstream": c.portal_upstream, "open_for_secs": c.open_for}))
            .collect();
        println!("{}", json!({"clients": rows, "problems": snapshot.problems}));
        return Ok(());
    }
    if snapshot.clients.is_empty() {
        println!("no clients enrolled: gatekeeper client add NAME --allow tcp/22");
    } else {
        println!(
            "{:<24} {:>4} {:<8} {:<5} {:<12} {:<9} ALLOW",
            "NAME", "ID", "STATUS", "NAT", "EXPIRES", "OPENS FOR"
        );
        for c in &snapshot.clients {
            let expires = c
                .expires
                .map(|e| rfc3339(e)[..10].to_string())
                .unwrap_or_else(|| "never".into());
            let open_for = c.open_for.map_or_else(|| "default".into(), |s| format!("{s}s"));
            println!(
                "{:<24} {:>4} {:<8} {:<5} {:<12} {:<9} {}",
                c.name,
                c.id,
                c.status(now),
                if c.nat { "yes" } else { "no" },
                expires,
                open_for,
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
    Ok(())
}

/// `client revoke`: and what the daemon did about it.
pub fn revoke(name: String, json: bool, state: StateArg) -> Result<()> {
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
    Ok(())
}

/// `client enable`.
pub fn enable(name: String, state: StateArg) -> Result<()> {
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
    Ok(())
}
