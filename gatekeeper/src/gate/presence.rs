//! The PRESENCE counters, mapped into this process: how many whitelist
//! entries of each kind each source slot holds (see
//! `gatekeeper_common::maps::PRESENCE`).
//!
//! The CLI and the daemon may change the whitelist at the same moment, so
//! the counters are changed with atomic operations on shared memory rather
//! than by reading and writing map elements. Every writer counts an entry
//! up before it exists and down after it is gone: a count can run high
//! (the kernel's LRU evicted an entry, a writer died between two steps),
//! which only costs a lookup, but never low, which would drop a client.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use gatekeeper_common::{
    maps::{PRESENCE_SLOTS, PresenceCount, WhitelistKey, presence_slot},
    parse::Addr,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PresenceError {
    #[error("opening the pinned map (a gate loaded by an older release has none: restart the daemon to upgrade it)")]
    Open(#[source] aya::maps::MapError),
    #[error(
        "the pinned map holds {found} slots of {value} bytes where {PRESENCE_SLOTS} of 8 are needed (an older release's layout): restart the daemon to replace it"
    )]
    Layout { found: u32, value: u32 },
    #[error("mapping it into memory")]
    Map(#[source] std::io::Error),
}

/// The counters, mapped read-write and shared with the kernel.
pub struct Presence {
    slots: *const AtomicU64,
    /// Keeps the map alive while it is mapped.
    _map: MapData,
}

// SAFETY: the mapping is shared memory touched only through atomics, and
// it lives as long as the value.
unsafe impl Send for Presence {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for Presence {}

const BYTES: usize = PRESENCE_SLOTS as usize * 8;

impl Presence {
    /// Maps the PRESENCE array pinned at `path`.
    pub fn open(path: &Path) -> Result<Presence, PresenceError> {
        let map = MapData::from_pin(path).map_err(PresenceError::Open)?;
        let info = map.info().map_err(PresenceError::Open)?;
        if info.max_entries() != PRESENCE_SLOTS || info.value_size() != 8 {
            return Err(PresenceError::Layout {
                found: info.max_entries(),
                value: info.value_size(),
            });
        }
        // SAFETY: a fresh shared mapping of the map's value area, which for
        // an mmapable array of 8-byte values is exactly BYTES long.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(PresenceError::Map(std::io::Error::last_os_error()));
        }
        Ok(Presence {
            slots: base as *const AtomicU64,
            _map: map,
        })
    }

    fn slot(&self, addr: &[u8; 16]) -> &AtomicU64 {
        // SAFETY: presence_slot is below PRESENCE_SLOTS, so the slot lies
        // inside the mapping, which is 8-byte aligned (page aligned).
        unsafe { &*self.slots.add(presence_slot(Addr::from_bytes(*addr)) as usize) }
    }

    /// Counts the entry `key` in; call before creating it.
    pub fn count_up(&self, key: &WhitelistKey) {
        self.slot(&key.addr)
            .fetch_add(PresenceCount::unit(key.src_port), Ordering::SeqCst);
    }

    /// Counts the entry `key` out; call after removing it. A count already
    /// at zero stays there rather than borrow from the other kind's.
    pub fn count_down(&self, key: &WhitelistKey) {
        let unit = PresenceCount::unit(key.src_port);
        // The 32 bits that count this entry's kind.
        let kind = unit * u64::from(u32::MAX);
        let _ = self
            .slot(&key.addr)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n & kind != 0).then(|| n - unit)
            });
    }

    /// The counts of `addr`'s slot.
    pub fn count(&self, addr: &[u8; 16]) -> PresenceCount {
        PresenceCount(self.slot(addr).load(Ordering::SeqCst))
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.slots as *mut libc::c_void, BYTES) };
    }
}
