//! The gate in the kernel and its handles: where its objects are pinned,
//! loading and attaching the XDP program, typed access to its maps, the
//! ring of records it hands up, and sweeping what has run out.
//!
//! - [`pins`]: where a gate's objects live on bpffs, and the daemon locks.
//! - [`loader`]: loading the embedded XDP object, attaching, adopting.
//! - [`maps`]: typed access to the pinned maps (CLI and daemon).
//! - [`presence`]: the per-source counters that let strangers skip the
//!   whitelist lookups, kept by every writer of the whitelist.
//! - [`ring`]: the records the program puts in the EVENTS ring.
//! - [`interfaces`]: the namespace's interfaces, to find the ungated ones.
//! - [`sweeper`]: removing expired, idle entries.

pub mod interfaces;
pub mod loader;
pub mod maps;
pub mod pins;
pub mod presence;
pub mod ring;
pub mod sweeper;

pub use maps::{EntryView, Gate, GateError, WhitelistEntry, key_tuple, protected_words, spans_text};
pub use pins::unpin_all;
