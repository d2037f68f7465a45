//! The audit trail: one JSON line per event (schema: `docs/audit.md`),
//! appended to `audit.log` and mirrored to the daemon's log.
//!
//! Whoever audits (the knock service, the portal, the tunnel gateway)
//! holds a cheap [`Audit`] handle that only queues the line; one writer
//! thread owns the file, so every line lands whole, in order, however many
//! parts of the daemon write at once. The writer also keeps the file
//! bounded: refusals from unproven sources (see
//! [`crate::knock::verify::Rejection::unproven`]) above a per-second
//! threshold are counted into one summary line a second instead of one
//! line each, and the file is rotated by size. A flood therefore costs a
//! few lines a second, not one per packet.
//!
//! Each event is also counted for the metrics endpoint as it is queued
//! (see [`crate::metrics`]), so a flood the file only summarizes is
//! counted in full.
//!
//! - [`writer`]: the thread that owns the file: batching, rotation, reopen.
//! - [`summary`]: the per-second count of refusals past the threshold.
//! - [`query`]: reading the trail back, and joining a device's journal.

pub mod query;
pub mod summary;
pub mod writer;

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Sender, SyncSender},
    },
};

use serde::Serialize;
use serde_json::{Value, json};
use tracing::{debug, info};

use crate::{
    clock::{self, rfc3339, unix_now},
    knock::verify::{Checked, Knock},
    metrics::Events,
    store::config::AuditSettings,
};

/// What is queued for the writer.
pub(crate) enum Entry {
    /// A line written as it is.
    Line(Value),
    /// A refusal from an unproven source: written as a line while this
    /// second's threshold lasts, counted into the summary after.
    Refusal {
        reason: &'static str,
        src: IpAddr,
        line: Value,
    },
    /// Close and reopen the file (SIGHUP, after logrotate moved it).
    Reopen,
    /// Write out everything queued before, then answer.
    Flush(SyncSender<()>),
}

/// What the writer has done since the daemon started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Entries queued and not yet taken by the writer.
    pub queued: AtomicU64,
    pub lines: AtomicU64,
    pub summarized: AtomicU64,
    /// Lines the writer could not keep up with (the queue was full).
    pub dropped: AtomicU64,
    pub bytes: AtomicU64,
    pub rotations: AtomicU64,
    pub write_errors: AtomicU64,
}

/// The same counters, read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AuditStatus {
    pub path: String,
    pub lines: u64,
    pub summarized: u64,
    pub dropped: u64,
    pub bytes: u64,
    pub rotations: u64,
    pub write_errors: u64,
}

/// A handle on the audit trail; clones share the one writer.
#[derive(Clone)]
pub struct Audit {
    tx: Sender<Entry>,
    counters: Arc<Counters>,
    path: String,
    events: Arc<Events>,
}

/// What came of an authenticated knock's grant.
#[derive(Clone, Debug)]
pub enum Opened {
    /// The entry is in the map: open to `ports` (from `src_port`, or any)
    /// for `for_secs`.
    Entry {
        src_port: Option<u16>,
        ports: String,
        for_secs: u64,
        /// A cluster node opened it alone, its Redis not answering: the
        /// nonce was checked against this node's replay cache only, and
        /// the grant reached no other node. Audited as `degraded`.
        alone: bool,
    },
    /// The knock was good but writing the entry failed: nothing opened.
    Failed(String),
}

impl Audit {
    /// Opens (creating, 0600) the file and starts the writer thread; each
    /// event is counted into `events` too.
    pub fn start(settings: &AuditSettings, events: Arc<Events>) -> std::io::Result<(Audit, writer::Writer)> {
        let counters = Arc::new(Counters::default());
        let (tx, writer) = writer::Writer::start(settings, counters.clone())?;
        let audit = Audit {
            tx,
            counters,
            path: settings.path.display().to_string(),
            events,
        };
        Ok((audit, writer))
    }

