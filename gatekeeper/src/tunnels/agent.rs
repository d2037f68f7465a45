//! The agent: inside a private network, knocks on the gateway, dials it over
//! TLS (pinning its certificate), proves itself with the token, and relays
//! the gateway's streams to the private service. Reconnects forever with
//! capped, jittered backoff, unless told it is revoked. A token issued in
//! a cluster names every node: the agent keeps a session to each, each
//! reconnecting on its own, so the node a visitor lands on serves them.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use futures_util::future::try_join_all;
use rand_core::{OsRng, RngCore};
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};
use tunnel::{
    frame::Kind,
    mux::{Mux, MuxError},
    record::{Side, leave_tls},
    session::{SessionError, hello, serve_private},
    tls::{PinMismatch, client_config},
};

use super::{Token, TunnelError};
use crate::knock::{
    Carrier,
    send::{ClientError, Knocker},
};

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
}

const BACKOFF_START: Duration = Duration::from_secs(1);
const PING_EVERY: Duration = Duration::from_secs(5);
/// The gateway pings at least every 10 s by default; three missed is dead.
const GATEWAY_SILENT: Duration = Duration::from_secs(35);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Runs until revoked. `published` hears the public port on every
/// successful session.
pub async fn run(token: Token, forward: SocketAddr, published: impl Fn(SocketAddr)) -> Result<(), AgentError> {
    let targets: Vec<SocketAddr> = if token.nodes.is_empty() {
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
    };
    let knocker = std::sync::Arc::new(Knocker::new(token.credential.clone())?);
    // Each session on its own; the first that cannot go on ends them all.
    try_join_all(
        targets
            .into_iter()
            .map(|target| keep_session(&token, &knocker, target, forward, &published)),
    )
    .await?;
    Ok(())
}

/// The session with one gateway, made again after every end that
/// retrying can help.
async fn keep_session(
    token: &Token,
    knocker: &std::sync::Arc<Knocker>,
    target: SocketAddr,
    forward: SocketAddr,
    published: &impl Fn(SocketAddr),
) -> Result<(), AgentError> {
    let mut backoff = BACKOFF_START;
    loop {
        let (ended, connected) = attempt(token, knocker, target, forward, published).await;
        match ended {
            Ended::Fatal(reason) => return Err(AgentError::Refused(reason)),
            Ended::Retry(why) => {
                if connected {
                    backoff = BACKOFF_START;
                }
                // Up to a quarter either way, so agents do not retry in step.
                let jitter = 0.75 + (OsRng.next_u32() % 1000) as f64 / 2000.0;
                let wait = backoff.mul_f64(jitter);
                warn!(gateway = %target, %why, retry_in = ?wait, "tunnel session ended");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
}

/// One session; the bool says whether it got as far as being published.
async fn attempt(
    token: &Token,
    knocker: &std::sync::Arc<Knocker>,
    target: SocketAddr,
    forward: SocketAddr,
    published: &impl Fn(SocketAddr),
) -> (Ended, bool) {
    let k = knocker.clone();
    let tcp =
        match tokio::task::spawn_blocking(move || k.knock_and_connect(target, Duration::from_secs(3), Carrier::Syn))
            .await
        {
            Ok(Ok(Some(tcp))) => tcp,
            Ok(Ok(None)) => return (Ended::Retry(format!("{target} did not answer after knocking")), false),
            Ok(Err(e)) => return (Ended::Retry(e.to_string()), false),
            Err(e) => return (Ended::Retry(e.to_string()), false),
        };
    let tcp = match tcp
        .set_nodelay(true)
        .and_then(|()| tcp.set_nonblocking(true))
        .and_then(|()| tokio::net::TcpStream::from_std(tcp))
    {
        Ok(t) => t,
        Err(e) => return (Ended::Retry(e.to_string()), false),
    };
    let (pin, secret) = match (token.fingerprint(), token.secret_bytes()) {
        (Ok(p), Ok(s)) => (p, s),
        (Err(e), _) | (_, Err(e)) => return (Ended::Fatal(e.to_string()), false),
    };
    let config = match client_config(pin) {
        Ok(c) => c,
        Err(e) => return (Ended::Retry(e.to_string()), false),
    };
    let name = ServerName::try_from("gatekeeper").expect("a valid DNS name");
    let mut tls = match TlsConnector::from(config).connect(name, tcp).await {
        Ok(t) => t,
        // Another certificate than the pinned one: no retry makes it ours.
        Err(e) => match PinMismatch::behind(&e) {
            Some(mismatch) => return (Ended::Fatal(format!("TLS: {mismatch}")), false),
            None => return (Ended::Retry(format!("TLS with the gateway failed: {e}")), false),
        },
    };
    let port = match hello(&mut tls, &token.token_id, &secret).await {
        Ok(p) => p,
        Err(SessionError::Refused(why)) if why.retry_helps() => return (Ended::Retry(why.to_string()), false),
        Err(SessionError::Refused(why)) => return (Ended::Fatal(why.to_string()), false),
        Err(e) => return (Ended::Retry(e.to_string()), false),
    };
    published(SocketAddr::new(target.ip(), port));
    info!(public = %SocketAddr::new(target.ip(), port), %forward, "published");
    let (rd, wr) = match leave_tls(tls.into_inner(), Side::Agent) {
        Ok(records) => records,
        Err(e) => return (Ended::Retry(e.to_string()), true),
    };
    let (mux, incoming, task) = Mux::acceptor(rd, wr);
    let (_stop_tx, stop) = watch::channel(false);
    let serving = tokio::spawn(serve_private(incoming, forward, stop));
    // Heartbeats both ways: ping the gateway, and give up on a gateway
    // that has said nothing (not even its own pings) for too long.
    let heartbeat = {
        let mux = mux.clone();
        async move {
            let mut beat = tokio::time::interval(PING_EVERY);
            loop {
                beat.tick().await;
                if mux.last_heard().elapsed() > GATEWAY_SILENT || mux.control(Kind::Ping, Bytes::new()).await.is_err() {
                    return;
                }
            }
        }
    };
    let mut task = task;
    let ended = tokio::select! {
        ended = &mut task => match ended {
            Ok(Err(MuxError::Goodbye(why))) if !why.retry_helps() => Ended::Fatal(why.to_string()),
            Ok(Err(e)) => Ended::Retry(e.to_string()),
            Ok(Ok(())) => Ended::Retry("the gateway closed the session".into()),
            Err(e) => Ended::Retry(e.to_string()),
        },
        () = heartbeat => Ended::Retry(format!("the gateway was silent for {GATEWAY_SILENT:?}")),
    };
    task.abort();
    serving.abort();
    (ended, true)
}
