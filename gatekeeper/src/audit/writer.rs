//! The one thread that writes the audit file. It takes lines from a
//! bounded queue, writes each batch with one `write` on a file opened for
//! appending (so every line lands whole, and lines from different parts of
//! the daemon never mix), rotates by size, reopens on request, and once a
//! second writes the summary of the refusals it counted instead of
//! writing them.

use std::{
    fs::File,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::json;
use tracing::warn;

use super::{Counters, Entry, summary::Summary};
use crate::{
    clock::{rfc3339, unix_now},
    store::config::AuditSettings,
};

/// Entries that may wait for the writer; past that they are counted and
/// lost. The queue takes memory only for what waits in it.
pub const QUEUE: u64 = 1 << 16;
/// A batch is written once it is this large, or when the queue is empty.
const BATCH: usize = 256 * 1024;

/// The writer thread; dropping every [`super::Audit`] handle ends it.
pub struct Writer {
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub(crate) fn start(settings: &AuditSettings, counters: Arc<Counters>) -> io::Result<(Sender<Entry>, Writer)> {
        let file = open(&settings.path)?;
        let (tx, rx) = mpsc::channel();
        let mut state = State {
            path: settings.path.clone(),
            size: file.metadata()?.len(),
            file,
            max_bytes: settings.max_bytes,
            keep: settings.keep,
            refusals_per_sec: settings.refusals_per_sec,
            counters,
            buffer: Vec::with_capacity(BATCH),
            summary: Summary::default(),
            second: (Instant::now(), unix_now()),
            written_this_second: 0,
            dropped_reported: 0,
        };
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || state.run(rx))?;
        Ok((tx, Writer { thread: Some(thread) }))
    }

    /// Waits for the thread to write what is queued and end (after every
    /// handle is dropped).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

struct State {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: u32,
    refusals_per_sec: u32,
    counters: Arc<Counters>,
    buffer: Vec<u8>,
    summary: Summary,
    /// When the current second started, on both clocks.
    second: (Instant, u64),
    written_this_second: u32,
    /// The dropped count already reported in the file.
    dropped_reported: u64,
}

impl State {
    fn run(&mut self, rx: Receiver<Entry>) {
        loop {
            let left = Duration::from_secs(1).saturating_sub(self.second.0.elapsed());
            match rx.recv_timeout(left) {
                Ok(entry) => self.take(entry),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Take whatever else is queued before writing once for all.
            while self.buffer.len() < BATCH {
                match rx.try_recv() {
                    Ok(entry) => self.take(entry),
                    Err(_) => break,
                }
            }
            if self.second.0.elapsed() >= Duration::from_secs(1) {
                self.next_second();
            }
            self.write_out();
        }
        self.next_second();
        self.write_out();
    }

    fn take(&mut self, entry: Entry) {
        self.counters.queued.fetch_sub(1, Ordering::Relaxed);
        match entry {
            Entry::Line(line) => self.push(&line),
            Entry::Refusal { reason, src, line } => {
                if self.written_this_second < self.refusals_per_sec {
                    self.written_this_second += 1;
                    self.push(&line);
                } else {
                    self.summary.add(reason, src);
                    self.counters.summarized.fetch_add(1, Ordering::Relaxed);
                }
            }
            Entry::Reopen => {
                self.write_out();
                self.reopen();
            }
            Entry::Flush(ack) => {
                self.write_out();
                let _ = ack.send(());
            }
        }
    }

    fn push(&mut self, line: &serde_json::Value) {
        // serde_json escapes control characters: a line never holds a newline.
        if serde_json::to_writer(&mut self.buffer, line).is_ok() {
            self.buffer.push(b'\n');
            self.counters.lines.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the second: its summary line, and a line about any loss.
    fn next_second(&mut self) {
        let from = rfc3339(self.second.1);
        if let Some(line) = self.summary.take(&from) {
            self.push(&line);
        }
        let dropped = self.counters.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_reported {
            let line = json!({"time": rfc3339(unix_now()), "event": "audit_overflow",
                "lines_lost": dropped - self.dropped_reported,
                "detail": "the audit writer fell behind; these lines were counted, not written"});
            self.dropped_reported = dropped;
            self.push(&line);
        }
        self.second = (Instant::now(), unix_now());
        self.written_this_second = 0;
    }

    fn write_out(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        match self.file.write_all(&self.buffer) {
            Ok(()) => {
                self.size += self.buffer.len() as u64;
                self.counters
                    .bytes
                    .fetch_add(self.buffer.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                warn!(path = %self.path.display(), error = %e, "writing the audit log failed; these lines are lost");
            }
        }
        self.buffer.clear();
        if self.size >= self.max_bytes {
            self.rotate();
        }
    }

    /// `audit.log` becomes `audit.log.1`, `.1` becomes `.2`, and so on up
    /// to `keep`; the oldest goes.
    fn rotate(&mut self) {
        let numbered = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        let moved = if self.keep == 0 {
            std::fs::remove_file(&self.path)
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(numbered(i), numbered(i + 1));
            }
            std::fs::rename(&self.path, numbered(1))
        };
        match moved {
            Ok(()) => {
                self.counters.rotations.fetch_add(1, Ordering::Relaxed);
                self.reopen();
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                warn!(path = %self.path.display(), error = %e, "rotating the audit log failed");
            }
        }
    }

    fn reopen(&mut self) {
        match open(&self.path).and_then(|f| Ok((f.metadata()?.len(), f))) {
            Ok((size, file)) => {
                self.file = file;
                self.size = size;
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                warn!(path = %self.path.display(), error = %e, "reopening the audit log failed; still writing the old file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::audit::Audit;

    fn settings(tag: &str, max_bytes: u64, refusals_per_sec: u32) -> (AuditSettings, PathBuf) {
        let dir = std::env::temp_dir().join(format!("gk-audit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = AuditSettings {
            path: dir.join("audit.log"),
            max_bytes,
            keep: 2,
            refusals_per_sec,
        };
        (s, dir)
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is whole JSON"))
            .collect()
    }

    #[test]
    fn many_writers_make_whole_lines_and_floods_make_summaries() {
        let (s, dir) = settings("flood", 1 << 30, 10);
        let (audit, writer) = Audit::start(&s, Default::default()).unwrap();
        let started = Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let a = audit.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        a.event("test", json!({"writer": t, "i": i, "pad": "x".repeat(i % 300)}));
                        a.refused("portal", "rate_limited", IpAddr::from([10, 0, t, 1]), json!({}));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(audit.flush(Duration::from_secs(10)));
        let dropped = audit.status().dropped;
        let all = lines(&s.path);
        let refused = all.iter().filter(|l| l["event"] == "portal").count();
        let seconds = started.elapsed().as_secs() as usize + 2;
        assert!(
            refused <= 10 * seconds,
            "refusals past the threshold are not written one by one: {refused} in {seconds} s"
        );
        drop(audit);
        writer.join();
        let all = lines(&s.path);
        let events = all.iter().filter(|l| l["event"] == "test").count() as u64;
        let summarized: u64 = all
            .iter()
            .filter(|l| l["event"] == "refusals_summarized")
            .map(|l| l["count"].as_u64().unwrap())
            .sum();
        assert_eq!(
            events + refused as u64 + summarized + dropped,
            32_000,
            "every line is written whole, summarized, or counted lost"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotation_keeps_the_newest_files_and_reopen_follows_logrotate() {
        let (s, dir) = settings("rotate", 4096, 1000);
        let (audit, writer) = Audit::start(&s, Default::default()).unwrap();
        for i in 0..200 {
            audit.event("test", json!({"i": i, "pad": "y".repeat(100)}));
            audit.flush(Duration::from_secs(5));
        }
        assert!(audit.status().rotations >= 3);
        assert!(dir.join("audit.log.1").exists() && dir.join("audit.log.2").exists());
        assert!(!dir.join("audit.log.3").exists(), "only `keep` rotated files stay");
        for p in ["audit.log", "audit.log.1", "audit.log.2"] {
            let size = std::fs::metadata(dir.join(p)).unwrap().len();
            assert!(size <= 4096 + 200, "{p}: {size}");
        }
        std::fs::rename(&s.path, dir.join("moved")).unwrap();
        audit.reopen();
        audit.event("after", json!({}));
        assert!(audit.flush(Duration::from_secs(5)));
        assert_eq!(lines(&s.path).len(), 1, "a new file after reopen");
        drop(audit);
        writer.join();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
