//! Command-line definitions and dispatch: the binary's edge, where typed
//! errors become one-line messages.

mod audit;
mod channel;
mod enroll;
mod generate;
mod interfaces;
mod knock;
mod maps;
mod portal;
mod relay;
mod run;
mod status;
mod tunnel;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gatekeeper::{
    control::{self, Applied, ControlError, Reply, Request},
    knock::{credential::Credential, journal::Journal, send::Knocker},
    store::{
        Store,
        cluster::ClusterStore,
        files::{DEFAULT_STATE_DIR, FileStore},
    },
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
#[command(name = "gatekeeper", version = gatekeeper::VERSION, propagate_version = true)]
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
    Audit(audit::AuditArgs),
    Init(enroll::Init),
    RotateKey(enroll::RotateKey),
    Keygen(enroll::Keygen),
    Encrypt(enroll::Encrypt),
    Decrypt(enroll::Decrypt),
    Forget(enroll::Forget),
    #[command(subcommand)]
    Client(enroll::Client),
    Knock(knock::Knock),
    Connect(knock::Connect),
    Portal(portal::PortalArgs),
    #[command(subcommand)]
    Tunnel(tunnel::Tunnel),
    Agent(tunnel::Agent),
    #[command(subcommand)]
    Relay(relay::Relay),
    RelayAgent(relay::RelayAgent),
    #[command(subcommand)]
    Channel(channel::Channel),
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
        Command::Audit(a) => audit::audit(a),
        Command::Init(i) => enroll::init(i),
        Command::RotateKey(r) => enroll::rotate_key(r),
        Command::Keygen(k) => enroll::keygen(k),
        Command::Encrypt(e) => enroll::encrypt(e),
        Command::Decrypt(d) => enroll::decrypt(d),
        Command::Forget(f) => enroll::forget(f),
        Command::Client(c) => enroll::client(c),
        Command::Knock(k) => knock::knock(k),
        Command::Connect(c) => knock::connect(c),
        Command::Portal(p) => portal::portal(p),
        Command::Tunnel(t) => tunnel::tunnel(t),
        Command::Agent(a) => tunnel::agent(a),
        Command::Relay(r) => relay::relay(r),
        Command::RelayAgent(a) => relay::relay_agent(a),
        Command::Channel(c) => channel::channel(c),
        Command::Generate(g) => generate::generate(g),
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

/// Which state a command works on: a state directory, or a cluster's.
#[derive(Args, Debug, Clone)]
pub struct StateArg {
    /// The gateway's state directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The cluster's Redis: redis://[USER:PASS@]HOST:PORT[/DB], rediss://
    /// for TLS, or redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]
    /// [default: `[cluster] url` in the state directory's gatekeeper.toml].
    #[arg(long, value_name = "URL")]
    pub cluster: Option<String>,
}

impl StateArg {
    /// The state directory (in a cluster: this node's own files).
    pub fn local(&self) -> FileStore {
        FileStore::new(&self.state_dir)
    }

    /// The URL of the cluster this command works on, if any.
    pub fn cluster_url(&self) -> Result<Option<String>> {
        Ok(match &self.cluster {
            Some(url) => Some(url.clone()),
            None => {
                let files = self.local();
                let own = files.config_path().exists().then(|| files.config()).transpose()?;
                own.and_then(|c| c.cluster_url().map(str::to_string))
            }
        })
    }

    /// The cluster this command works on, if any.
    pub fn cluster(&self) -> Result<Option<ClusterStore>> {
        Ok(self.cluster_url()?.map(|u| ClusterStore::open(&u)).transpose()?)
    }

    /// Where the records live: the cluster's Redis, or the state directory.
    pub fn store(&self) -> Result<Box<dyn Store>> {
        Ok(match self.cluster()? {
            Some(cluster) => Box::new(cluster),
            None => Box::new(self.local()),
        })
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

/// What the running daemon said about a change just written.
pub enum Confirmed {
    Applied(Applied),
    /// Every running node of the cluster put it into force (their names).
    Nodes(Vec<String>),
    /// No daemon runs for this state directory.
    NoDaemon,
    /// A daemon runs but did not answer; it applies the change by itself
    /// within a second.
    Unconfirmed(String),
}

/// How long the CLI waits for a cluster's nodes to put a change into force.
const CLUSTER_CONFIRM: Duration = Duration::from_secs(3);

/// Asks the daemon serving `state` to apply what was just written; in a
/// cluster, waits until every running node reports it has.
pub fn confirm(state: &StateArg) -> Confirmed {
    match state.cluster() {
        Ok(Some(cluster)) => confirm_cluster(&cluster),
        Ok(None) => confirm_local(&state.local()),
        Err(e) => Confirmed::Unconfirmed(format!("{e:#}")),
    }
}

fn confirm_cluster(cluster: &ClusterStore) -> Confirmed {
    let written = match cluster.version() {
        Ok(v) => v.0,
        Err(e) => return Confirmed::Unconfirmed(gatekeeper::error_chain(&e)),
    };
    let end = Instant::now() + CLUSTER_CONFIRM;
    loop {
        let now_ms = gatekeeper::clock::unix_now_ms();
        let nodes = match cluster.nodes() {
            Ok(n) => n,
            Err(e) => return Confirmed::Unconfirmed(gatekeeper::error_chain(&e)),
        };
        let live: Vec<_> = nodes.iter().filter(|n| n.live_at(now_ms)).collect();
        if live.is_empty() {
            return Confirmed::NoDaemon;
        }
        let behind: Vec<&str> = live
            .iter()
            .filter(|n| n.applied < written)
            .map(|n| n.name.as_str())
            .collect();
        if behind.is_empty() {
            return Confirmed::Nodes(live.iter().map(|n| n.name.clone()).collect());
        }
        if Instant::now() >= end {
            return Confirmed::Unconfirmed(format!("{} has not applied it yet", behind.join(", ")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn confirm_local(store: &FileStore) -> Confirmed {
    match control::ask(&store.control_socket(), &Request::Reload) {
        Ok(Reply::Applied(applied)) => Confirmed::Applied(applied),
        Ok(_) => Confirmed::Unconfirmed("it answered something other than what it applied".into()),
        Err(ControlError::NoDaemon(_)) => Confirmed::NoDaemon,
        Err(e) => Confirmed::Unconfirmed(gatekeeper::error_chain(&e)),
    }
}
