//! Command-line definitions and dispatch: the binary's edge, where typed
//! errors become one-line messages.

mod enroll;
mod interfaces;
mod knock;
mod maps;
mod portal;
mod run;
mod status;
mod tunnel;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gatekeeper::{
    control::{self, Applied, ControlError, Reply, Request},
    knock::{credential::Credential, send::Knocker},
    store::files::{DEFAULT_STATE_DIR, FileStore},
};

/// Gatekeeper: an XDP gate that keeps a gateway's services invisible to
/// everyone who has not been let in.
///
/// `run` loads the gate on one or more interfaces and serves it; `status` asks the
/// running daemon what it is doing. The map commands read and change the
/// gate's pinned maps directly, so they work whether or not the daemon is
/// running; `client` and `tunnel` change the state directory and have the
/// running daemon confirm it applied the change.
#[derive(Parser, Debug)]
#[command(name = "gatekeeper", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Run(run::RunArgs),
    Status(status::StatusArgs),
    Attach(interfaces::Attach),
    Detach(interfaces::Detach),
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
    /// The gate's name (its pins are /sys/fs/bpf/gatekeeper/GATE; `run`
    /// names it after its first interface unless given --gate).
    /// Optional when exactly one gate is pinned.
    #[arg(long, value_name = "GATE")]
    gate: Option<String>,
    /// An interface the gate spans (instead of --gate).
    #[arg(long, value_name = "IFACE", conflicts_with = "gate")]
    iface: Option<String>,
    /// Pin directory the gate was started with (overrides --gate and --iface).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
}

impl Target {
    fn resolve(&self) -> Result<PathBuf> {
        Ok(gatekeeper::gate::pins::resolve(
            self.gate.as_deref(),
            self.iface.as_deref(),
            self.pin_dir.as_deref(),
        )?)
    }
}

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Status(args) => status::status(args),
        Command::Attach(a) => interfaces::attach(a),
        Command::Detach(d) => interfaces::detach(d),
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

/// Which state directory a command works on.
#[derive(Args, Debug, Clone)]
pub struct StateArg {
    /// The gateway's state directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

impl StateArg {
    pub fn store(&self) -> FileStore {
        FileStore::new(&self.state_dir)
    }
}

/// The knocker for the credential file at `path`.
pub fn knocker(path: &Path) -> Result<Knocker> {
    let cred = Credential::load(path)?;
    Knocker::new(cred).with_context(|| format!("the credential {}", path.display()))
}

/// What the running daemon said about a change just written.
pub enum Confirmed {
    Applied(Applied),
    /// No daemon runs for this state directory.
    NoDaemon,
    /// A daemon runs but did not answer; it applies the change by itself
    /// within a second.
    Unconfirmed(String),
}

/// Asks the daemon serving `store` to apply what was just written.
pub fn confirm(store: &FileStore) -> Confirmed {
    match control::ask(&store.control_socket(), &Request::Reload) {
        Ok(Reply::Applied(applied)) => Confirmed::Applied(applied),
        Ok(_) => Confirmed::Unconfirmed("it answered something other than what it applied".into()),
        Err(ControlError::NoDaemon(_)) => Confirmed::NoDaemon,
        Err(e) => Confirmed::Unconfirmed(gatekeeper::error_chain(&e)),
    }
}
