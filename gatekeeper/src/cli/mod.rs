//! Command-line definitions and dispatch: the binary's edge, where typed
//! errors become one-line messages. The device's commands are in both
//! builds; the gateway's only in the gateway build.

mod agent;
mod client;
mod device;
mod knock;
mod portal;

#[cfg(feature = "gateway")]
mod audit;
#[cfg(feature = "gateway")]
mod cert;
#[cfg(feature = "gateway")]
mod channel;
#[cfg(feature = "gateway")]
mod enroll;
#[cfg(feature = "gateway")]
mod generate;
#[cfg(feature = "gateway")]
mod import;
#[cfg(feature = "gateway")]
mod interfaces;
#[cfg(feature = "gateway")]
mod maps;
#[cfg(feature = "gateway")]
mod relay;
#[cfg(feature = "gateway")]
mod run;
#[cfg(feature = "gateway")]
mod state;
#[cfg(feature = "gateway")]
mod status;
#[cfg(feature = "gateway")]
mod tunnel;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gatekeeper::knock::{credential::Credential, journal::Journal, send::Knocker};
#[cfg(feature = "gateway")]
use state::{Confirmed, StateArg, Target, confirm};

/// Gatekeeper: an XDP gate that keeps a gateway's services invisible to
/// everyone who has not been let in.
///
/// `run` loads the gate on one or more interfaces and serves it; `status` asks the
/// running daemon what it is doing. The map commands read and change the
/// gate's pinned maps directly, so they work whether or not the daemon is
/// running; `client` and `tunnel` change the state directory and have the
/// running daemon confirm it applied the change.
#[derive(Parser, Debug)]
#[command(name = "gatekeeper", version = gatekeeper::VERSION, propagate_version = true)]
#[cfg_attr(
    not(feature = "gateway"),
    command(
        about = "Gatekeeper's client: knock on a gateway, reach what is behind it, publish a service through it.",
        long_about = "Gatekeeper's client: knock on a gateway, reach what is behind it, publish a service through it.\n\nThis build holds what a device runs: `knock`, `connect`, `portal`, `agent` and the device's key tools (`keygen`, `client request|install|refresh`, `encrypt`, `decrypt`, `forget`). The gateway's commands are in the gateway build."
    )
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[cfg(feature = "gateway")]
    Run(run::RunArgs),
    #[cfg(feature = "gateway")]
    Status(status::StatusArgs),
    #[cfg(feature = "gateway")]
    Attach(interfaces::Attach),
    #[cfg(feature = "gateway")]
    Detach(interfaces::Detach),
    #[cfg(feature = "gateway")]
    #[command(subcommand)]
    Whitelist(maps::Whitelist),
    #[cfg(feature = "gateway")]
    #[command(subcommand)]
    Allow(maps::Allow),
    #[cfg(feature = "gateway")]
    Stats(maps::Stats),
    #[cfg(feature = "gateway")]
    Audit(audit::AuditArgs),
    #[cfg(feature = "gateway")]
    Init(enroll::Init),
    #[cfg(feature = "gateway")]
    #[command(subcommand)]
    Import(import::Import),
    #[cfg(feature = "gateway")]
    RotateKey(enroll::RotateKey),
    #[cfg(feature = "gateway")]
    #[command(subcommand)]
    Cert(cert::Cert),
    Keygen(device::Keygen),
    Encrypt(device::Encrypt),
    Decrypt(device::Decrypt),
    Forget(device::Forget),
    #[command(subcommand)]
    Client(client::Client),
    Knock(knock::Knock),
    Connect(knock::Connect),
    Portal(portal::PortalArgs),
    #[cfg(feature = "gateway")]
    #[command(subcommand)]
    Tunnel(tunnel::Tunnel),
    Agent(agent::Agent),
    #[cfg(feature = "gateway")]
    #[command(subcommand)]
    Relay(relay::Relay),
    #[cfg(feature = "gateway")]
    RelayAgent(relay::RelayAgent),
    #[cfg(feature = "gateway")]
    #[command(subcommand)]
    Channel(channel::Channel),
    #[cfg(feature = "gateway")]
    #[command(subcommand)]
    Generate(generate::Generate),
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

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        #[cfg(feature = "gateway")]
        Command::Run(args) => run::run(args),
        #[cfg(feature = "gateway")]
        Command::Status(args) => status::status(args),
        #[cfg(feature = "gateway")]
        Command::Attach(a) => interfaces::attach(a),
        #[cfg(feature = "gateway")]
        Command::Detach(d) => interfaces::detach(d),
        #[cfg(feature = "gateway")]
        Command::Whitelist(w) => maps::whitelist(w),
        #[cfg(feature = "gateway")]
        Command::Allow(a) => maps::allow(a),
        #[cfg(feature = "gateway")]
        Command::Stats(s) => maps::stats(s),
        #[cfg(feature = "gateway")]
        Command::Audit(a) => audit::audit(a),
        #[cfg(feature = "gateway")]
        Command::Init(i) => enroll::init(i),
        #[cfg(feature = "gateway")]
        Command::RotateKey(r) => enroll::rotate_key(r),
        #[cfg(feature = "gateway")]
        Command::Cert(c) => cert::cert(c),
        Command::Keygen(k) => device::keygen(k),
        Command::Encrypt(e) => device::encrypt(e),
        Command::Decrypt(d) => device::decrypt(d),
        Command::Forget(f) => device::forget(f),
        Command::Client(c) => client::client(c),
        Command::Knock(k) => knock::knock(k),
        Command::Connect(c) => knock::connect(c),
        Command::Portal(p) => portal::portal(p),
        #[cfg(feature = "gateway")]
        Command::Tunnel(t) => tunnel::tunnel(t),
        Command::Agent(a) => agent::agent(a),
        #[cfg(feature = "gateway")]
        Command::Relay(r) => relay::relay(r),
        #[cfg(feature = "gateway")]
        Command::RelayAgent(a) => relay::relay_agent(a),
        #[cfg(feature = "gateway")]
        Command::Channel(c) => channel::channel(c),
        #[cfg(feature = "gateway")]
        Command::Generate(g) => generate::generate(g),
        #[cfg(feature = "gateway")]
        Command::Import(i) => import::import(i),
    }
}

