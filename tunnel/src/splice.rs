//! Copying between a TCP connection and a tunnel stream, both ways at once,
//! and saying how much went each way and why it stopped.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

use crate::mux::MuxStream;

/// What one spliced connection carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes from the TCP side into the tunnel.
    pub up: u64,
    /// Bytes from the tunnel out to the TCP side.
    pub down: u64,
    pub duration: Duration,
    pub why: &'static str,
}

/// Copies until both directions end or `cancel` turns true. The two
/// directions run concurrently: a sender waiting for window must not stop
/// this side from reading, or two splices could wait on each other.
pub async fn splice(tcp: TcpStream, stream: MuxStream, mut cancel: watch::Receiver<bool>) -> Spliced {
    let started = Instant::now();
    // Small writes (requests, keystrokes) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let (mut tcp_rd, mut tcp_wr) = tcp.into_split();
    let (mut rd, mut wr) = stream.split();
    // Counted as bytes move, so a cancelled relay still reports them.
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let upward = async {
        // Each read lands in memory the frame then carries: no copy.
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(crate::frame::MAX_PAYLOAD);
            match tcp_rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    wr.close().await;
                    return true;
                }
                Ok(n) => {
                    if wr.send(buf.split().freeze()).await.is_err() {
                        return false;
                    }
                    up.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    };
    let downward = async {
        while let Some(chunk) = rd.recv().await {
            if tcp_wr.write_all(&chunk).await.is_err() {
                return false;
            }
            down.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = tcp_wr.shutdown().await;
        true
    };
    let both = async { tokio::join!(upward, downward) };
    let cancelled = async {
        while cancel.changed().await.is_ok() {
            if *cancel.borrow() {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    let why = tokio::select! {
        (up_ok, down_ok) = both => match (up_ok, down_ok) {
            (true, true) => "closed",
            (false, _) => "tunnel gone",
            (_, false) => "peer reset",
        },
        _ = cancelled => "cancelled",
    };
    Spliced {
        up: up.into_inner(),
        down: down.into_inner(),
        duration: started.elapsed(),
        why,
    }
}
