//! `gatekeeper client`: devices enrolled on the gateway (`add`, `approve`,
//! `list`, `revoke`, `enable`; the gateway build) and the device's side of
//! enrollment (`request`, `install`, `refresh`; both builds).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::Subcommand;
#[cfg(feature = "gateway")]
use gatekeeper::knock::keys;
use gatekeeper::spec;
#[cfg(feature = "gateway")]
use x25519_dalek::PublicKey;

use super::device;
#[cfg(feature = "gateway")]
use super::{StateArg, enroll, enroll::Policy};

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
#[cfg_attr(
    not(feature = "gateway"),
    command(
        about = "This device's enrollment: ask for it, install the credential, follow key rotations",
        long_about = "This device's enrollment: ask for it, install the credential, follow key rotations.\n\nThe device makes its key (`gatekeeper keygen`), sends the line `client request` prints to the gateway's operator, who approves it, and installs the credential line it gets back with `client install`. `client refresh` learns the gateway's new knock key after a rotation."
    )
)]
pub enum Client {
    #[cfg(feature = "gateway")]
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
        /// Also let the device knock with the stock fwknop client (2.6,
        /// `--use-hmac`): makes its keys and prints the ~/.fwknoprc stanza
        /// (`fwknop -n NAME`). The gateway keeps these keys: fwknop's are
        /// symmetric.
        #[arg(long)]
        fwknop: bool,
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
    #[cfg(feature = "gateway")]
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
    #[cfg(feature = "gateway")]
    /// List enrolled devices, and name every client file that cannot be used.
    List {
        /// One JSON object for scripts: {"clients": [...], "problems": [...]}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    #[cfg(feature = "gateway")]
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
    #[cfg(feature = "gateway")]
    /// Re-enable a revoked device.
    Enable {
        name: String,
        #[command(flatten)]
        state: StateArg,
    },
}

#[cfg(feature = "gateway")]
fn parse_public_key(s: &str) -> Result<PublicKey, keys::KeyError> {
    keys::decode_public(s)
}

pub fn client(cmd: Client) -> Result<()> {
    match cmd {
        #[cfg(feature = "gateway")]
        Client::Add {
            name,
            policy,
            public_key,
            out,
            fwknop,
            state,
        } => enroll::add(name, policy, public_key, out, fwknop, state),
        Client::Request {
            key,
            gateway,
            name,
            json,
        } => device::request(key, gateway, name, json),
        #[cfg(feature = "gateway")]
        Client::Approve {
            request,
            policy,
            fingerprint,
            json,
            state,
        } => enroll::approve(request, policy, fingerprint, json, state),
        Client::Install { credential, key, out } => device::install(credential, key, out),
        Client::Refresh {
            credential,
            server,
            timeout,
            json,
        } => device::refresh(&credential, server, timeout, json),
        #[cfg(feature = "gateway")]
        Client::List { json, state } => enroll::list(json, state),
        #[cfg(feature = "gateway")]
        Client::Revoke { name, json, state } => enroll::revoke(name, json, state),
        #[cfg(feature = "gateway")]
        Client::Enable { name, state } => enroll::enable(name, state),
    }
}
