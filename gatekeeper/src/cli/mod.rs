//! Command-line definitions and dispatch.

mod enroll;
mod knock;
mod maps;
mod portal;
mod run;
mod tunnel;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// Gatekeeper: an XDP gate that keeps a gateway's services invisible to
/// everyone who has not been let in.
///
/// `run` loads the gate on an interface and serves it. The other commands
/// read and change the gate's pinned maps directly, so they work whether or
/// not the daemon is running.
#[derive(Parser, Debug)]
#[command(name = "gatekeeper", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Run(run::RunArgs),
    Detach(Detach),
    #[command(subcommand)]
    Whitelist(maps::Whitelist),
    #[command(subcommand)]
    Allow(maps::Allow),
    Stats(maps::Stats),
    Init(enroll::Init),
    #[command(subcommand)]
    Client(enroll::Client),
    Knock(knock::Knock),
    Connect(knock::Connect),
    Portal(portal::PortalArgs),
    #[command(subcommand)]
    Tunnel(tunnel::Tunnel),
    Agent(tunnel::Agent),
}

/// Log format on stderr, for the long-running commands.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Structured logs on stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Which gate a command works on.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Interface the gate runs on (its pins are /sys/fs/bpf/gatekeeper/IFACE).
    /// Optional when exactly one gate is pinned.
    #[arg(long, value_name = "IFACE")]
    iface: Option<String>,
    /// Pin directory the gate was started with (overrides --iface).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
}

impl Target {
    fn resolve(&self) -> Result<PathBuf> {
        Ok(gatekeeper::pins::resolve(
            self.iface.as_deref(),
            self.pin_dir.as_deref(),
        )?)
    }
}

/// Remove the gate from an interface: unpins the XDP link and every map.
///
/// This opens the interface to everyone and forgets every whitelist entry.
/// A running daemon notices within one sweep interval and exits.
#[derive(Args, Debug)]
struct Detach {
    #[command(flatten)]
    target: Target,
}

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Detach(d) => {
            let dir = d.target.resolve()?;
            let had_link = gatekeeper::gate::unpin_all(&dir)?;
            if had_link {
                println!("detached: removed the gate and its maps at {}", dir.display());
            } else {
                println!("removed the maps at {} (no program was attached)", dir.display());
            }
            Ok(())
        }
        Command::Whitelist(w) => maps::whitelist(w),
        Command::Allow(a) => maps::allow(a),
        Command::Stats(s) => maps::stats(s),
        Command::Init(i) => enroll::init(i),
        Command::Client(c) => enroll::client(c),
        Command::Knock(k) => knock::knock(k),
        Command::Connect(c) => knock::connect(c),
        Command::Portal(p) => portal::portal(p),
        Command::Tunnel(t) => tunnel::tunnel(t),
        Command::Agent(a) => tunnel::agent(a),
    }
}
