//! Bodies in bounded chunks, with credit flow control both ways, so no
//! body is too large, a request holds a bounded amount of memory, and no
//! subscriber falls far enough behind for Redis to cut it off.
//!
//! The receiver of a body grants credit: a window to start with, and more
//! as the bytes are taken out (by hyper, writing them on). The sender
//! never sends beyond its credit. Every body may have [`BASE_WINDOW`] on
//! its way; it grows to [`WINDOW`] while the receiver's [`Budget`] has
//! room, which it gives back when the body ends. So a subscriber never has
//! more than [`MAX_REQUESTS`] base windows and the budget on their way
//! (5.5 MiB), and idle bodies (a WebSocket, a slow download) hold only
//! their base: they never keep anyone else waiting.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    body::{Body, Frame},
    upgrade::OnUpgrade,
};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_util::io::ReaderStream;

use super::wire::{CHUNK, Message};

/// What every body may have on its way, budget or not.
pub const BASE_WINDOW: u32 = 16 * 1024;
/// What a body's window grows to while the budget has room: four chunks.
pub const WINDOW: u32 = 4 * CHUNK as u32;
/// What windows beyond the base may hold together (24 chunks, 1.5 MiB).
pub const BUDGET: usize = 24 * CHUNK;
/// Requests one node has in flight at once; more wait for a slot. With
/// the budget, this keeps what is on its way to one subscriber (at most
/// 4 MiB of base windows and 1.5 MiB of budget) under the 8 MiB after
/// which Redis's default `client-output-buffer-limit pubsub` cuts a
/// subscriber off.
pub const MAX_REQUESTS: usize = 256;

/// Why a relayed body ended early.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct BodyError(pub String);

/// Every body the relay hands hyper.
pub type RelayBody = BoxBody<Bytes, BodyError>;

/// A body of `text`, whole.
pub fn full(text: impl Into<Bytes>) -> RelayBody {
    Full::new(text.into()).map_err(|never| match never {}).boxed()
}

/// Where a side sends its messages about one request: sealed under the
/// current session, published to the peer.
pub trait Outbox: Send + Sync + 'static {
    fn send(&self, msg: Message);
}

/// The receiver's budget for the windows it grants.
#[derive(Clone)]
pub struct Budget(Arc<Semaphore>);

impl Default for Budget {
    fn default() -> Budget {
        Budget(Arc::new(Semaphore::new(BUDGET)))
    }
}

impl Budget {
    /// A window's growth beyond the base, if the budget has room now.
    fn extra(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_many_owned(WINDOW - BASE_WINDOW).ok()
    }
}

/// What the sender of one body may still send.
#[derive(Clone)]
pub struct Credit(Arc<Semaphore>);

impl Credit {
    pub fn new(bytes: u32) -> Credit {
        Credit(Arc::new(Semaphore::new(bytes as usize)))
    }

    pub fn grant(&self, bytes: u32) {
        // A peer granting absurd amounts is capped, not trusted to overflow.
        if self.0.available_permits() < Semaphore::MAX_PERMITS / 2 {
            self.0.add_permits(bytes as usize);
        }
    }

    /// Ends every wait: the request is over.
    pub fn close(&self) {
        self.0.close();
    }

    /// Waits for some credit, then takes as much as there is, up to
    /// `most` bytes (a window may be smaller than a chunk); `None` once
    /// the request is over.
    async fn take_up_to(&self, most: usize) -> Option<usize> {
        self.0.acquire().await.ok()?.forget();
        let more = self.0.available_permits().min(most - 1);
        let more = match self.0.try_acquire_many(more as u32) {
            Ok(permit) => {
                permit.forget();
                more
            }
            Err(_) => 0,
        };
        Some(1 + more)
    }
}

/// What arrives for a body being received.
#[derive(Debug)]
enum Inbound {
    Data(Bytes),
    End,
    /// The request failed; why.
    Failed(String),
}

/// Sends what `source` yields (a body's data, or what an upgraded
/// connection reads) as chunks within `credit`, then its end; a Reset if
/// it fails. Returns when all is sent or the request is over.
pub async fn pump<E: std::fmt::Display>(
    mut source: impl Stream<Item = Result<Bytes, E>> + Unpin,
    id: u64,
    credit: Credit,
    out: Arc<dyn Outbox>,
) {
    let mut offset = 0u64;
    while let Some(read) = source.next().await {
        let mut data = match read {
            Ok(data) => data,
            Err(e) => {
                out.send(Message::Reset {
                    id,
                    reason: format!("the body failed: {e}"),
                });
                return;
            }
        };
        while !data.is_empty() {
            let Some(n) = credit.take_up_to(data.len().min(CHUNK)).await else {
                return;
            };
            let bytes = data.split_to(n);
            let len = bytes.len() as u64;
            out.send(Message::Data { id, offset, bytes });
            offset += len;
        }
    }
    out.send(Message::End { id, length: offset });
}

