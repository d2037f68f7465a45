//! The agent: inside a private network, knocks on the gateway, dials it over
//! TLS (pinning its certificate), proves itself with the token, and relays
//! the gateway's streams to the private service. Reconnects forever with
//! capped, jittered backoff, unless told it is revoked. A token issued in
//! a cluster names every node: the agent keeps a session to each, each
//! reconnecting on its own, so the node a visitor lands on serves them.
//!
//! Its operator ends it on purpose either way: the agent told to leave
//! (SIGTERM) says goodbye to every gateway before it exits, and [`stop`]
//! (`agent --stop`, from anywhere with the token) asks each gateway to end
//! the session; either is audited as the operator's doing.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use bytes::Bytes;
use futures_util::future::try_join_all;
use rand_core::{OsRng, RngCore};
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};
use tunnel::{
    frame::{Farewell, Kind},
    mux::{Mux, MuxError},
    record::{Side, leave_tls},
    session::{SessionError, hello, serve_private},
    tls::{PinMismatch, client_config},
};

use super::{STOP_ALPN, Token, TunnelError, socks};
use crate::knock::{
    Carrier,
    send::{ClientError, Knocker},
};
use crate::spec::AllowedDest;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Token(#[from] TunnelError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the token names no gateway address")]
    NoGateway,
    #[error("the gateway refused this agent ({0}); ask the gateway's operator for a new token")]
    Refused(String),
}

/// One attempt's end.
enum Ended {
    /// Worth retrying, with why.
    Retry(String),
    /// Retrying cannot help: revoked, a token the gateway does not accept,
    /// or a certificate other than the pinned one.
    Fatal(String),
    /// The agent's operator ended it (here, or through the gateway).
    Stopped,
}

const BACKOFF_START: Duration = Duration::from_secs(1);
const PING_EVERY: Duration = Duration::from_secs(5);
/// The gateway pings at least every 10 s by default; three missed is dead.
const GATEWAY_SILENT: Duration = Duration::from_secs(35);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// The gateways an agent with `token` keeps a session with.
fn targets(token: &Token) -> Result<Vec<SocketAddr>, AgentError> {
    Ok(if token.nodes.is_empty() {
        vec![SocketAddr::new(
            *token.gateway.first().ok_or(AgentError::NoGateway)?,
            token.tunnel_port,
        )]
    } else {
        token
            .nodes
            .iter()
            .map(|ip| SocketAddr::new(*ip, token.tunnel_port))
            .collect()
    })
}

/// What an agent publishes.
#[derive(Clone, Debug)]
pub enum Publish {
    /// One service: every public connection goes to this address.
    Forward(SocketAddr),
    /// A network, through SOCKS5: each visitor names its destination,
    /// which must be one of these.
    Socks5(Vec<AllowedDest>),
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Publish::Forward(to) => write!(f, "{to}"),
            Publish::Socks5(allow) => {
                let list: Vec<String> = allow.iter().map(ToString::to_string).collect();
                write!(f, "SOCKS5 to {}", list.join(", "))
            }
        }
    }
}

/// Runs until revoked, or until its operator stops it: `leave` turning
/// true (a signal), or the gateways saying so (`agent --stop`).
/// `published` hears the public port on every successful session.
pub async fn run(
    token: Token,
    publish: Publish,
    leave: watch::Receiver<bool>,
    published: impl Fn(SocketAddr),
) -> Result<(), AgentError> {
    let agent = Agent {
        token: &token,
        knocker: std::sync::Arc::new(Knocker::new(token.credential.clone())?),
        publish: &publish,
        published: &published,
    };
    // Each session on its own; the first that cannot go on ends them all.
    try_join_all(
        targets(&token)?
            .into_iter()
            .map(|target| agent.keep_session(target, leave.clone())),
    )
    .await?;
    Ok(())
}

