//! The device's own record of the knocks it sent: one JSON line per knock
//! (time, knock id, carrier, where it went, what it asked for, what the
//! device saw come of it). The knock id is the knock's nonce, which the
//! gateway's audit trail records too, so `gatekeeper audit merge` can put
//! what the device sent beside what the gateway decided.
//!
//! By default the journal sits beside the credential (`laptop.toml` keeps
//! `laptop.knocks.jsonl`). It is kept to [`MAX_BYTES`] by moving the full
//! file to `.1`. Failing to write it never fails a knock: the device says
//! so on stderr and goes on.

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{Carrier, wire};
use crate::clock::{rfc3339, unix_now};

/// Past this size the journal moves to `.1`, replacing the older one.
pub const MAX_BYTES: u64 = 1 << 20;

/// One knock as the device sent it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub time: String,
    /// The knock's nonce, hex: the gateway's `knock_id`.
    pub knock_id: String,
    /// The credential's client name.
    pub client: String,
    pub carrier: String,
    /// Where the knock went: `ADDR:PORT`, or `ADDR` for an echo.
    pub target: String,
    /// What it asked to open: `tcp/22`, `udp/5000-5010`, `icmp`.
    pub request: String,
    /// What the device saw: `sent` (nothing comes back for a packet
    /// knock), `connected` or `no_answer` (`connect`), `tls_established`
    /// or `failed` (the portal).
    pub outcome: String,
}

/// Where a device keeps its journal.
#[derive(Clone, Debug)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn new(path: PathBuf) -> Journal {
        Journal { path }
    }

    /// The default place: beside `credential`, its extension replaced.
    pub fn beside(credential: &Path) -> Journal {
        Journal::new(credential.with_extension("knocks.jsonl"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the knock `packet` (its nonce is its id).
    pub fn record(
        &self,
        packet: &[u8],
        client: &str,
        carrier: Carrier,
        target: String,
        request: String,
        outcome: &str,
    ) {
        let Ok(nonce) = wire::nonce_of(packet) else {
            return;
        };
        let sent = Sent {
            time: rfc3339(unix_now()),
            knock_id: crate::hex::encode(&nonce),
            client: client.to_string(),
            carrier: carrier.name().to_string(),
            target,
            request,
            outcome: outcome.to_string(),
        };
        if let Err(e) = self.append(&sent) {
            warn!(journal = %self.path.display(), error = %e, "could not record the knock in the device's journal (--knock-log moves it, --no-knock-log turns it off)");
        }
    }

    fn append(&self, sent: &Sent) -> std::io::Result<()> {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= MAX_BYTES) {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, old)?;
        }
        let mut line = serde_json::to_vec(sent).map_err(std::io::Error::other)?;
        line.push(b'\n');
        // One write of one whole line: concurrent knocks never interleave.
        crate::platform::append_private(&self.path)?.write_all(&line)
    }
}

/// The text a journal line gives a target.
pub fn target_text(server: IpAddr, port: Option<u16>) -> String {
    match port {
        Some(p) => std::net::SocketAddr::new(server, p).to_string(),
        None => server.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(nonce_byte: u8) -> Vec<u8> {
        let key_id = [7u8; 16];
        let key = [9u8; 32];
        let payload = crate::knock::payload::Payload {
            timestamp: 1,
            client_id: "laptop".into(),
            protocol: "tcp".into(),
            server_ip: "10.0.0.1".parse().unwrap(),
            start_port: 22,
            end_port: 22,
            local_ip: "10.0.0.2".parse().unwrap(),
            local_port: 0,
            platform: "linux".into(),
            hostname: "h".into(),
        };
        wire::seal(&key_id, &key, &[nonce_byte; wire::NONCE_LEN], &payload).unwrap()
    }

    #[test]
    fn lines_name_the_knock_by_its_nonce_and_the_file_stays_bounded() {
        let dir = std::env::temp_dir().join(format!("gk-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let j = Journal::beside(&dir.join("laptop.toml"));
        assert_eq!(j.path(), dir.join("laptop.knocks.jsonl"));
        j.record(
            &packet(0xab),
            "laptop",
            Carrier::Udp,
            "10.0.0.1:62201".into(),
            "tcp/22".into(),
            "sent",
        );
        let text = std::fs::read_to_string(j.path()).unwrap();
        let sent: Sent = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(sent.knock_id, "ab".repeat(wire::NONCE_LEN));
        assert_eq!((sent.carrier.as_str(), sent.outcome.as_str()), ("udp", "sent"));

        // Past the bound the file moves to .1 and a new one starts.
        std::fs::write(j.path(), vec![b'x'; MAX_BYTES as usize]).unwrap();
        j.record(&packet(1), "laptop", Carrier::Udp, "t".into(), "tcp/22".into(), "sent");
        assert_eq!(std::fs::read_to_string(j.path()).unwrap().lines().count(), 1);
        assert!(dir.join("laptop.knocks.jsonl.1").exists());

        // Not a knock: nothing recorded, nothing fails.
        j.record(b"junk", "laptop", Carrier::Udp, "t".into(), "tcp/22".into(), "sent");
        assert_eq!(std::fs::read_to_string(j.path()).unwrap().lines().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
