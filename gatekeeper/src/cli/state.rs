//! What the gateway's commands work on: a gate (its pins) and a state
//! (the directory, or the cluster's Redis), and the running daemon's word
//! that it applied a change. The gateway build only.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::Args;
use gatekeeper::{
    control::{self, Applied, ControlError, Reply, Request},
    store::{
        Store,
        cluster::ClusterStore,
        files::{DEFAULT_STATE_DIR, FileStore},
    },
};

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
    pub iface: Option<String>,
    /// Pin directory the gate was started with (overrides --gate and --iface).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
}

impl Target {
    pub fn resolve(&self) -> Result<PathBuf> {
        Ok(gatekeeper::gate::pins::resolve(
            self.gate.as_deref(),
            self.iface.as_deref(),
            self.pin_dir.as_deref(),
        )?)
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
