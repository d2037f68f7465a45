//! `gatekeeper init`, `rotate-key`, `keygen` and `client`: the gateway's
//! knock keys, device keys, and the devices allowed to knock.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gatekeeper::{
    clock::{rfc3339, unix_now},
    encrypted_file,
    knock::{
        credential::{self, Credential},
        enrollment, keys, note,
        send::{Knocker, hostname},
    },
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

/// Make this device's key pair: the secret stays in FILE, the public key is printed.
///
/// The file is 0600 (--encrypt adds a passphrase); give the public key to the
/// gateway's operator.
///
/// Example: gatekeeper keygen --out /etc/gatekeeper/laptop.key
///   then, on the gateway: gatekeeper client add laptop --public-key KEY --allow tcp/22
///   or, from here: gatekeeper client request --key /etc/gatekeeper/laptop.key --gateway gw.example.net --name laptop
#[derive(Args, Debug)]
pub struct Keygen {
    /// Where to write the key pair.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Replace an existing key file (the device must then be enrolled again).
    #[arg(long)]
    force: bool,
    /// Encrypt the key file with a passphrase (from GATEKEEPER_PASSPHRASE, else asked
    /// for twice); every use then needs it. Leave it off for unattended devices.
    #[arg(long)]
    encrypt: bool,
    /// One JSON object for scripts: {"key_file", "public_key", "fingerprint"}.
    #[arg(long)]
    json: bool,
}

/// Encrypt a credential or key file at rest with a passphrase.
///
/// The passphrase comes from GATEKEEPER_PASSPHRASE, else is asked for twice.
/// Gatekeeper then asks for it (or reads GATEKEEPER_PASSPHRASE) whenever it
/// reads the file.
///
/// Example: gatekeeper encrypt laptop.key
#[derive(Args, Debug)]
pub struct Encrypt {
    file: PathBuf,
}

/// Forget the passphrase of an encrypted file kept in the keyring: the next use asks again.
///
/// A passphrase typed at the prompt is kept in the kernel's user keyring
/// for an hour, so the commands that follow do not ask again.
///
/// Example: gatekeeper forget laptop.key
#[derive(Args, Debug)]
pub struct Forget {
    file: PathBuf,
}

/// Make an encrypted credential or key file plain again (0600), for an
/// unattended device.
///
/// Example: GATEKEEPER_PASSPHRASE=... gatekeeper decrypt laptop.key
#[derive(Args, Debug)]
pub struct Decrypt {
    file: PathBuf,
}

/// Make the gateway's next knock key; the current one stays accepted for an overlap.
///
/// Devices learn the new key with `client refresh`, which asks the gateway;
/// after --overlap the old key's knocks are refused and audited as
/// `retired_server_key`. New credentials name the new key at once.
///
/// Example: gatekeeper rotate-key --overlap 7d
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
        }
    }
}

