//! `gatekeeper cert`: the gateway's own certificate, which the tunnel
//! listener serves (and the portal, unless it has its own files).

use anyhow::Result;
use clap::{Args, Subcommand};
use gatekeeper::clock::rfc3339;
use serde_json::json;
use tunnel::tls::Identity;

use super::{Confirmed, StateArg, confirm};

/// The gateway's own certificate: self-signed, named after `server_name`
/// and `public_addrs`, valid for a year. The daemon renews it two thirds
/// of the way through, with the same key, so tokens and credentials (which
/// pin the key) hold across renewals. `gatekeeper status` shows every
/// certificate the daemon serves.
#[derive(Subcommand, Debug)]
pub enum Cert {
    /// Show the certificate in the state: subject, validity, renewal, pin.
    ///
    /// Example: gatekeeper cert show --json | jq .renews_at
    Show(CertArgs),
    /// Renew it now, with the same key: valid for a year from now, under the
    /// names the config gives today. The running daemon serves it at once;
    /// sessions already up keep the old one.
    ///
    /// A certificate made by an earlier release (subject "rcgen self signed
    /// cert", valid 1975-4096) identifies the product to scanners and is
    /// never renewed by itself: tunnel tokens and credentials issued before
    /// key pins pin the whole certificate, and stop working when it is
    /// renewed. Move them to key pins first (`client refresh` on each
    /// device, `tunnel reissue` for each tunnel), then run this.
    ///
    /// Example: gatekeeper cert renew
    Renew(CertArgs),
}

#[derive(Args, Debug)]
pub struct CertArgs {
    #[command(flatten)]
    state: StateArg,
    /// One JSON object for scripts.
    #[arg(long)]
    json: bool,
}

pub fn cert(command: Cert) -> Result<()> {
    match command {
        Cert::Show(args) => {
            let identity = args.state.store()?.identity()?;
            print(&identity, args.json)
        }
        Cert::Renew(args) => {
            let store = args.state.store()?;
            let before = store.identity()?.fingerprint();
            let renewed = store.renew_identity()?;
            let confirmed = confirm(&args.state);
            if !args.json {
                println!("renewed: certificate {before} is now {}", renewed.fingerprint());
            }
            print(&renewed, args.json)?;
            if !args.json {
                match confirmed {
                    Confirmed::Applied(_) => println!("the running daemon serves it now"),
                    Confirmed::Nodes(nodes) => println!("every running node serves it now ({})", nodes.join(", ")),
                    Confirmed::NoDaemon => {}
                    Confirmed::Unconfirmed(why) => println!(
                        "note: the running daemon did not confirm it ({why}); it serves it within a few seconds"
                    ),
                }
            }
            Ok(())
        }
    }
}

fn print(identity: &Identity, as_json: bool) -> Result<()> {
    let s = identity.summary()?;
    let renews_at = s.self_renewal();
    if as_json {
        println!(
            "{}",
            json!({
                "subject": s.subject, "issuer": s.issuer, "serial": s.serial,
                "not_before": s.not_before, "not_after": s.not_after, "renews_at": renews_at,
                "pin": identity.pin().to_string(), "certificate_sha256": identity.fingerprint().to_string(),
                "old_default": s.old_default(),
            })
        );
        return Ok(());
    }
    println!("subject:  {}", s.subject);
    println!("issuer:   {}", s.issuer);
    println!("serial:   {}", s.serial);
    println!("valid:    {} to {}", rfc3339(s.not_before), rfc3339(s.not_after));
    match renews_at {
        Some(at) => println!("renews:   {} (by the running daemon, same key)", rfc3339(at)),
        None if s.old_default() => println!(
            "renews:   never by itself: made by an earlier release, it identifies the product to scanners (see `gatekeeper cert renew --help`)"
        ),
        None => println!("renews:   never by itself (not self-signed)"),
    }
    println!(
        "pin:      {} (SHA-256 of the public key; tokens and credentials carry it)",
        identity.pin()
    );
    Ok(())
}