/// The exit status for an error: 4 when a tunnel agent was refused for
/// good (revoked, re-issued, a wrong pin), so a service manager knows a
/// restart cannot help (`RestartPreventExitStatus=4`); 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> std::process::ExitCode {
    match e.downcast_ref::<gatekeeper::tunnels::agent::AgentError>() {
        Some(gatekeeper::tunnels::agent::AgentError::Refused(_)) => std::process::ExitCode::from(4),
        _ => std::process::ExitCode::FAILURE,
    }
}

/// Where a device records the knocks it sends.
#[derive(Args, Debug, Clone)]
pub struct JournalArg {
    /// Record each knock sent (time, knock id, target, what came of it)
    /// in FILE, for `gatekeeper audit merge` on the gateway [default:
    /// beside the credential, NAME.knocks.jsonl].
    #[arg(long, value_name = "FILE")]
    knock_log: Option<PathBuf>,
    /// Keep no record of the knocks sent.
    #[arg(long, conflicts_with = "knock_log")]
    no_knock_log: bool,
}

impl JournalArg {
    fn journal(&self, credential: &Path) -> Option<Journal> {
        match (&self.knock_log, self.no_knock_log) {
            (_, true) => None,
            (Some(path), false) => Some(Journal::new(path.clone())),
            (None, false) => Some(Journal::beside(credential)),
        }
    }
}

/// The knocker for the credential file at `path`, recording its knocks
/// where `journal` says.
pub fn knocker(path: &Path, journal: &JournalArg) -> Result<Knocker> {
    let cred = Credential::load(path)?;
    Ok(Knocker::new(cred)
        .with_context(|| format!("the credential {}", path.display()))?
        .with_journal(journal.journal(path)))
}
