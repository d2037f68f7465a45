//! Reading the audit trail back: every file the writer kept (the rotated
//! ones, oldest first, then the current one), lines filtered as they
//! stream past, and a device's knock journal joined with the gateway's
//! lines by knock id (`gatekeeper audit`, `gatekeeper audit merge`).
//!
//! Times compare as text: the writer stamps every line in one fixed
//! RFC 3339 form (`2026-12-02T09:30:00Z`), which sorts as it reads.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
};

use serde_json::Value;
use thiserror::Error;

use crate::knock::journal::Sent;

#[derive(Debug, Error)]
pub enum QueryError {
    #[error("no audit trail at {0}: is this the gateway's state directory (or `[audit] path`)?")]
    Missing(PathBuf),
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is neither a duration (30m, 1h, 7d) nor a time (2026-12-02 or 2026-12-02T09:30:00Z)")]
    Since(String),
}

/// The audit files, oldest first: `audit.log.N` .. `audit.log.1`, then
/// `audit.log` itself.
pub fn files(current: &Path) -> Result<Vec<PathBuf>, QueryError> {
    let mut rotated = Vec::new();
    for n in 1.. {
        let mut p = current.as_os_str().to_owned();
        p.push(format!(".{n}"));
        let p = PathBuf::from(p);
        if !p.exists() {
            break;
        }
        rotated.push(p);
    }
    if rotated.is_empty() && !current.exists() {
        return Err(QueryError::Missing(current.to_path_buf()));
    }
    rotated.reverse();
    if current.exists() {
        rotated.push(current.to_path_buf());
    }
    Ok(rotated)
}

/// `--since`: a duration back from `now` (unix seconds), a day, or a time.
pub fn since(text: &str, now: u64) -> Result<String, QueryError> {
    if let Ok(d) = crate::spec::duration(text) {
        return Ok(crate::clock::rfc3339(now.saturating_sub(d.as_secs())));
    }
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    let shape = full.len() == 20
        && full.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == 'Z',
            _ => c.is_ascii_digit(),
        });
    if shape {
        Ok(full)
    } else {
        Err(QueryError::Since(text.to_string()))
    }
}

/// What a line must match; each field left `None` matches anything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub event: Option<String>,
    pub client: Option<String>,
    pub result: Option<String>,
    /// A line's `reason`, or a reason a summary line counted.
    pub reason: Option<String>,
    /// Lines at or after this time (RFC 3339, as [`since`] gives).
    pub since: Option<String>,
    pub knock_id: Option<String>,
}

impl Filter {
    pub fn matches(&self, line: &Value) -> bool {
        let is = |key: &str, want: &Option<String>| want.as_ref().is_none_or(|w| line[key].as_str() == Some(w));
        let summary = line["event"] == "refusals_summarized";
        let reason = self
            .reason
            .as_ref()
            .is_none_or(|r| line["reason"].as_str() == Some(r) || (summary && line["by_reason"].get(r).is_some()));
        // A summary line stands for refusals: it matches `--result rejected`.
        let result = (summary && self.result.as_deref() == Some("rejected")) || is("result", &self.result);
        is("event", &self.event)
            && is("client", &self.client)
            && result
            && reason
            && is("knock_id", &self.knock_id)
            && self
                .since
                .as_ref()
                .is_none_or(|s| line["time"].as_str().is_some_and(|t| t >= s.as_str()))
    }
}

/// A line that is not JSON: where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub path: PathBuf,
    pub line: usize,
}

/// Streams every line of `files` in order; `each` gets the ones `filter`
/// matches, and returns false to stop. Lines that are not JSON (a crash
/// cut one short, a hand edit) are skipped and returned.
pub fn scan(
    files: &[PathBuf],
    filter: &Filter,
    mut each: impl FnMut(Value) -> bool,
) -> Result<Vec<Unreadable>, QueryError> {
    let mut unreadable = Vec::new();
    for path in files {
        let went_on = read_lines(path, &mut unreadable, |line| {
            match serde_json::from_slice::<Value>(line) {
                Ok(v) if v.is_object() => Some(!filter.matches(&v) || each(v)),
                _ => None,
            }
        })?;
        if !went_on {
            break;
        }
    }
    Ok(unreadable)
}

/// Gives each non-blank line of `path` to `each`, which answers `None`
/// for a line that is not what the file should hold (noted in
/// `unreadable`), else whether to go on. Returns false if told to stop.
fn read_lines(
    path: &Path,
    unreadable: &mut Vec<Unreadable>,
    mut each: impl FnMut(&[u8]) -> Option<bool>,
) -> Result<bool, QueryError> {
    let read = |source| QueryError::Read {
        path: path.to_path_buf(),
        source,
    };
    let reader = BufReader::new(File::open(path).map_err(read)?);
    for (n, line) in reader.split(b'\n').enumerate() {
        let line = line.map_err(read)?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match each(&line) {
            Some(true) => {}
            Some(false) => return Ok(false),
            None => unreadable.push(Unreadable {
                path: path.to_path_buf(),
                line: n + 1,
            }),
        }
    }
    Ok(true)
}