    fn queue(&self, entry: Entry) {
        // Never make a knock or a session wait on the disk: past the queue's
        // bound an entry is counted, and the writer reports the loss in the
        // trail itself.
        let queued = self.counters.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= writer::QUEUE || self.tx.send(entry).is_err() {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records an event that is not a knock (revocations, problems with
    /// the state, tunnel sessions and connections).
    pub fn event(&self, event: &str, fields: Value) {
        let result = ["result", "why"]
            .iter()
            .find_map(|k| fields.get(k).and_then(Value::as_str));
        self.events.event(event, result.unwrap_or(""));
        let mut line = json!({"time": rfc3339(unix_now()), "event": event});
        if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), fields) {
            obj.extend(extra);
        }
        info!(target: "audit", event, "{line}");
        self.queue(Entry::Line(line));
    }

    /// The fields every knock line has, accepted or refused.
    fn knock_line(event: &str, knock: &Knock, checked: Option<&Checked>) -> Value {
        let (result, reason, detail) = match checked.map(|c| &c.outcome) {
            Some(Ok(_)) => ("accepted", Value::Null, Value::Null),
            Some(Err(r)) => ("rejected", json!(r.code()), json!(r.to_string())),
            None => ("rejected", json!("no_knock"), json!("the ClientHello carried no knock")),
        };
        let request = checked.and_then(|c| c.payload.as_ref()).map(|p| json!({"protocol": p.protocol, "start_port": p.start_port, "end_port": p.end_port, "local_ip": p.local_ip, "local_port": p.local_port, "hostname": p.hostname, "platform": p.platform}));
        let fwknop = checked.and_then(|c| c.fwknop.as_ref());
        let request = request.or_else(|| fwknop.map(|s| {
            let access: Vec<String> = s.access.iter().map(|(proto, ports)| format!("{proto}/{}", ports.lo)).collect();
            json!({"access": access.join(","), "allow_ip": s.allow_ip, "user": s.user, "version": s.version, "message_type": s.message_type, "client_timeout": s.client_timeout})
        }));
        json!({
            "time": rfc3339(unix_now()),
            "event": event,
            "knock_id": checked.and_then(|c| c.knock_id).map(|n| crate::hex::encode(&n)),
            "src": knock.src,
            "sport": knock.sport,
            "dst": knock.dst,
            "dport": knock.dport,
            "carrier": knock.carrier.name(),
            "client": checked.and_then(|c| c.client.as_ref()),
            "request": request,
            "result": result,
            "reason": reason,
            "detail": detail,
            "format": knock.format().name(),
        })
    }

    /// Records one knock and what came of it: `opened` is `None` for a
    /// refused knock.
    pub fn knock(&self, knock: &Knock, checked: &Checked, opened: Option<Opened>) {
        let mut line = Audit::knock_line("knock", knock, Some(checked));
        if checked.previous_key {
            // Who still knocks with the key a rotation replaced.
            line["server_key"] = json!("previous");
        }
        let (result, reason) = match (&checked.outcome, &opened) {
            (Ok(_), Some(Opened::Failed(_))) => ("failed", "gate_write_failed"),
            (Ok(_), _) => ("accepted", ""),
            (Err(r), _) => ("rejected", r.code()),
        };
        let opened_in = matches!(opened, Some(Opened::Entry { .. }))
            .then(|| clock::precise_ns().saturating_sub(knock.seen_ns) as f64 / 1e9);
        self.events.knock(knock.carrier.name(), result, reason, opened_in);
        match &opened {
            Some(Opened::Entry {
                src_port,
                ports,
                for_secs,
                alone,
            }) => {
                line["opened"] = json!({"src_port": src_port, "ports": ports, "for_secs": for_secs});
                if *alone {
                    line["degraded"] = json!("cluster_unreachable");
                }
            }
            Some(Opened::Failed(why)) => {
                line["result"] = json!(result);
                line["reason"] = json!(reason);
                line["detail"] = json!(why);
                line["opened"] = Value::Null;
            }
            None => line["opened"] = Value::Null,
        }
        match &checked.outcome {
            Ok(_) => {
                info!(target: "audit", event = "knock", result, client = checked.client.as_deref().unwrap_or(""), src = %knock.src, "{line}");
                self.queue(Entry::Line(line));
            }
            Err(r) => {
                debug!(target: "audit", event = "knock", result = "rejected", reason = r.code(), src = %knock.src, "{line}");
                if r.unproven() {
                    self.queue(Entry::Refusal {
                        reason: r.code(),
                        src: knock.src,
                        line,
                    });
                } else {
                    self.queue(Entry::Line(line));
                }
            }
        }
    }

    /// Records one portal connection: its knock, if it carried one, and
    /// where it was sent (`upstream` or `guidance`). A browser opens many
    /// connections per page, so these reach the daemon's log only at debug
    /// level. Strangers' connections are refusals from unproven sources.
    pub fn portal(&self, conn: &Knock, checked: Option<&Checked>, upstream: Option<&str>) {
        let mut line = Audit::knock_line("portal", conn, checked);
        let decision = if upstream.is_some() { "upstream" } else { "guidance" };
        self.events.portal(decision);
        line["decision"] = json!(decision);
        line["upstream"] = json!(upstream);
        debug!(target: "audit", event = "portal", decision, src = %conn.src, "{line}");
        let unproven = match checked.map(|c| &c.outcome) {
            None => Some("no_knock"),
            Some(Err(r)) if r.unproven() => Some(r.code()),
            Some(_) => None,
        };
        match unproven {
            Some(reason) => self.queue(Entry::Refusal {
                reason,
                src: conn.src,
                line,
            }),
            None => self.queue(Entry::Line(line)),
        }
    }

    /// Records a refusal that happens before anything is known of the
    /// sender (a portal connection over its source's limits).
    pub fn refused(&self, event: &str, reason: &'static str, src: IpAddr, fields: Value) {
        self.events.event(event, "rejected");
        let mut line =
            json!({"time": rfc3339(unix_now()), "event": event, "src": src, "result": "rejected", "reason": reason});
        if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), fields) {
            obj.extend(extra);
        }
        debug!(target: "audit", event, reason, %src, "{line}");
        self.queue(Entry::Refusal { reason, src, line });
    }

    /// Asks the writer to reopen the file (after logrotate moved it).
    pub fn reopen(&self) {
        self.queue(Entry::Reopen);
    }

    /// Waits (at most `limit`) until everything queued so far is written.
    pub fn flush(&self, limit: std::time::Duration) -> bool {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Entry::Flush(ack)).is_err() {
            return false;
        }
        done.recv_timeout(limit).is_ok()
    }

    pub fn status(&self) -> AuditStatus {
        let c = &self.counters;
        AuditStatus {
            path: self.path.clone(),
            lines: c.lines.load(Ordering::Relaxed),
            summarized: c.summarized.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            rotations: c.rotations.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
        }
    }
}