/// Enroll, list, revoke and re-enable devices. One device, one key.
///
/// Changes go to the state directory; a running daemon applies them at
/// once and says so (or within a second by itself).
///
/// Three ways to enroll, the first two keeping the device's secret on the device:
///   1. device: gatekeeper keygen --out laptop.key; gateway: client add laptop --public-key KEY ...
///   2. device: client request ...; gateway: client approve LINE ...; device: client install LINE ...
///   3. gateway: client add laptop ... (the gateway makes the key pair; hand the file over privately)
#[derive(Subcommand, Debug)]
pub enum Client {
    /// Enroll a device, and write the credential it knocks with.
    ///
    /// With --public-key (from `gatekeeper keygen` on the device) the credential holds no
    /// secret; the device installs it with `client install --key`. Without, the gateway
    /// makes the key pair and the credential carries the secret: convenient, but the
    /// file must then reach the device privately.
    ///
    /// Example: gatekeeper client add laptop --public-key KEY --allow tcp/22,udp/53 --expires 90d
    Add {
        /// A name for the device: letters, digits, '.', '-', '_'.
        name: String,
        #[command(flatten)]
        policy: Policy,
        /// The device's own public key (`gatekeeper keygen` prints it).
        #[arg(long, value_name = "KEY", value_parser = parse_public_key)]
        public_key: Option<PublicKey>,
        /// Where to write the credential [default: ./NAME.credential.toml].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        state: StateArg,
    },
    /// On the device: ask to be enrolled. Prints one line to send to the
    /// gateway's operator and the key's fingerprint to read to them.
    ///
    /// The key file is made if it does not exist yet.
    ///
    /// Example: gatekeeper client request --key laptop.key --gateway gw.example.net --name laptop
    Request {
        /// This device's key file (`gatekeeper keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// How this device reaches the gateway: an address or a DNS name.
        #[arg(long, value_name = "HOST")]
        gateway: String,
        /// The name to enroll under.
        #[arg(long)]
        name: String,
        /// One JSON object for scripts: {"request", "fingerprint", "key_file"}.
        #[arg(long)]
        json: bool,
    },
    /// On the gateway: enroll the device a request line names. Prints the
    /// credential line to send back; it holds no secret.
    ///
    /// Example: gatekeeper client approve gk-request-1:... --allow tcp/22
    Approve {
        /// The line `client request` printed.
        request: String,
        #[command(flatten)]
        policy: Policy,
        /// Enroll only if the request's key has this fingerprint (as read out by the device's owner).
        #[arg(long, value_name = "FINGERPRINT")]
        fingerprint: Option<String>,
        /// One JSON object for scripts: {"enrolled", "id", "fingerprint", "credential"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// On the device: install the credential `client approve` printed (or
    /// the file `client add --public-key` wrote), naming this device's key file.
    ///
    /// Example: gatekeeper client install gk-credential-1:... --key laptop.key --out laptop.credential.toml
    Install {
        /// The line `client approve` printed, or a credential file holding no secret.
        credential: String,
        /// This device's key file, the one the request was made with.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Where to write the credential [default: ./NAME.credential.toml].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// On the device: ask the gateway for its current knock key and update
    /// the credential if it changed (after `rotate-key`). Run it from a timer
    /// more often than the gateway's rotation overlap (daily, say).
    ///
    /// Example: gatekeeper client refresh --credential laptop.credential.toml
    Refresh {
        /// The credential file to update.
        #[arg(long, value_name = "FILE")]
        credential: PathBuf,
        /// The gateway address [default: the credential's first server].
        #[arg(long, value_name = "ADDR")]
        server: Option<IpAddr>,
        /// How long to wait for the gateway.
        #[arg(long, value_name = "DURATION", value_parser = spec::duration, default_value = "3s")]
        timeout: Duration,
        /// One JSON object for scripts: {"changed", "server_public_key", "previous_accepted_until"}.
        #[arg(long)]
        json: bool,
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

fn parse_public_key(s: &str) -> Result<PublicKey, keys::KeyError> {
    keys::decode_public(s)
}

fn parse_ports(s: &str) -> Result<PortSet, spec::SpecError> {
    s.parse()
}

pub fn keygen(args: Keygen) -> Result<()> {
    if args.out.exists() && !args.force {
        bail!(
            "{} exists: pass --force to replace it (the device must then be enrolled again)",
            args.out.display()
        );
    }
    let secret = keys::generate();
    let mut text = credential::key_file_text(&secret);
    if args.encrypt {
        text = encrypted_file::encrypt(&text, &encrypted_file::new_passphrase(&args.out)?);
    }
    private_file::write(&args.out, &text).with_context(|| format!("writing the key file {}", args.out.display()))?;
    let public = PublicKey::from(&secret);
    let (encoded, fingerprint) = (keys::encode(public.as_bytes()), enrollment::fingerprint(&public));
    if args.json {
        println!(
            "{}",
            json!({"key_file": args.out, "public_key": encoded, "fingerprint": fingerprint})
        );
        return Ok(());
    }
    println!(
        "key pair written to {} (0600); its secret never leaves this device",
        args.out.display()
    );
    println!("public key: {encoded}");
    println!("fingerprint: {fingerprint}");
    println!("next, on the gateway: gatekeeper client add NAME --public-key {encoded} --allow tcp/22");
    Ok(())
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

/// Asks the gateway for its knock key and updates the credential file.
fn refresh(path: &Path, server: Option<IpAddr>, timeout: Duration, json: bool) -> Result<()> {
    let (text, passphrase) = encrypted_file::read(path)?;
    let k = Knocker::new(Credential::load_text(&text, path)?)
        .with_context(|| format!("the credential {}", path.display()))?;
    let at = k.server(server)?;
    let note = note::fetch(&k, at, timeout)?;
    // The file as written (its key stays where it is), with the new key,
    // encrypted again if it was.
    let mut cred = Credential::parse(&text, path)?;
    let changed = cred.server_public_key != note.server_public_key;
    if changed {
        keys::decode_public(&note.server_public_key).context("the gateway's key note")?;
        cred.server_public_key = note.server_public_key.clone();
        let mut text = cred.to_file_text();
        if let Some(p) = &passphrase {
            text = encrypted_file::encrypt(&text, p);
        }
        private_file::write(path, &text).with_context(|| format!("writing the credential {}", path.display()))?;
    }
    if json {
        println!(
            "{}",
            json!({"changed": changed, "server_public_key": note.server_public_key, "previous_accepted_until": note.previous_accepted_until})
        );
        return Ok(());
    }
    if changed {
        println!(
            "the gateway's knock key changed: {} now names {}",
            path.display(),
            note.server_public_key
        );
    } else {
        println!("{} is up to date with the gateway's knock key", path.display());
    }
    Ok(())
}

/// One line on whether the daemon accepts a new device's knocks yet.
fn say_enrolled(state: &StateArg) {
    match confirm(state) {
        Confirmed::Applied(_) => println!("the running daemon accepts its knocks now"),
        Confirmed::Nodes(nodes) => println!("every running node accepts its knocks now ({})", nodes.join(", ")),
        Confirmed::NoDaemon => {}
        Confirmed::Unconfirmed(why) => println!(
            "note: the running daemon did not confirm it ({why}); it accepts the device's knocks within a second"
        ),
    }
}

pub fn encrypt(args: Encrypt) -> Result<()> {
    let (text, passphrase) = encrypted_file::read(&args.file)?;
    if passphrase.is_some() {
        bail!("{} is encrypted already", args.file.display());
    }
    let sealed = encrypted_file::encrypt(&text, &encrypted_file::new_passphrase(&args.file)?);
    private_file::write(&args.file, &sealed).with_context(|| format!("writing {}", args.file.display()))?;
    println!(
        "{} is encrypted; gatekeeper asks for its passphrase (or reads GATEKEEPER_PASSPHRASE) to use it",
        args.file.display()
    );
    Ok(())
}

pub fn forget(args: Forget) -> Result<()> {
    if encrypted_file::forget(&args.file) {
        println!(
            "forgot the passphrase of {}: its next use asks again",
            args.file.display()
        );
    } else {
        println!("the keyring holds no passphrase for {}", args.file.display());
    }
    Ok(())
}

pub fn decrypt(args: Decrypt) -> Result<()> {
    let (text, passphrase) = encrypted_file::read(&args.file)?;
    if passphrase.is_none() {
        bail!("{} is not encrypted", args.file.display());
    }
    private_file::write(&args.file, &text).with_context(|| format!("writing {}", args.file.display()))?;
    println!("{} is plain again (0600)", args.file.display());
    Ok(())
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
            policy,
            public_key,
            out,
            state,
        } => {
            let store = state.store()?;
            let (rec, cred) = store.add_client(&policy.new_client(name.clone(), public_key, None))?;
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
                println!(
                    "note: the state has no public_addrs, so the credential names no server: pass --server when knocking"
                );
            }
            say_enrolled(&state);
        }
        Client::Request {
            key,
            gateway,
            name,
            json,
        } => {
            let made = !key.exists();
            if made {
                private_file::write(&key, &credential::key_file_text(&keys::generate()))
                    .with_context(|| format!("writing the key file {}", key.display()))?;
            }
            let secret = credential::read_key_file(&key)?;
            let req = enrollment::Request {
                name,
                public_key: keys::encode(PublicKey::from(&secret).as_bytes()),
                gateway,
                hostname: hostname(),
                platform: std::env::consts::OS.into(),
            };
            if json {
                println!(
                    "{}",
                    json!({"request": req.to_line(), "fingerprint": req.fingerprint(), "key_file": key, "key_made": made})
                );
                return Ok(());
            }
            if made {
                println!("made this device's key pair in {} (0600)", key.display());
            }
            println!(
                "send this line to the gateway's operator (it holds no secret):\n\n{}\n",
                req.to_line()
            );
            println!(
                "then read them this fingerprint, which `client approve` shows: {}",
                req.fingerprint()
            );
            println!(
                "when they send back a credential line: gatekeeper client install LINE --key {}",
                key.display()
            );
        }
        Client::Approve {
            request,
            policy,
            fingerprint,
            json,
            state,
        } => {
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
        }
        Client::Install { credential, key, out } => {
            let file = Path::new(&credential);
            let mut cred = if file.is_file() {
                let cred = Credential::read(file)?;
                if cred.secret_key.is_some() {
                    bail!(
                        "{credential} carries its own secret key: use it as it is (gatekeeper knock --credential {credential})"
                    );
                }
                cred
            } else {
                enrollment::credential_from_line(&credential)?
            };
            credential::read_key_file(&key)?;
            let key = std::fs::canonicalize(&key).with_context(|| format!("the key file {}", key.display()))?;
            cred.key_file = Some(key);
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{}.credential.toml", cred.name)));
            private_file::write(&out, &cred.to_file_text())
                .with_context(|| format!("writing the credential {}", out.display()))?;
            println!(
                "installed {}: gatekeeper knock --credential {} (keep the key file where it is)",
                out.display(),
                out.display()
            );
        }
        Client::Refresh {
            credential,
            server,
            timeout,
            json,
        } => refresh(&credential, server, timeout, json)?,
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
