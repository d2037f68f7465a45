//! The relay's two uses of Redis: publishing, in order and pipelined, and
//! listening, subscribed again after every loss. Pub/sub keeps nothing
//! for a subscriber that was away, so each side is told when it has
//! subscribed (again) and fails what was in flight.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::store::redis_target::RedisTarget;

/// How long connecting, and each batch of publishes, may take.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait before subscribing again after losing the channels.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);
/// The most messages one pipeline carries.
const BATCH: usize = 64;

/// Publishes messages in the order given, on one connection, made again
/// after any failure. Messages given while Redis is away are dropped:
/// both sides fail what was in flight once they subscribe again.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<(String, Vec<u8>)>,
}

impl Publisher {
    pub fn start(target: RedisTarget) -> Publisher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish(target, rx));
        Publisher { tx }
    }

    pub fn publish(&self, channel: String, msg: Vec<u8>) {
        // Closed only when the runtime is shutting down.
        let _ = self.tx.send((channel, msg));
    }
}

/// Sends what is queued, a pipeline at a time: while one is on its way
/// the next fills up.
async fn publish(target: RedisTarget, mut rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let mut con: Option<MultiplexedConnection> = None;
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        if con.is_none() {
            con = target.connect(TIMEOUT).await.ok();
        }
        let sent = match &mut con {
            Some(c) => {
                let mut pipe = redis::pipe();
                for (channel, msg) in batch.drain(..) {
                    pipe.cmd("PUBLISH").arg(channel).arg(msg).ignore();
                }
                pipe.query_async::<()>(c).await.map_err(|e| e.to_string())
            }
            None => Err("not connected".to_string()),
        };
        batch.clear();
        match sent {
            Ok(()) if failing => {
                failing = false;
                info!("publishing to the relay's channels again");
            }
            Ok(()) => {}
            Err(e) => {
                con = None;
                if !failing {
                    failing = true;
                    warn!(error = %e, location = target.location(), "publishing to the relay's channels failed; messages are dropped until Redis answers");
                }
            }
        }
    }
}

/// What the listener hears.
pub enum Heard {
    /// Subscribed (again): whatever was in flight may have been missed.
    Subscribed,
    Message {
        channel: String,
        payload: Vec<u8>,
    },
    /// The subscription was lost; subscribing again.
    Lost(String),
}

/// Subscribes to `channels` and `patterns` and hands `on` what it hears,
/// until `on` returns false; subscribes again after every loss.
pub async fn listen(
    target: RedisTarget,
    channels: Vec<String>,
    patterns: Vec<String>,
    mut on: impl FnMut(Heard) -> bool,
) {
    loop {
        let subscribed = async {
            let mut pubsub = target.client_async().await?.get_async_pubsub().await?;
            if !channels.is_empty() {
                pubsub.subscribe(&channels).await?;
            }
            if !patterns.is_empty() {
                pubsub.psubscribe(&patterns).await?;
            }
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        };
        match tokio::time::timeout(TIMEOUT, subscribed).await {
            Ok(Ok(mut stream)) => {
                if !on(Heard::Subscribed) {
                    return;
                }
                while let Some(msg) = stream.next().await {
                    let heard = Heard::Message {
                        channel: msg.get_channel_name().to_string(),
                        payload: msg.get_payload_bytes().to_vec(),
                    };
                    if !on(heard) {
                        return;
                    }
                }
                if !on(Heard::Lost("the connection closed".into())) {
                    return;
                }
            }
            Ok(Err(e)) => {
                if !on(Heard::Lost(e.to_string())) {
                    return;
                }
            }
            Err(_) => {
                if !on(Heard::Lost(format!("no answer within {TIMEOUT:?}"))) {
                    return;
                }
            }
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}
