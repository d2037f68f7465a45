//! The device's own key tools: `keygen`, `encrypt`, `decrypt`, `forget`,
//! and `client request|install|refresh`. In both builds.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use gatekeeper::{
    encrypted_file,
    knock::{
        credential::{self, Credential},
        enrollment, keys, note,
        send::Knocker,
    },
    platform, private_file,
};
use serde_json::json;
use x25519_dalek::PublicKey;

/// Make this device's key pair: the secret stays in FILE, the public key is printed.
///
/// The file is yours alone (0600; on Windows an ACL for your user alone),
/// --encrypt adds a passphrase; give the public key to the gateway's operator.
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
/// On Linux, a passphrase typed at the prompt is kept in the kernel's user
/// keyring for an hour, so the commands that follow do not ask again;
/// other systems keep none, and ask each time.
///
/// Example: gatekeeper forget laptop.key
#[derive(Args, Debug)]
pub struct Forget {
    file: PathBuf,
}

/// Make an encrypted credential or key file plain again (yours alone), for
/// an unattended device.
///
/// Example: GATEKEEPER_PASSPHRASE=... gatekeeper decrypt laptop.key
#[derive(Args, Debug)]
pub struct Decrypt {
    file: PathBuf,
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
        "key pair written to {} (yours alone); its secret never leaves this device",
        args.out.display()
    );
    println!("public key: {encoded}");
    println!("fingerprint: {fingerprint}");
    println!("next, on the gateway: gatekeeper client add NAME --public-key {encoded} --allow tcp/22");
    Ok(())
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
    if !platform::keyring::KEEPS {
        println!(
            "this system keeps no typed passphrase: every use of {} asks",
            args.file.display()
        );
    } else if encrypted_file::forget(&args.file) {
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
    println!("{} is plain again (yours alone)", args.file.display());
    Ok(())
}

/// `client request`: the line asking the gateway to enroll this device.
pub fn request(key: PathBuf, gateway: String, name: String, json: bool) -> Result<()> {
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
        hostname: platform::hostname(),
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
        println!("made this device's key pair in {} (yours alone)", key.display());
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
    Ok(())
}

/// `client install`: the credential the gateway sent, naming this device's key file.
pub fn install(credential: String, key: PathBuf, out: Option<PathBuf>) -> Result<()> {
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
    Ok(())
}

/// Asks the gateway for its knock key and updates the credential file.
pub fn refresh(path: &Path, server: Option<IpAddr>, timeout: Duration, json: bool) -> Result<()> {
    let (text, passphrase) = encrypted_file::read(path)?;
    let k = Knocker::new(Credential::load_text(&text, path)?)
        .with_context(|| format!("the credential {}", path.display()))?;
    let at = k.server(server)?;
    let note::Fetched { note, tls_pin } = note::fetch(&k, at, timeout)?;
    // The file as written (its key stays where it is), with the new key,
    // encrypted again if it was.
    let mut cred = Credential::parse(&text, path)?;
    let changed = cred.server_public_key != note.server_public_key;
    // A credential from before key pins pins the gateway's whole
    // certificate: it now pins the key, which renewals keep.
    let repinned = tls_pin
        .map(|p| p.to_string())
        .filter(|p| cred.tls_fingerprint.as_ref() != Some(p));
    if changed || repinned.is_some() {
        keys::decode_public(&note.server_public_key).context("the gateway's key note")?;
        cred.server_public_key = note.server_public_key.clone();
        if let Some(pin) = &repinned {
            cred.tls_fingerprint = Some(pin.clone());
        }
        let mut text = cred.to_file_text();
        if let Some(p) = &passphrase {
            text = encrypted_file::encrypt(&text, p);
        }
        private_file::write(path, &text).with_context(|| format!("writing the credential {}", path.display()))?;
    }
    if json {
        println!(
            "{}",
            json!({"changed": changed, "server_public_key": note.server_public_key, "previous_accepted_until": note.previous_accepted_until, "repinned": repinned.is_some()})
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
    if let Some(pin) = repinned {
        println!("it now pins the gateway's public key {pin}, which certificate renewals keep");
    }
    Ok(())
}
