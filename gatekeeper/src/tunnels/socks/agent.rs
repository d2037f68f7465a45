//! The agent's side: each stream's destination resolved here, checked
//! against the allow list, connected, and answered with one status byte.

use bytes::Bytes;
use tokio::{net::TcpStream, sync::watch};
use tracing::debug;
use tunnel::{mux::Incoming, splice::splice};

use super::{HANDSHAKE, NOT_ALLOWED, REFUSED, SUCCEEDED, UNREACHABLE};
use crate::spec::AllowedDest;

/// For each stream the gateway opens, resolves its destination
/// here, connects if `allow` admits it, answers with a status byte, and
/// relays, until `stop` turns true.
pub async fn serve_private(mut incoming: Incoming, allow: Vec<AllowedDest>, stop: watch::Receiver<bool>) {
    while let Some((stream, meta)) = incoming.recv().await {
        let (allow, stop) = (allow.clone(), stop.clone());
        tokio::spawn(async move {
            let meta = String::from_utf8_lossy(&meta).into_owned();
            let (code, tcp) = reach(&meta, &allow).await;
            debug!(%meta, code, "SOCKS5 destination");
            if stream.send(Bytes::from(vec![code])).await.is_err() {
                return;
            }
            if let Some(tcp) = tcp {
                splice(tcp, stream, stop).await;
            }
        });
    }
}

/// The status for the destination in `meta`, and the connection if made.
async fn reach(meta: &str, allow: &[AllowedDest]) -> (u8, Option<TcpStream>) {
    let Some(dest) = meta
        .strip_prefix("socks5 ")
        .and_then(|m| m.split_once(' '))
        .map(|(_, d)| d)
    else {
        return (NOT_ALLOWED, None);
    };
    let Ok(Ok(addrs)) = tokio::time::timeout(HANDSHAKE, tokio::net::lookup_host(dest)).await else {
        return (UNREACHABLE, None);
    };
    let Some(to) = addrs.into_iter().find(|a| allow.iter().any(|r| r.admits(*a))) else {
        return (NOT_ALLOWED, None);
    };
    match tokio::time::timeout(HANDSHAKE, TcpStream::connect(to)).await {
        Ok(Ok(tcp)) => (SUCCEEDED, Some(tcp)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => (REFUSED, None),
        _ => (UNREACHABLE, None),
    }
}