/// What every session of one agent shares.
struct Agent<'a, F> {
    token: &'a Token,
    knocker: std::sync::Arc<Knocker>,
    publish: &'a Publish,
    /// Hears the public port on every successful session.
    published: &'a F,
}

/// Asks every gateway the token names to end this tunnel's session on
/// its operator's behalf; what each said.
pub async fn stop(token: &Token) -> Result<Vec<String>, AgentError> {
    let knocker = std::sync::Arc::new(Knocker::new(token.credential.clone())?);
    let mut said = Vec::new();
    for target in targets(token)? {
        let mut tls = match connect(token, &knocker, target, Some(STOP_ALPN)).await {
            Ok(tls) => tls,
            Err(Ended::Retry(why) | Ended::Fatal(why)) => {
                said.push(format!("{target}: {why}"));
                continue;
            }
            Err(Ended::Stopped) => continue,
        };
        let secret = token.secret_bytes()?;
        let answer = match hello(&mut tls, &token.token_id, &secret, false).await {
            Err(SessionError::Refused(Farewell::Stopped(words))) => words,
            Err(e) => format!("did not stop it: {e}"),
            Ok(_) => "did not stop it: the gateway welcomed a session instead (is it older than this agent?)".into(),
        };
        said.push(format!("{target}: {answer}"));
    }
    Ok(said)
}

/// Knocks, connects and does TLS with the gateway at `target`, pinning its
/// certificate; asks for `alpn` if given.
async fn connect(
    token: &Token,
    knocker: &std::sync::Arc<Knocker>,
    target: SocketAddr,
    alpn: Option<&[u8]>,
) -> Result<TlsStream<TcpStream>, Ended> {
    let k = knocker.clone();
    let tcp =
        match tokio::task::spawn_blocking(move || k.knock_and_connect(target, Duration::from_secs(3), Carrier::Syn))
            .await
        {
            Ok(Ok(Some(tcp))) => tcp,
            Ok(Ok(None)) => return Err(Ended::Retry(format!("{target} did not answer after knocking"))),
            Ok(Err(e)) => return Err(Ended::Retry(e.to_string())),
            Err(e) => return Err(Ended::Retry(e.to_string())),
        };
    let tcp = tcp
        .set_nodelay(true)
        .and_then(|()| tcp.set_nonblocking(true))
        .and_then(|()| TcpStream::from_std(tcp))
        .map_err(|e| Ended::Retry(e.to_string()))?;
    let pin = token.fingerprint().map_err(|e| Ended::Fatal(e.to_string()))?;
    let mut config = (*client_config(pin).map_err(|e| Ended::Retry(e.to_string()))?).clone();
    config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    let name = ServerName::try_from("gatekeeper").expect("a valid DNS name");
    TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        // Another certificate than the pinned one: no retry makes it ours.
        .map_err(|e| match PinMismatch::behind(&e) {
            Some(mismatch) => Ended::Fatal(format!("TLS: {mismatch}")),
            None => Ended::Retry(format!("TLS with the gateway failed: {e}")),
        })
}

