//! The scrape endpoint: `GET /metrics` on `[metrics] listen`. Each scrape
//! asks the daemon's loop for its status, the way the control socket
//! does, so a scrape sees exactly what `gatekeeper status` would.
//!
//! It is meant for a loopback or management address: it answers anyone
//! who reaches it, holds at most [`MAX_CONNECTIONS`] connections, and
//! closes one that has not sent its request within [`REQUEST_TIMEOUT`].

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, warn};

use super::{Events, exposition};
use crate::control::{Asked, Reply, Request as ControlRequest};

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a connection may take to send its request's head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape waits for the daemon's status before answering with
/// the event counters alone.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Error)]
#[error("cannot listen for metrics scrapes on {addr} (`[metrics] listen`)")]
pub struct MetricsError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// What serving a scrape needs.
#[derive(Clone)]
struct Scrape {
    events: Arc<Events>,
    daemon: mpsc::Sender<Asked>,
}

/// Binds the listener; nothing is served until [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })
}

/// Serves scrapes on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, events: Arc<Events>, daemon: mpsc::Sender<Asked>) {
    let scrape = Scrape { events, daemon };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accepting a metrics scrape failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let scrape = scrape.clone();
                async move { Ok::<_, Infallible>(scrape.answer(req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "a metrics connection ended badly");
            }
            drop(permit);
        });
    }
}

impl Scrape {
    async fn answer<B>(&self, req: Request<B>) -> Response<Full<Bytes>> {
        if req.uri().path() != "/metrics" {
            return plain(StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n");
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        let status = self.status().await;
        let text = exposition::render(&self.events, status.as_ref());
        Response::builder()
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(Bytes::from(text)))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"))
    }

    /// The daemon's status, unless its loop does not answer in time.
    async fn status(&self) -> Option<crate::control::Status> {
        let (tx, rx) = oneshot::channel();
        self.daemon.send((ControlRequest::Status, tx)).await.ok()?;
        match tokio::time::timeout(STATUS_TIMEOUT, rx).await {
            Ok(Ok(Reply::Status(status))) => Some(*status),
            _ => {
                warn!("the daemon did not give its status to a metrics scrape; serving the event counters alone");
                None
            }
        }
    }
}

fn plain(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = code;
    resp
}
