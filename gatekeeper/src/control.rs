//! The running daemon's control socket, `STATE_DIR/control.sock` (0600,
//! root's): how the CLI learns what the daemon is doing and confirms that
//! a change it made has been applied. One JSON request per connection, one
//! JSON reply, each on a line.
//!
//! - `{"op":"status"}`: [`Status`], for `gatekeeper status`.
//! - `{"op":"reload"}`: the daemon reads the state now and applies it,
//!   answering with what it closed ([`Applied`]), for `client revoke`,
//!   `tunnel revoke` and the like.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::debug;

use crate::{
    audit::AuditStatus,
    store::{Problem, cluster::NodeReport},
};

/// How long the CLI waits for the daemon's answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request or reply line read.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("no daemon is running for this state directory (nothing answers on {0})")]
    NoDaemon(PathBuf),
    #[error("talking to the daemon on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon on {path} answered something unexpected: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("the daemon could not do it: {0}")]
    Refused(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Reload,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status(Box<Status>),
    Applied(Applied),
    Error { message: String },
}

/// A client or tunnel the daemon stopped letting in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedInfo {
    pub name: String,
    /// `revoked`, `expired`, `unreadable` or `removed`.
    pub why: String,
    /// Whitelist entries closed (clients) or sessions ended (tunnels).
    pub closed: usize,
}

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub clients_closed: Vec<ClosedInfo>,
    pub tunnels_closed: Vec<ClosedInfo>,
    /// Clients allowed to knock now.
    pub clients_allowed: usize,
    /// Records skipped as unusable, all of them (not only new ones).
    pub problems: Vec<Problem>,
    /// Reading the state failed: the daemon keeps the last records it read
    /// and retries.
    pub failed: Option<String>,
}

/// One tunnel as the running daemon sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub name: String,
    pub connected: bool,
    /// Unix seconds since the agent's session began.
    pub since: Option<u64>,
    pub connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub streams: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientsStatus {
    pub enrolled: usize,
    pub allowed: usize,
    pub problems: Vec<Problem>,
}

/// One interface the gate spans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// How its program is attached (`driver`, `generic`, ...).
    pub attachment: String,
    /// Its nonzero counters, summed over CPUs.
    pub counters: BTreeMap<String, u64>,
}

/// What `gatekeeper status` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    /// Unix seconds.
    pub started: u64,
    /// The gate's name: its pin directory's last part.
    pub gate: String,
    pub pin_dir: String,
    /// The interfaces the gate spans.
    pub interfaces: Vec<InterfaceStatus>,
    /// Interfaces receiving traffic for this host that the gate does not
    /// span: protected ports can be reached through them.
    pub uncovered: Vec<String>,
    pub mode: String,
    pub protect: String,
    pub state_dir: String,
    /// Whether knocks are verified (the state is initialised).
    pub knocks: bool,
    /// Whitelist entries in the gate at the daemon's last sweep.
    #[serde(default)]
    pub entries: u64,
    /// Knocks the daemon verified since it started, by result.
    #[serde(default)]
    pub knock_totals: crate::metrics::KnockTotals,
    pub clients: ClientsStatus,
    pub tunnel_port: Option<u16>,
    pub tunnels: Vec<TunnelStatus>,
    pub portal: Option<String>,
    pub audit: AuditStatus,
    /// The gate's counters, summed over CPUs and interfaces.
    pub counters: BTreeMap<String, u64>,
    /// The cluster this daemon is a node of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// The relay's public side, where this node serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<crate::relay::gateway::RelayStatus>,
    /// The certificates the listeners serve.
    #[serde(default)]
    pub certificates: Vec<CertificateStatus>,
}

/// A certificate a listener serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateStatus {
    /// The listeners serving it: "tunnel", "portal".
    pub serves: Vec<String>,
    /// Where it comes from: the state, the operator's certificate file, or
    /// "ACME".
    pub source: String,
    pub subject: String,
    pub issuer: String,
    /// Unix seconds.
    pub not_after: u64,
    /// When the gateway renews it (unix seconds), itself or from the ACME
    /// CA; none: it does not (an operator's CA certificate, one made by an
    /// earlier release, or the stand-in until ACME's first certificate).
    pub renews_at: Option<u64>,
    /// The SHA-256 pin of its public key, as tokens and credentials carry.
    pub pin: String,
    /// What needs the operator: a failed renewal, an identifying default.
    pub problem: Option<String>,
}

/// A node's view of its cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Where the shared records live (the password left out).
    pub location: String,
    /// This node's name.
    pub node: String,
    /// Every node that has reported, this one included.
    pub nodes: Vec<NodeStatus>,
}

/// One node, as the others see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub report: NodeReport,
    /// It reported within the last few seconds.
    pub live: bool,
}

/// Asks the daemon whose socket is `socket`.
pub fn ask(socket: &Path, request: &Request) -> Result<Reply, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NoDaemon(socket.to_path_buf()));
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_LINE as u64))
        .read_line(&mut answer)
        .map_err(io)?;
    let reply: Reply = serde_json::from_str(&answer).map_err(|e| ControlError::Protocol {
        path: socket.to_path_buf(),
        detail: e.to_string(),
    })?;
    match reply {
        Reply::Error { message } => Err(ControlError::Refused(message)),
        other => Ok(other),
    }
}

/// A request and where its reply goes, for the daemon's loop.
pub type Asked = (Request, oneshot::Sender<Reply>);

/// Binds the control socket at `path` (0600), replacing a stale one: the
/// caller holds the state directory's lock, so no live daemon owns it.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the socket: each connection's one request goes to `daemon`,
/// whose reply goes back. Ends when the daemon stops listening.
pub async fn serve(listener: UnixListener, daemon: mpsc::Sender<Asked>) {
    while let Ok((stream, _)) = listener.accept().await {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_LINE as u64));
            let read = tokio::time::timeout(TIMEOUT, reader.read_line(&mut line));
            let reply = match read.await {
                Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                    Ok(request) => {
                        let (tx, rx) = oneshot::channel();
                        if daemon.send((request, tx)).await.is_err() {
                            return;
                        }
                        match rx.await {
                            Ok(reply) => reply,
                            Err(_) => return,
                        }
                    }
                    Err(e) => Reply::Error {
                        message: format!("not a request: {e}"),
                    },
                },
                _ => return,
            };
            let mut text = serde_json::to_vec(&reply).unwrap_or_default();
            text.push(b'\n');
            if let Err(e) = wr.write_all(&text).await {
                debug!(error = %e, "a control client left before its reply");
            }
        });
    }
}