impl<F: Fn(SocketAddr)> Agent<'_, F> {
    /// The session with one gateway, made again after every end that
    /// retrying can help.
    async fn keep_session(&self, target: SocketAddr, mut leave: watch::Receiver<bool>) -> Result<(), AgentError> {
        let mut backoff = BACKOFF_START;
        loop {
            let (ended, connected) = self.attempt(target, leave.clone()).await;
            match ended {
                Ended::Fatal(reason) => return Err(AgentError::Refused(reason)),
                Ended::Stopped => {
                    info!(gateway = %target, "session ended by the agent's operator");
                    return Ok(());
                }
                Ended::Retry(why) => {
                    if connected {
                        backoff = BACKOFF_START;
                    }
                    // Up to a quarter either way, so agents do not retry in step.
                    let jitter = 0.75 + (OsRng.next_u32() % 1000) as f64 / 2000.0;
                    let wait = backoff.mul_f64(jitter);
                    warn!(gateway = %target, %why, retry_in = ?wait, "tunnel session ended");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = leave.wait_for(|l| *l) => return Ok(()),
                    }
                    backoff = (backoff * 2).min(BACKOFF_CAP);
                }
            }
        }
    }

    /// One session; the bool says whether it got as far as being published.
    async fn attempt(&self, target: SocketAddr, mut leave: watch::Receiver<bool>) -> (Ended, bool) {
        let (token, publish) = (self.token, self.publish);
        let secret = match token.secret_bytes() {
            Ok(s) => s,
            Err(e) => return (Ended::Fatal(e.to_string()), false),
        };
        let mut tls = match connect(token, &self.knocker, target, None).await {
            Ok(tls) => tls,
            Err(ended) => return (ended, false),
        };
        let socks5 = matches!(publish, Publish::Socks5(_));
        let port = match hello(&mut tls, &token.token_id, &secret, socks5).await {
            Ok(p) => p,
            Err(SessionError::Refused(why)) if why.retry_helps() => return (Ended::Retry(why.to_string()), false),
            Err(SessionError::Refused(why)) => return (Ended::Fatal(why.to_string()), false),
            Err(e) => return (Ended::Retry(e.to_string()), false),
        };
        (self.published)(SocketAddr::new(target.ip(), port));
        info!(public = %SocketAddr::new(target.ip(), port), %publish, "published");
        let (rd, wr) = match leave_tls(tls.into_inner(), Side::Agent) {
            Ok(records) => records,
            Err(e) => return (Ended::Retry(e.to_string()), true),
        };
        let (mux, incoming, task) = Mux::acceptor(rd, wr);
        let (_stop_tx, stop) = watch::channel(false);
        let serving = match publish {
            Publish::Forward(to) => tokio::spawn(serve_private(incoming, *to, stop)),
            Publish::Socks5(allow) => tokio::spawn(socks::agent::serve_private(incoming, allow.clone(), stop)),
        };
        // What the gateway says without ending the session (a pause, a resume).
        let mut notices = mux.notices();
        let told = tokio::spawn(async move {
            while notices.changed().await.is_ok() {
                let notice = notices.borrow_and_update().clone();
                info!(gateway = %target, "the gateway says: {}", String::from_utf8_lossy(&notice));
            }
        });
        // Heartbeats both ways: ping the gateway, and give up on a gateway
        // that has said nothing (not even its own pings) for too long.
        let heartbeat = {
            let mux = mux.clone();
            async move {
                let mut beat = tokio::time::interval(PING_EVERY);
                loop {
                    beat.tick().await;
                    if mux.last_heard().elapsed() > GATEWAY_SILENT
                        || mux.control(Kind::Ping, Bytes::new()).await.is_err()
                    {
                        return;
                    }
                }
            }
        };
        let mut task = task;
        let ended = tokio::select! {
            ended = &mut task => match ended {
                Ok(Err(MuxError::Goodbye(Farewell::Stopped(_)))) => Ended::Stopped,
                Ok(Err(MuxError::Goodbye(why))) if !why.retry_helps() => Ended::Fatal(why.to_string()),
                Ok(Err(e)) => Ended::Retry(e.to_string()),
                Ok(Ok(())) => Ended::Retry("the gateway closed the session".into()),
                Err(e) => Ended::Retry(e.to_string()),
            },
            () = heartbeat => Ended::Retry(format!("the gateway was silent for {GATEWAY_SILENT:?}")),
            _ = leave.wait_for(|l| *l) => {
                let _ = mux.farewell(&Farewell::Stopped("the agent's operator stopped it".into())).await;
                // Give the goodbye a moment to leave before the session is torn down.
                let _ = tokio::time::timeout(Duration::from_millis(500), &mut task).await;
                Ended::Stopped
            }
        };
        task.abort();
        serving.abort();
        told.abort();
        (ended, true)
    }
}
