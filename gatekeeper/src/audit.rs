//! The audit log: one JSON line per knock and per portal connection,
//! accepted or refused, appended to `audit.log` in the state directory and
//! mirrored to the daemon's log.

use std::{
    fs::File,
    io::{BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::{events::Diverted, knock::verify::Checked, spec::Proto, state::unix_now};

/// Lines are buffered and written out by [`Audit::flush`], which the daemon
/// calls after each batch of ring events: a knock flood then costs a write
/// per batch, not per knock.
pub struct Audit {
    path: PathBuf,
    file: BufWriter<File>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `1970-01-01T00:00:00Z` for unix seconds (proleptic Gregorian, UTC).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date, after Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Audit {
    /// Appends to `path`, created 0600.
    pub fn open(path: &Path) -> std::io::Result<Audit> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Audit {
            path: path.to_path_buf(),
            file: BufWriter::with_capacity(1 << 16, f),
        })
    }

    /// The fields every knock line has, accepted or refused.
    fn knock_line(event: &str, knock: &Diverted, checked: Option<&Checked>, carrier: &str) -> Value {
        let (result, reason, detail) = match checked.map(|c| &c.outcome) {
            Some(Ok(_)) => ("accepted", Value::Null, Value::Null),
            Some(Err(r)) => ("rejected", json!(r.code()), json!(r.to_string())),
            None => ("rejected", json!("no_knock"), json!("the ClientHello carried no knock")),
        };
        let request = checked.and_then(|c| c.payload.as_ref()).map(|p| json!({"protocol": p.protocol, "start_port": p.start_port, "end_port": p.end_port, "local_ip": p.local_ip, "local_port": p.local_port, "hostname": p.hostname, "platform": p.platform}));
        json!({
            "time": rfc3339(unix_now()),
            "event": event,
            "knock_id": checked.and_then(|c| c.knock_id).map(|n| hex(&n)),
            "src": knock.src,
            "sport": knock.sport,
            "dst": knock.dst,
            "dport": knock.dport,
            "carrier": carrier,
            "client": checked.and_then(|c| c.client.as_ref()),
            "request": request,
            "result": result,
            "reason": reason,
            "detail": detail,
        })
    }

    /// Records one knock and what came of it.
    pub fn knock(&mut self, knock: &Diverted, checked: &Checked, open_for_secs: u64) {
        let carrier = Proto::from_number(knock.proto).map(Proto::name).unwrap_or("other");
        let mut line = Audit::knock_line("knock", knock, Some(checked), carrier);
        let opened = checked.outcome.as_ref().ok().map(|g| {
            json!({"src_port": if g.key.src_port == 0 { Value::Null } else { json!(g.key.src_port) }, "ports": format!("{}-{}", g.ports.lo, g.ports.hi), "for_secs": open_for_secs})
        });
        line["opened"] = json!(opened);
        // Refusals are the bulk of any flood: the audit file has them all,
        // the daemon's log only at debug level.
        if checked.outcome.is_ok() {
            info!(target: "audit", event = "knock", result = "accepted", client = checked.client.as_deref().unwrap_or(""), src = %knock.src, "{line}");
        } else {
            debug!(target: "audit", event = "knock", result = "rejected", reason = checked.outcome.as_ref().err().map(|r| r.code()).unwrap_or(""), src = %knock.src, "{line}");
        }
        self.write(&line);
    }

    /// Records one portal connection: its knock, if it carried one, and
    /// where it was sent (`upstream` or `guidance`). A browser opens many
    /// connections per page, so these reach the daemon's log only at debug
    /// level; the audit file has every one.
    pub fn portal(&mut self, conn: &Diverted, checked: Option<&Checked>, upstream: Option<&str>) {
        let mut line = Audit::knock_line("portal", conn, checked, "tls_client_hello");
        let decision = if upstream.is_some() { "upstream" } else { "guidance" };
        line["decision"] = json!(decision);
        line["upstream"] = json!(upstream);
        debug!(target: "audit", event = "portal", decision, src = %conn.src, "{line}");
        self.write(&line);
    }

    /// Records any other audit event (revocations and the like); these are
    /// rare, so each is written out at once.
    pub fn event(&mut self, event: &str, fields: Value) {
        let mut line = json!({"time": rfc3339(unix_now()), "event": event});
        if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), fields) {
            obj.extend(extra);
        }
        info!(target: "audit", event, "{line}");
        self.write(&line);
        self.flush();
    }

    /// Writes buffered lines to the file.
    pub fn flush(&mut self) {
        if let Err(e) = self.file.flush() {
            warn!(path = %self.path.display(), error = %e, "writing the audit log failed");
        }
    }

    fn write(&mut self, line: &Value) {
        if let Err(e) = writeln!(self.file, "{line}") {
            warn!(path = %self.path.display(), error = %e, "writing the audit log failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }
}
