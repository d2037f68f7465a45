//! `gatekeeper channel`: carry unmodified applications between devices
//! under a mandated cipher policy.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use gatekeeper::channel::{self, config::Channels, credentials};
use serde_json::json;

/// Wrap applications' connections in TLS 1.3 under a cipher policy
/// (`sm`: RFC 8998's SM4/SM3/SM2; `tls13-aes`; `tls13-chacha`), between
/// devices that pin each other's certificates (see docs/channel.md).
///
/// On each device: `channel init` once, `channel pair` with each peer's
/// public.pem, then `channel run` with a channels.toml.
#[derive(Subcommand, Debug)]
pub enum Channel {
    /// Carry the channels of a config until SIGTERM or Ctrl-C.
    ///
    /// Needs root (or CAP_NET_ADMIN) for capture (`capture = ...`) and for
    /// `source = "client"`; a channel with `listen` alone needs neither.
    ///
    /// Example: gatekeeper channel run --config /etc/gatekeeper/channels.toml
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value = "text")]
        log_format: super::LogFormat,
    },
    /// Make this device's SM2 and ECDSA identities in DIR.
    ///
    /// Writes the keys (0600), their self-signed certificates, and
    /// public.pem: give that file to each peer for `channel pair`.
    ///
    /// Example: gatekeeper channel init --dir /etc/gatekeeper/channel --name plant-a
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// This device's name, in its certificates.
        #[arg(long)]
        name: String,
        /// Replace existing keys (every peer must pair again).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Pin a peer: keep the certificates of its public.pem under NAME.
    ///
    /// Channels name peers by NAME (`peer = ...`, `peers = [...]`). Compare
    /// the fingerprints printed here with the ones the peer's `channel
    /// init` printed before trusting them.
    ///
    /// Example: gatekeeper channel pair --dir /etc/gatekeeper/channel --name plant-b plant-b.pem
    Pair {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The name channels use for this peer.
        #[arg(long)]
        name: String,
        /// The peer's public.pem.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn channel(command: Channel) -> Result<()> {
    match command {
        Channel::Run { config, log_format } => {
            let channels = Channels::load(&config)?;
            super::init_logging(log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(channel::run(channels, super::run::shutdown_signal(), |running| {
                for (name, addr) in &running.listening {
                    eprintln!("gatekeeper: channel {name} listening on {addr}");
                }
            }))?;
        }
        Channel::Init { dir, name, force, json } => {
            let made = credentials::init(&dir, &name, force)?;
            if json {
                let out = json!({"public": made.public, "sm2": made.sm2.to_string(), "ecdsa": made.ecdsa.to_string()});
                println!("{out}");
            } else {
                println!("made the channel identities of {name} in {}", dir.display());
                println!("  sm2   {}", made.sm2);
                println!("  ecdsa {}", made.ecdsa);
                println!(
                    "give {} to each peer: `gatekeeper channel pair --dir DIR --name {name} public.pem`",
                    made.public.display()
                );
            }
        }
        Channel::Pair { dir, name, file, json } => {
            let pins = credentials::pair(&dir, &name, &file)?;
            let pins: Vec<String> = pins.iter().map(ToString::to_string).collect();
            if json {
                println!("{}", json!({"peer": name, "pinned": pins}));
            } else {
                println!("paired {name}: pinned {} certificate(s)", pins.len());
                for pin in pins {
                    println!("  {pin}");
                }
            }
        }
    }
    Ok(())
}
