//! Refusals from unproven sources past the per-second threshold, counted
//! by reason and by source prefix (IPv4 /24, IPv6 /48: a spoofing flood
//! from fresh addresses still shows where it claims to come from). The
//! number of prefixes tracked is bounded; the rest are counted together.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde_json::{Value, json};

use crate::spec::Prefix;

/// Distinct prefixes counted one by one in a second; more go to `other`.
const MAX_PREFIXES: usize = 1024;
/// Prefixes named in a summary line, the busiest first.
const SHOWN_PREFIXES: usize = 16;

#[derive(Debug, Default)]
pub struct Summary {
    count: u64,
    by_reason: BTreeMap<&'static str, u64>,
    by_prefix: HashMap<Prefix, u64>,
    other_sources: u64,
}

/// The prefix a source is counted under.
fn prefix_of(src: IpAddr) -> Prefix {
    let len = if src.is_ipv4() { 24 } else { 48 };
    // A /24 or /48 of a valid address always parses.
    format!("{src}/{len}").parse().unwrap_or(Prefix { addr: src, len: 128 })
}

impl Summary {
    pub fn add(&mut self, reason: &'static str, src: IpAddr) {
        self.count += 1;
        *self.by_reason.entry(reason).or_insert(0) += 1;
        let prefix = prefix_of(src);
        if let Some(n) = self.by_prefix.get_mut(&prefix) {
            *n += 1;
        } else if self.by_prefix.len() < MAX_PREFIXES {
            self.by_prefix.insert(prefix, 1);
        } else {
            self.other_sources += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The summary line for the second that started at `from` (rfc3339),
    /// and a fresh summary for the next one.
    pub fn take(&mut self, from: &str) -> Option<Value> {
        if self.is_empty() {
            return None;
        }
        let done = std::mem::take(self);
        let mut prefixes: Vec<(Prefix, u64)> = done.by_prefix.into_iter().collect();
        prefixes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.to_string().cmp(&b.0.to_string())));
        let shown: serde_json::Map<String, Value> = prefixes
            .iter()
            .take(SHOWN_PREFIXES)
            .map(|(p, n)| (p.to_string(), json!(n)))
            .collect();
        let unshown: u64 = prefixes.iter().skip(SHOWN_PREFIXES).map(|(_, n)| n).sum::<u64>() + done.other_sources;
        Some(json!({
            "time": from,
            "event": "refusals_summarized",
            "seconds": 1,
            "count": done.count,
            "by_reason": done.by_reason,
            "by_source": shown,
            "other_sources": unshown,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spoofed_flood_is_one_bounded_line() {
        let mut s = Summary::default();
        assert!(s.take("t").is_none());
        for i in 0..100_000u32 {
            let src = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            s.add(if i % 4 == 0 { "replay" } else { "bad_tag" }, src);
        }
        s.add("no_knock", "2001:db8:1:2::7".parse().unwrap());
        let line = s.take("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(line["count"], 100_001);
        assert_eq!(line["by_reason"]["replay"], 25_000);
        assert_eq!(line["by_source"].as_object().unwrap().len(), SHOWN_PREFIXES);
        assert_eq!(line["by_source"]["10.0.0.0/24"], 256);
        assert!(line.to_string().len() < 2048, "bounded: {line}");
        assert!(s.is_empty(), "the next second starts afresh");
    }
}
