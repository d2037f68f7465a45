//! Removes what has run out: whitelist entries past their TTL and idle for
//! the idle timeout, and expired allowlist prefixes. The XDP program already
//! ignores such entries; sweeping frees their slots and records the event.

use tracing::info;

use super::maps::{Gate, GateError, key_tuple, spans_text};
use crate::clock;

/// What one sweep found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swept {
    pub entries_expired: usize,
    pub prefixes_expired: usize,
    /// Whitelist entries left in the gate.
    pub entries_live: usize,
}

/// Sweeps once.
pub fn sweep(gate: &Gate, idle_ns: u64) -> Result<Swept, GateError> {
    let now = clock::now_ns();
    let (gone, entries_live) = gate.whitelist_sweep(now, idle_ns)?;
    for e in &gone {
        let tuple = key_tuple(&e.key)
            .map(|t| t.to_string())
            .unwrap_or_else(|| format!("{:?}", e.key));
        info!(
            event = "whitelist_expired",
            tuple,
            ports = spans_text(&e.value),
            "whitelist entry expired"
        );
    }
    let prefixes = gate.allow_remove_all(Some(now))?;
    for p in &prefixes {
        info!(event = "allowlist_expired", prefix = %p, "allowlist prefix expired");
    }
    Ok(Swept {
        entries_expired: gone.len(),
        prefixes_expired: prefixes.len(),
        entries_live,
    })
}