/// Carries a connection upgraded to another protocol (a WebSocket, say)
/// both ways once hyper hands it over: what it reads goes to the peer as
/// a body under `credit`, and `from_peer` is written into it.
pub async fn carry(upgrading: OnUpgrade, id: u64, credit: Credit, out: Arc<dyn Outbox>, from_peer: Inflow) {
    let upgraded = match upgrading.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            out.send(Message::Reset {
                id,
                reason: format!("the upgrade failed: {e}"),
            });
            return;
        }
    };
    let (read, write) = tokio::io::split(TokioIo::new(upgraded));
    tokio::spawn(drain(from_peer, write));
    pump(ReaderStream::new(read), id, credit, out).await;
}

/// Writes a body arriving from the peer into `to` (an upgraded
/// connection), then shuts `to` down for writing.
async fn drain(mut body: Inflow, mut to: impl AsyncWrite + Unpin) {
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data()
            && to.write_all(&data).await.is_err()
        {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Why a body being received failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FlowError {
    #[error("the peer sent more than its credit allowed")]
    Overrun,
    #[error("part of the body was lost on the way")]
    Gap,
}

/// Where what arrives for one body is put, for its [`Inflow`].
pub struct Feed {
    tx: mpsc::UnboundedSender<Inbound>,
    queued: Arc<AtomicUsize>,
    /// Bytes received so far: where the next chunk must start.
    received: u64,
}

impl Feed {
    /// Queues a chunk. Refused if it does not start where the last one
    /// ended, or overruns the window (a peer that ignores flow control
    /// loses the request, the rest stay bounded).
    pub fn data(&mut self, offset: u64, bytes: Bytes) -> Result<(), FlowError> {
        if offset != self.received {
            return Err(FlowError::Gap);
        }
        if self.queued.fetch_add(bytes.len(), Ordering::Relaxed) + bytes.len() > WINDOW as usize {
            return Err(FlowError::Overrun);
        }
        self.received += bytes.len() as u64;
        // The body may be gone already; then nobody needs what came.
        let _ = self.tx.send(Inbound::Data(bytes));
        Ok(())
    }

    /// Ends the body, `length` bytes in all.
    pub fn end(&mut self, length: u64) -> Result<(), FlowError> {
        if length != self.received {
            return Err(FlowError::Gap);
        }
        let _ = self.tx.send(Inbound::End);
        Ok(())
    }

    /// Ends the body with an error.
    pub fn fail(&self, why: &str) {
        let _ = self.tx.send(Inbound::Failed(why.to_string()));
    }
}

/// A body arriving from the peer, handed to hyper: takes chunks off its
/// queue and gives their size back as credit. Dropped before its end,
/// it says so to `on_end`: a visitor who went away ends the request, a
/// service that read all it wanted does not.
pub struct Inflow {
    id: u64,
    rx: mpsc::UnboundedReceiver<Inbound>,
    queued: Arc<AtomicUsize>,
    out: Arc<dyn Outbox>,
    /// Taken but not yet given back as credit.
    owed: u32,
    done: bool,
    budget: Budget,
    /// This body's share of the budget beyond its base, held until it
    /// ends; asked for again at each credit while it has none.
    extra: Option<OwnedSemaphorePermit>,
    /// Runs when the body is over, whichever way.
    on_end: Option<Box<dyn FnOnce(bool) + Send + Sync>>,
}

impl Inflow {
    /// A body of request `id`, where to feed it, and the window to grant
    /// the sender first; `on_end(finished)` runs once when it ends or is
    /// dropped.
    pub fn new(
        id: u64,
        out: Arc<dyn Outbox>,
        budget: &Budget,
        on_end: impl FnOnce(bool) + Send + Sync + 'static,
    ) -> (Feed, Inflow, u32) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let extra = budget.extra();
        let window = if extra.is_some() { WINDOW } else { BASE_WINDOW };
        let body = Inflow {
            id,
            rx,
            queued: queued.clone(),
            out,
            owed: 0,
            done: false,
            budget: budget.clone(),
            extra,
            on_end: Some(Box::new(on_end)),
        };
        let feed = Feed {
            tx,
            queued,
            received: 0,
        };
        (feed, body, window)
    }

    fn end(&mut self, finished: bool) {
        self.done = true;
        if let Some(f) = self.on_end.take() {
            f(finished);
        }
    }
}

impl Body for Inflow {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(self.rx.poll_recv(cx)) {
            Some(Inbound::Data(bytes)) => {
                self.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
                self.owed += bytes.len() as u32;
                // Credit goes back in batches of half a window, grown
                // when the budget has room again.
                let window = if self.extra.is_some() { WINDOW } else { BASE_WINDOW };
                if self.owed >= window / 2 {
                    let mut bytes = std::mem::take(&mut self.owed);
                    if self.extra.is_none() {
                        self.extra = self.budget.extra();
                        if self.extra.is_some() {
                            bytes += WINDOW - BASE_WINDOW;
                        }
                    }
                    self.out.send(Message::Credit { id: self.id, bytes });
                }
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Some(Inbound::End) => {
                self.end(true);
                Poll::Ready(None)
            }
            Some(Inbound::Failed(reason)) => {
                self.end(false);
                Poll::Ready(Some(Err(BodyError(reason))))
            }
            None => {
                self.end(false);
                Poll::Ready(Some(Err(BodyError("the relay lost this request".into()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl Drop for Inflow {
    fn drop(&mut self) {
        if !self.done {
            self.end(false);
        }
    }
}