/// One knock a device sent, with the gateway's lines for it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Merged {
    pub sent: Sent,
    /// The gateway's `knock` or `portal` lines with this knock id (a
    /// replay is a second line), in the order written; empty when the
    /// knock never reached the daemon.
    pub gateway: Vec<Value>,
}

/// Joins the device's journal with the gateway's lines by knock id.
pub fn merge(journal: Vec<Sent>, files: &[PathBuf]) -> Result<(Vec<Merged>, Vec<Unreadable>), QueryError> {
    let mut by_id: HashMap<String, Vec<Value>> = journal.iter().map(|s| (s.knock_id.clone(), Vec::new())).collect();
    let unreadable = scan(files, &Filter::default(), |line| {
        if let Some(lines) = line["knock_id"].as_str().and_then(|id| by_id.get_mut(id)) {
            lines.push(line);
        }
        true
    })?;
    let merged = journal
        .into_iter()
        .map(|sent| {
            let gateway = by_id.get(&sent.knock_id).cloned().unwrap_or_default();
            Merged { sent, gateway }
        })
        .collect();
    Ok((merged, unreadable))
}

/// A device's journal: its lines, and the ones that are not journal lines.
pub fn read_journal(path: &Path) -> Result<(Vec<Sent>, Vec<Unreadable>), QueryError> {
    let mut sent = Vec::new();
    let mut unreadable = Vec::new();
    read_lines(path, &mut unreadable, |line| {
        let s = serde_json::from_slice::<Sent>(line).ok()?;
        sent.push(s);
        Some(true)
    })?;
    Ok((sent, unreadable))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn since_takes_durations_days_and_times() {
        let now = 1_767_225_600; // 2026-01-01T00:00:00Z
        assert_eq!(since("1h", now).unwrap(), "2025-12-31T23:00:00Z");
        assert_eq!(since("2026-12-02", now).unwrap(), "2026-12-02T00:00:00Z");
        assert_eq!(since("2026-12-02T09:30:00Z", now).unwrap(), "2026-12-02T09:30:00Z");
        for bad in ["yesterday", "2026-12-2", "2026-12-02 09:30:00", "1 h"] {
            let e = since(bad, now).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("30m"), "{e}");
        }
    }

    #[test]
    fn filters_match_fields_summaries_and_times() {
        let knock = json!({"time": "2026-12-02T09:30:00Z", "event": "knock", "client": "alice", "result": "rejected", "reason": "replay", "knock_id": "ab"});
        let summary =
            json!({"time": "2026-12-02T09:31:00Z", "event": "refusals_summarized", "by_reason": {"bad_tag": 9}});
        let f = |f: Filter, line: &Value| f.matches(line);
        assert!(f(Filter::default(), &knock));
        assert!(f(
            Filter {
                client: Some("alice".into()),
                reason: Some("replay".into()),
                ..Default::default()
            },
            &knock
        ));
        assert!(!f(
            Filter {
                client: Some("bob".into()),
                ..Default::default()
            },
            &knock
        ));
        assert!(f(
            Filter {
                reason: Some("bad_tag".into()),
                result: Some("rejected".into()),
                ..Default::default()
            },
            &summary
        ));
        assert!(!f(
            Filter {
                reason: Some("replay".into()),
                ..Default::default()
            },
            &summary
        ));
        let later = Filter {
            since: Some("2026-12-02T09:30:30Z".into()),
            ..Default::default()
        };
        assert!(!f(later.clone(), &knock) && f(later, &summary));
    }

    #[test]
    fn rotated_files_are_read_oldest_first_and_bad_lines_named() {
        let dir = std::env::temp_dir().join(format!("gk-audit-query-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let current = dir.join("audit.log");
        assert!(matches!(files(&current), Err(QueryError::Missing(_))));
        std::fs::write(dir.join("audit.log.2"), "{\"n\":1}\n").unwrap();
        std::fs::write(dir.join("audit.log.1"), "{\"n\":2}\n{\"n\":3,\"cut\n").unwrap();
        std::fs::write(&current, "{\"n\":4}\n\n").unwrap();
        let all = files(&current).unwrap();
        let mut seen = Vec::new();
        let bad = scan(&all, &Filter::default(), |v| {
            seen.push(v["n"].as_u64().unwrap());
            true
        })
        .unwrap();
        assert_eq!(seen, [1, 2, 4]);
        assert_eq!(
            bad,
            [Unreadable {
                path: dir.join("audit.log.1"),
                line: 2
            }]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
