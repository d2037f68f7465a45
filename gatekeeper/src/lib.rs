//! Gatekeeper's userspace: loading and pinning the XDP gate, the maps it
//! reads, the daemon that serves it, and the parsing of what operators type.
//!
//! - [`spec`]: ports, tuples, prefixes and durations as operators write them.
//! - [`pins`]: where the gate's objects live on bpffs.
//! - [`gate`]: typed access to the pinned maps (used by the CLI and daemon).
//! - [`loader`]: loading the embedded XDP object, attaching, adopting, detaching.
//! - [`config`]: the daemon's settings from TOML and flags.
//! - [`daemon`]: the running daemon: events, sweeping, shutdown.
//! - [`portal`]: the TLS listener that finds knocks in ClientHellos.

pub mod audit;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod events;
pub mod gate;
pub mod knock;
pub mod knocks;
pub mod loader;
pub mod pins;
pub mod portal;
pub mod spec;
pub mod state;
pub mod sweeper;
pub mod tunnels;
