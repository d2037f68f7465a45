//! The gateway's side: SOCKS5 to the visitor, an `Open` per CONNECT, the
//! agent's status byte back as the reply, and an audit line per
//! destination.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use serde_json::json;
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::debug;
use tunnel::{
    mux::{Mux, MuxStream},
    splice::{Spliced, splice},
};

use super::{HANDSHAKE, NOT_ALLOWED, REFUSED, SUCCEEDED, UNREACHABLE};
use crate::audit::Audit;

const COMMAND_NOT_SUPPORTED: u8 = 7;
const ADDRESS_NOT_SUPPORTED: u8 = 8;

#[derive(Debug, Error)]
pub enum SocksError {
    #[error("not SOCKS5 (version byte {0})")]
    Version(u8),
    #[error("the visitor offers no method without authentication")]
    NoMethod,
    #[error("only CONNECT is supported, not command {0}")]
    Command(u8),
    #[error("unknown address type {0}")]
    AddressType(u8),
    #[error("the host name is not UTF-8")]
    Name,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Where the visitor asked to go: a name (resolved by the agent) or an address.
fn destination(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

/// reads the visitor's greeting and CONNECT request; the
/// destination as `HOST:PORT`. Refusals the protocol can state are told.
pub async fn request(tcp: &mut TcpStream) -> Result<String, SocksError> {
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(SocksError::Version(head[0]));
    }
    let mut methods = vec![0u8; head[1] as usize];
    tcp.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        tcp.write_all(&[5, 0xff]).await?;
        return Err(SocksError::NoMethod);
    }
    tcp.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    tcp.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(SocksError::Version(req[0]));
    }
    if req[1] != 1 {
        reply(tcp, COMMAND_NOT_SUPPORTED).await?;
        return Err(SocksError::Command(req[1]));
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            tcp.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        4 => {
            let mut a = [0u8; 16];
            tcp.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            tcp.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            tcp.read_exact(&mut name).await?;
            String::from_utf8(name).map_err(|_| SocksError::Name)?
        }
        other => {
            reply(tcp, ADDRESS_NOT_SUPPORTED).await?;
            return Err(SocksError::AddressType(other));
        }
    };
    let mut port = [0u8; 2];
    tcp.read_exact(&mut port).await?;
    Ok(destination(&host, u16::from_be_bytes(port)))
}

/// the SOCKS5 reply (no bound address: the visitor's
/// traffic leaves from the agent's network, not from here).
pub async fn reply(tcp: &mut TcpStream, code: u8) -> std::io::Result<()> {
    tcp.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await
}

/// serves SOCKS5 on `public` into streams of `mux` until
/// the listener is dropped or `cut` turns true; audits each destination.
pub async fn serve_public(
    mux: Mux,
    public: TcpListener,
    cut: watch::Receiver<bool>,
    tunnel: String,
    audit: Audit,
    done: impl Fn(SocketAddr, Spliced) + Send + Sync + Clone + 'static,
) {
    loop {
        let (tcp, visitor) = match public.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: let the others finish first.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (mux, cut, tunnel, audit, done) = (mux.clone(), cut.clone(), tunnel.clone(), audit.clone(), done.clone());
        tokio::spawn(async move {
            if let Some((tcp, stream)) = connect(mux, tcp, visitor, &tunnel, &audit).await {
                done(visitor, splice(tcp, stream, cut).await);
            }
        });
    }
}

/// One visitor: the request, the agent's answer, the audit line; the
/// connection and its stream when the agent connected.
async fn connect(
    mux: Mux,
    mut tcp: TcpStream,
    visitor: SocketAddr,
    tunnel: &str,
    audit: &Audit,
) -> Option<(TcpStream, MuxStream)> {
    let dest = match tokio::time::timeout(HANDSHAKE, request(&mut tcp)).await {
        Ok(Ok(dest)) => dest,
        Ok(Err(e)) => {
            debug!(%visitor, error = %e, "not a SOCKS5 request");
            return None;
        }
        Err(_) => return None,
    };
    let mut stream = mux.open(Bytes::from(format!("socks5 {visitor} {dest}"))).await.ok()?;
    let code = match tokio::time::timeout(HANDSHAKE, stream.recv()).await {
        Ok(Some(status)) if status.len() == 1 => status[0],
        _ => UNREACHABLE,
    };
    let result = match code {
        SUCCEEDED => "connected",
        NOT_ALLOWED => "not_allowed",
        REFUSED => "refused",
        _ => "unreachable",
    };
    audit.event(
        "tunnel_destination",
        json!({"tunnel": tunnel, "visitor": visitor, "destination": dest, "result": result}),
    );
    reply(&mut tcp, code).await.ok()?;
    (code == SUCCEEDED).then_some((tcp, stream))
}
