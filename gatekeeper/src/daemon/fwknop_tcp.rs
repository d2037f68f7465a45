//! fwknop's `-P tcp`: the stock client connects to the knock port and
//! writes its packet into the connection. The gate cannot hand that over
//! (there is no packet to divert until a handshake has completed), so with
//! `[knock] fwknop_tcp` the daemon listens there, reads one packet from
//! each connection and verifies it like a diverted one. The port then
//! answers every scan, as fwknopd's TCP server does; the other carriers
//! keep it closed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use gatekeeper_common::knock::MAX_LEN;
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tracing::{debug, warn};

use crate::knock::{Carrier, verify::Knock};

/// Connections read at once; more are closed unread until one ends.
const AT_ONCE: usize = 64;
/// How long a connection may take to deliver its packet.
const READ_FOR: Duration = Duration::from_secs(2);

/// Listens on TCP `port` on every address.
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await
}

/// Reads one packet from each connection and hands it to `knocks`.
pub async fn serve(listener: TcpListener, knocks: mpsc::Sender<Knock>) {
    let slots = Arc::new(Semaphore::new(AT_ONCE));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accepting an fwknop connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "fwknop connections at the limit; closed unread");
            continue;
        };
        let knocks = knocks.clone();
        tokio::spawn(async move {
            if let Some(knock) = read_packet(stream, peer).await {
                let _ = knocks.send(knock).await;
            }
            drop(slot);
        });
    }
}

/// The packet a connection carried: what it wrote, up to [`MAX_LEN`]
/// bytes, until it closed or [`READ_FOR`] passed. A packet that is not
/// whole is refused by the verifier like any other malformed one.
async fn read_packet(stream: TcpStream, peer: SocketAddr) -> Option<Knock> {
    let local = stream.local_addr().ok()?;
    let mut payload = Vec::with_capacity(MAX_LEN);
    let _ = tokio::time::timeout(READ_FOR, stream.take(MAX_LEN as u64).read_to_end(&mut payload)).await;
    if payload.is_empty() {
        debug!(%peer, "an fwknop connection delivered nothing in time");
        return None;
    }
    Some(Knock {
        src: peer.ip().to_canonical(),
        dst: local.ip().to_canonical(),
        sport: peer.port(),
        dport: local.port(),
        carrier: Carrier::Syn,
        payload,
        seen_ns: crate::clock::precise_ns(),
    })
}
