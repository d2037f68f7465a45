//! Typed access to a gate's pinned maps. The CLI and the daemon both go
//! through here, so each map's layout is handled in one place.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf, lpm_trie::Key};
use gatekeeper_common::{
    decide::{Reason, STATS_LEN, counter_index, entry_is_live},
    maps::{
        self as names, AllowValue, CFG_ALLOWLIST, Config, FLAG_OPERATOR, IFACE_NAME_LEN, KEY_ID_LEN, KnockBucket,
        MAX_IFACES, NONCE_LEN, PROTECTED_WORDS, TAG_KEY_SLOTS, TagKey, WhitelistKey, WhitelistValue,
    },
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{
    pins::PinError,
    presence::{Presence, PresenceError},
};
use crate::{
    clock,
    spec::{PortRange, PortSet, Prefix, Proto, Tuple, map_addr},
};

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;
/// `BPF_EXIST`: update only if the key is present.
const BPF_EXIST: u64 = 2;
/// Rounds of create-or-update before a whitelist write gives up: each
/// lost round means another process removed or created the same entry
/// in between.
const WRITE_ROUNDS: usize = 8;

#[derive(Debug, Error)]
pub enum GateError {
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("map {map} at {dir}")]
    Map {
        map: &'static str,
        dir: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("the PRESENCE counters at {dir}")]
    Presence {
        dir: PathBuf,
        #[source]
        source: PresenceError,
    },
    #[error("another process kept creating and removing the whitelist entry for {0}; try again")]
    Contended(String),
    #[error("no whitelist entry for {0}")]
    NoSuchEntry(String),
    #[error("no allowlist entry for {0}")]
    NoSuchPrefix(String),
    #[error("the replay cache is full: every slot holds a nonce still inside its window")]
    ReplayFull,
    #[error("counting this machine's possible CPUs")]
    Cpus(#[source] std::io::Error),
    #[error("the gate spans {0} interfaces already, as many as it can count for: detach one first")]
    NoSlot(u32),
}

/// Whether a map error is the kernel's errno `code`.
fn errno(e: &MapError, code: i32) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(code))
}

/// Counter values summed over CPUs, one per [`Reason`], in its order.
pub type Counters = Vec<(Reason, u64)>;

/// The maps of one pinned gate.
pub struct Gate {
    dir: PathBuf,
    /// The replay cache, opened on first use and kept: the daemon touches
    /// it for every authentic knock, and reopening the pin costs syscalls.
    replay: Mutex<Option<HashMap<MapData, [u8; NONCE_LEN], u64>>>,
    /// The PRESENCE counters, mapped on first whitelist write.
    presence: OnceLock<Presence>,
}

/// One whitelist entry as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WhitelistEntry {
    pub key: WhitelistKey,
    pub value: WhitelistValue,
}

impl Gate {
    /// Opens the gate pinned at `dir` (see [`super::pins::resolve`]).
    pub fn open(dir: &Path) -> Result<Gate, GateError> {
        if !dir.join(names::WHITELIST).exists() {
            return Err(PinError::NotPinned(dir.to_path_buf()).into());
        }
        Ok(Gate {
            dir: dir.to_path_buf(),
            replay: Mutex::new(None),
            presence: OnceLock::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn err(&self, map: &'static str) -> impl FnOnce(MapError) -> GateError + '_ {
        move |source| GateError::Map {
            map,
            dir: self.dir.clone(),
            source,
        }
    }

    fn map(&self, name: &'static str) -> Result<Map, GateError> {
        let data = MapData::from_pin(self.dir.join(name)).map_err(self.err(name))?;
        Map::from_map_data(data).map_err(self.err(name))
    }

    fn whitelist_map(&self) -> Result<HashMap<MapData, WhitelistKey, WhitelistValue>, GateError> {
        HashMap::try_from(self.map(names::WHITELIST)?).map_err(self.err(names::WHITELIST))
    }

    fn allowlist_map(&self) -> Result<LpmTrie<MapData, [u8; 16], AllowValue>, GateError> {
        LpmTrie::try_from(self.map(names::ALLOWLIST)?).map_err(self.err(names::ALLOWLIST))
    }

    fn config_map(&self) -> Result<Array<MapData, Config>, GateError> {
        Array::try_from(self.map(names::CONFIG)?).map_err(self.err(names::CONFIG))
    }

    /// The ring buffer the XDP program writes knocks and audit samples to.
    pub fn events(&self) -> Result<RingBuf<MapData>, GateError> {
        RingBuf::try_from(self.map(names::EVENTS)?).map_err(self.err(names::EVENTS))
    }

    pub fn config(&self) -> Result<Config, GateError> {
        self.config_map()?.get(&0, 0).map_err(self.err(names::CONFIG))
    }

    /// Writes the CONFIG entry. Its allowlist flag is always taken from the
    /// allowlist itself, whatever `cfg` says.
    pub fn set_config(&self, cfg: &Config) -> Result<(), GateError> {
        let mut cfg = *cfg;
        cfg.flags &= !CFG_ALLOWLIST;
        if self.allowlist_map()?.keys().next().is_some() {
            cfg.flags |= CFG_ALLOWLIST;
        }
        self.config_map()?.set(0, cfg, 0).map_err(self.err(names::CONFIG))
    }

    /// Re-derives the allowlist flag after the allowlist changed.
    fn sync_allowlist_flag(&self) -> Result<(), GateError> {
        self.set_config(&self.config()?)
    }

    /// Rewrites the whole PROTECTED bitmap for `spec`.
    pub fn set_protected(&self, spec: &PortSet) -> Result<(), GateError> {
        let words = protected_words(spec);
        let mut map: Array<MapData, u64> =
            Array::try_from(self.map(names::PROTECTED)?).map_err(self.err(names::PROTECTED))?;
        for (i, w) in words.iter().enumerate() {
            map.set(i as u32, w, 0).map_err(self.err(names::PROTECTED))?;
        }
        Ok(())
    }

    /// Every whitelist entry, in key order.
    /// How many entries the pinned whitelist holds at most.
    pub fn whitelist_capacity(&self) -> Result<u32, GateError> {
        let name = names::WHITELIST;
        let data = MapData::from_pin(self.dir.join(name)).map_err(self.err(name))?;
        let info = data.info().map_err(self.err(name))?;
        Ok(info.max_entries())
    }

    pub fn whitelist(&self) -> Result<Vec<WhitelistEntry>, GateError> {
        let map = self.whitelist_map()?;
        let mut out = Vec::new();
        for item in map.iter() {
            match item {
                Ok((key, value)) => out.push(WhitelistEntry { key, value }),
                // Deleted (by the sweeper or LRU) between listing and reading.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(self.err(names::WHITELIST)(e)),
            }
        }
        out.sort_by_key(|a| a.key);
        Ok(out)
    }

    /// Opens `ports` to `key` until at least `expires_ns`: added to the
    /// tuple's entry if it has one (which is then kept open at least that
    /// long), else a new entry. Returns the entry as written.
    pub fn whitelist_grant(
        &self,
        key: &WhitelistKey,
        ports: PortRange,
        expires_ns: u64,
        flags: u32,
        owner: u32,
    ) -> Result<WhitelistValue, GateError> {
        let value = match self.whitelist_get(key)? {
            Some(mut v) => {
                v.add_span(ports.lo, ports.hi);
                v.expires_ns = v.expires_ns.max(expires_ns);
                v.flags |= flags;
                v.owner = owner;
                v
            }
            None => WhitelistValue::new(expires_ns, ports.lo, ports.hi, flags, owner),
        };
        self.whitelist_insert(key, &value)?;
        Ok(value)
    }

    /// [`Gate::whitelist_grant`] for what an operator types.
    pub fn whitelist_add(
        &self,
        tuple: &Tuple,
        ports: PortRange,
        ttl: Duration,
        flags: u32,
        owner: u32,
    ) -> Result<WhitelistValue, GateError> {
        let expires = clock::now_ns().saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64);
        self.whitelist_grant(&tuple_key(tuple), ports, expires, flags, owner)
    }

    /// The entry for `key`, if there is one.
    pub fn whitelist_get(&self, key: &WhitelistKey) -> Result<Option<WhitelistValue>, GateError> {
        match self.whitelist_map()?.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(self.err(names::WHITELIST)(e)),
        }
    }

    /// Removes, in one walk, every entry a client opened whose owner id
    /// `keep` refuses (operators' entries stay); returns how many went per
    /// owner.
    pub fn whitelist_close_owners(&self, keep: impl Fn(u32) -> bool) -> Result<BTreeMap<u32, usize>, GateError> {
        let mut map = self.whitelist_map()?;
        let mut closed = BTreeMap::new();
        for e in self.whitelist()? {
            let owner = e.value.owner;
            if owner == 0 || e.value.flags & FLAG_OPERATOR != 0 || keep(owner) {
                continue;
            }
            if self.whitelist_remove(&mut map, &e.key)? {
                *closed.entry(owner).or_insert(0) += 1;
            }
        }
        Ok(closed)
    }

    /// The PRESENCE counters, mapped once per handle.
    pub fn presence(&self) -> Result<&Presence, GateError> {
        if let Some(p) = self.presence.get() {
            return Ok(p);
        }
        let p = Presence::open(&self.dir.join(names::PRESENCE)).map_err(|source| GateError::Presence {
            dir: self.dir.clone(),
            source,
        })?;
        Ok(self.presence.get_or_init(|| p))
    }

    /// Writes one entry exactly as given. A new entry is counted in
    /// PRESENCE before it exists; an existing one was counted by whoever
    /// created it, so it is updated in place, never re-created uncounted.
    pub fn whitelist_insert(&self, key: &WhitelistKey, value: &WhitelistValue) -> Result<(), GateError> {
        let presence = self.presence()?;
        let mut map = self.whitelist_map()?;
        presence.count_up(key);
        for _ in 0..WRITE_ROUNDS {
            match map.insert(key, value, BPF_NOEXIST) {
                Ok(()) => return Ok(()),
                Err(e) if errno(&e, libc::EEXIST) => {}
                Err(e) => {
                    presence.count_down(key);
                    return Err(self.err(names::WHITELIST)(e));
                }
            }
            match map.insert(key, value, BPF_EXIST) {
                Ok(()) => {
                    presence.count_down(key);
                    return Ok(());
                }
                // Removed since: create it after all.
                Err(e) if errno(&e, libc::ENOENT) => {}
                Err(e) => {
                    presence.count_down(key);
                    return Err(self.err(names::WHITELIST)(e));
                }
            }
        }
        presence.count_down(key);
        Err(GateError::Contended(
            key_tuple(key).map_or_else(|| format!("{key:?}"), |t| t.to_string()),
        ))
    }

    /// Removes `key`'s entry, then uncounts it; false when it was not there.
    fn whitelist_remove(
        &self,
        map: &mut HashMap<MapData, WhitelistKey, WhitelistValue>,
        key: &WhitelistKey,
    ) -> Result<bool, GateError> {
        match map.remove(key) {
            Ok(()) => {
                self.presence()?.count_down(key);
                Ok(true)
            }
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) if errno(&e, libc::ENOENT) => Ok(false),
            Err(e) => Err(self.err(names::WHITELIST)(e)),
        }
    }

    /// Counts every entry in PRESENCE, for a PRESENCE map created beside a
    /// whitelist that already has entries (an upgrade).
    pub fn presence_seed(&self) -> Result<usize, GateError> {
        let presence = self.presence()?;
        let entries = self.whitelist()?;
        for e in &entries {
            presence.count_up(&e.key);
        }
        Ok(entries.len())
    }

    pub fn whitelist_del(&self, tuple: &Tuple) -> Result<(), GateError> {
        if self.whitelist_remove(&mut self.whitelist_map()?, &tuple_key(tuple))? {
            Ok(())
        } else {
            Err(GateError::NoSuchEntry(tuple.to_string()))
        }
    }

    /// Removes every whitelist entry; returns how many there were.
    pub fn whitelist_flush(&self) -> Result<usize, GateError> {
        let mut map = self.whitelist_map()?;
        let keys: Vec<WhitelistKey> = map.keys().filter_map(Result::ok).collect();
        let mut removed = 0;
        for key in keys {
            if self.whitelist_remove(&mut map, &key)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes entries that are past their TTL and idle; returns them and
    /// how many entries it left.
    pub fn whitelist_sweep(&self, now: u64, idle_ns: u64) -> Result<(Vec<WhitelistEntry>, usize), GateError> {
        let mut map = self.whitelist_map()?;
        let mut gone = Vec::new();
        let listed = self.whitelist()?;
        let count = listed.len();
        for entry in listed {
            // Re-read: the XDP program may have refreshed it since the listing.
            let Ok(fresh) = map.get(&entry.key, 0) else {
                continue;
            };
            if !entry_is_live(&fresh, now, idle_ns) && self.whitelist_remove(&mut map, &entry.key)? {
                gone.push(WhitelistEntry {
                    key: entry.key,
                    value: fresh,
                });
            }
        }
        let live = count - gone.len();
        Ok((gone, live))
    }

    /// Every allowlist prefix with its expiry.
    pub fn allowlist(&self) -> Result<Vec<(Prefix, AllowValue)>, GateError> {
        let map = self.allowlist_map()?;
        let mut out = Vec::new();
        for item in map.iter() {
            match item {
                Ok((key, value)) => out.push((Prefix::from_mapped(key.data(), key.prefix_len()), value)),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(self.err(names::ALLOWLIST)(e)),
            }
        }
        out.sort_by_key(|(p, _)| (map_addr(p.addr), p.len));
        Ok(out)
    }

    pub fn allow_add(&self, prefix: &Prefix, ttl: Duration) -> Result<(), GateError> {
        let value = AllowValue {
            expires_ns: clock::now_ns().saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64),
        };
        self.allow_insert(prefix, &value)
    }

    /// Writes one prefix exactly as given.
    pub fn allow_insert(&self, prefix: &Prefix, value: &AllowValue) -> Result<(), GateError> {
        self.allowlist_map()?
            .insert(&prefix_key(prefix), value, 0)
            .map_err(self.err(names::ALLOWLIST))?;
        self.sync_allowlist_flag()
    }

    pub fn allow_del(&self, prefix: &Prefix) -> Result<(), GateError> {
        match self.allowlist_map()?.remove(&prefix_key(prefix)) {
            Err(MapError::KeyNotFound) => Err(GateError::NoSuchPrefix(prefix.to_string())),
            other => other.map_err(self.err(names::ALLOWLIST)),
        }?;
        self.sync_allowlist_flag()
    }

    /// Removes allowlist prefixes; with `only_expired_at`, only those expired
    /// by then. Returns what was removed.
    pub fn allow_remove_all(&self, only_expired_at: Option<u64>) -> Result<Vec<Prefix>, GateError> {
        let mut map = self.allowlist_map()?;
        let mut removed = Vec::new();
        for (prefix, value) in self.allowlist()? {
            if only_expired_at.is_some_and(|now| now < value.expires_ns) {
                continue;
            }
            if map.remove(&prefix_key(&prefix)).is_ok() {
                removed.push(prefix);
            }
        }
        if !removed.is_empty() {
            self.sync_allowlist_flag()?;
        }
        Ok(removed)
    }

    fn with_replay<T>(
        &self,
        f: impl FnOnce(&mut HashMap<MapData, [u8; NONCE_LEN], u64>) -> Result<T, GateError>,
    ) -> Result<T, GateError> {
        // Nothing here leaves the handle half-updated on panic.
        let mut held = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        let map = match &mut *held {
            Some(map) => map,
            slot @ None => slot.insert(HashMap::try_from(self.map(names::REPLAY)?).map_err(self.err(names::REPLAY))?),
        };
        f(map)
    }

    /// Records a knock nonce until `until_unix`. Returns false when the nonce
    /// was already recorded (a replay); [`GateError::ReplayFull`] when the
    /// cache is full.
    pub fn replay_record(&self, nonce: &[u8; NONCE_LEN], until_unix: u64) -> Result<bool, GateError> {
        self.with_replay(|map| match map.insert(nonce, until_unix, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e, libc::EEXIST) => Ok(false),
            Err(e) if errno(&e, libc::E2BIG) => Err(GateError::ReplayFull),
            Err(e) => Err(self.err(names::REPLAY)(e)),
        })
    }

    /// Every nonce in the replay cache with the unix time it may be
    /// forgotten at. A full walk (two syscalls per entry): done once per
    /// daemon start, to learn what an earlier daemon recorded.
    pub fn replay_entries(&self) -> Result<Vec<([u8; NONCE_LEN], u64)>, GateError> {
        self.with_replay(|map| Ok(map.iter().filter_map(Result::ok).collect()))
    }

    /// Removes one nonce from the replay cache; false if it was not there.
    pub fn replay_forget(&self, nonce: &[u8; NONCE_LEN]) -> Result<bool, GateError> {
        self.with_replay(|map| match map.remove(nonce) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) if errno(&e, libc::ENOENT) => Ok(false),
            Err(e) => Err(self.err(names::REPLAY)(e)),
        })
    }

    /// Makes KNOCK_KEYS hold exactly `keys`: new ones get the bucket
    /// `fresh`, ones already there keep theirs (a sync must not refill a
    /// bucket a flood is draining). Returns how many were added and removed.
    pub fn sync_knock_keys(
        &self,
        keys: &BTreeSet<[u8; KEY_ID_LEN]>,
        fresh: KnockBucket,
    ) -> Result<(usize, usize), GateError> {
        let mut map: HashMap<MapData, [u8; KEY_ID_LEN], KnockBucket> =
            HashMap::try_from(self.map(names::KNOCK_KEYS)?).map_err(self.err(names::KNOCK_KEYS))?;
        let present: BTreeSet<[u8; KEY_ID_LEN]> = map.keys().filter_map(Result::ok).collect();
        let mut removed = 0;
        for gone in present.difference(keys) {
            match map.remove(gone) {
                Ok(()) => removed += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) if errno(&e, libc::ENOENT) => {}
                Err(e) => return Err(self.err(names::KNOCK_KEYS)(e)),
            }
        }
        let mut added = 0;
        for new in keys.difference(&present) {
            match map.insert(new, fresh, BPF_NOEXIST) {
                Ok(()) => added += 1,
                Err(e) if errno(&e, libc::EEXIST) => {}
                Err(e) => return Err(self.err(names::KNOCK_KEYS)(e)),
            }
        }
        Ok((added, removed))
    }

    /// Writes the keys v2 knocks' flood tags may be made under (all zeros:
    /// an unused slot).
    pub fn set_tag_keys(&self, keys: &[TagKey; TAG_KEY_SLOTS as usize]) -> Result<(), GateError> {
        let mut map: Array<MapData, TagKey> =
            Array::try_from(self.map(names::KNOCK_TAG_KEYS)?).map_err(self.err(names::KNOCK_TAG_KEYS))?;
        for (slot, key) in (0u32..).zip(keys) {
            map.set(slot, key, 0).map_err(self.err(names::KNOCK_TAG_KEYS))?;
        }
        Ok(())
    }

    /// Gives every CPU's knock budget the bucket `full`.
    pub fn fill_knock_budget(&self, full: KnockBucket) -> Result<(), GateError> {
        let mut map: PerCpuArray<MapData, KnockBucket> =
            PerCpuArray::try_from(self.map(names::KNOCK_BUDGET)?).map_err(self.err(names::KNOCK_BUDGET))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| GateError::Cpus(e))?;
        let values = PerCpuValues::try_from(vec![full; cpus]).map_err(GateError::Cpus)?;
        map.set(0, values, 0).map_err(self.err(names::KNOCK_BUDGET))
    }

    /// Every interface's counters, summed over CPUs: one `Vec` in
    /// [`Reason`] order per slot.
    fn counters(&self) -> Result<Vec<Vec<u64>>, GateError> {
        let map: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(self.map(names::STATS)?).map_err(self.err(names::STATS))?;
        let slots = map.len() / STATS_LEN;
        (0..slots)
            .map(|slot| {
                Reason::ALL
                    .iter()
                    .map(|&r| {
                        let per_cpu = map.get(&counter_index(slot, r), 0).map_err(self.err(names::STATS))?;
                        Ok(per_cpu.iter().sum())
                    })
                    .collect()
            })
            .collect()
    }

    /// The counters, summed over CPUs and interfaces, in [`Reason`] order.
    pub fn stats(&self) -> Result<Counters, GateError> {
        let mut total = vec![0u64; Reason::COUNT];
        for slot in self.counters()? {
            for (t, n) in total.iter_mut().zip(slot) {
                *t += n;
            }
        }
        Ok(Reason::ALL.into_iter().zip(total).collect())
    }

    /// Each named interface's counters, in slot order.
    pub fn stats_by_iface(&self) -> Result<Vec<(String, Counters)>, GateError> {
        let counters = self.counters()?;
        Ok(self
            .iface_slots()?
            .into_iter()
            .filter_map(|(slot, name)| {
                let c = counters.get(slot as usize)?;
                Some((name, Reason::ALL.into_iter().zip(c.iter().copied()).collect()))
            })
            .collect())
    }

    fn ifaces_map(&self) -> Result<Array<MapData, [u8; IFACE_NAME_LEN]>, GateError> {
        Array::try_from(self.map(names::IFACES)?).map_err(self.err(names::IFACES))
    }

    /// The interfaces that hold a counter slot, with their slots.
    pub fn iface_slots(&self) -> Result<Vec<(u32, String)>, GateError> {
        let map = self.ifaces_map()?;
        let mut out = Vec::new();
        for slot in 0..map.len() {
            let raw = map.get(&slot, 0).map_err(self.err(names::IFACES))?;
            let len = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            if len > 0 {
                out.push((slot, String::from_utf8_lossy(&raw[..len]).into_owned()));
            }
        }
        Ok(out)
    }

    /// The counter slot of `iface`: the one it holds, else the first free
    /// one (its counters start from zero).
    pub fn claim_slot(&self, iface: &str) -> Result<u32, GateError> {
        let taken = self.iface_slots()?;
        if let Some((slot, _)) = taken.iter().find(|(_, name)| name == iface) {
            return Ok(*slot);
        }
        let mut map = self.ifaces_map()?;
        let slot = (0..map.len())
            .find(|s| !taken.iter().any(|(t, _)| t == s))
            .ok_or(GateError::NoSlot(MAX_IFACES))?;
        let mut raw = [0u8; IFACE_NAME_LEN];
        let bytes = iface.as_bytes();
        raw[..bytes.len().min(IFACE_NAME_LEN)].copy_from_slice(&bytes[..bytes.len().min(IFACE_NAME_LEN)]);
        map.set(slot, raw, 0).map_err(self.err(names::IFACES))?;
        self.clear_slot_counters(slot)?;
        Ok(slot)
    }

    /// Gives `iface`'s slot back (its interface left the gate).
    pub fn release_slot(&self, iface: &str) -> Result<(), GateError> {
        let mut map = self.ifaces_map()?;
        for (slot, name) in self.iface_slots()? {
            if name == iface {
                map.set(slot, [0u8; IFACE_NAME_LEN], 0)
                    .map_err(self.err(names::IFACES))?;
            }
        }
        Ok(())
    }

    fn clear_slot_counters(&self, slot: u32) -> Result<(), GateError> {
        let mut map: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(self.map(names::STATS)?).map_err(self.err(names::STATS))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| GateError::Cpus(e))?;
        for r in Reason::ALL {
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(GateError::Cpus)?;
            map.set(counter_index(slot, r), zeros, 0)
                .map_err(self.err(names::STATS))?;
        }
        Ok(())
    }
}

/// The PROTECTED bitmap for `spec`.
pub fn protected_words(spec: &PortSet) -> Vec<u64> {
    let mut words = vec![0u64; PROTECTED_WORDS as usize];
    for &(p, range) in &spec.ranges {
        for port in range.lo..=range.hi {
            if let Some((i, mask)) = names::protected_slot(p.number(), port) {
                words[i as usize] |= mask;
            }
        }
    }
    words
}

/// An entry's port ranges as an operator writes them: `22,8000-8100`.
pub fn spans_text(v: &WhitelistValue) -> String {
    v.used_spans()
        .map(|s| PortRange { lo: s.lo, hi: s.hi }.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn tuple_key(t: &Tuple) -> WhitelistKey {
    WhitelistKey::new(
        map_addr(t.addr),
        t.src_port.unwrap_or(names::ANY_PORT),
        t.proto.number(),
    )
}

/// A whitelist entry as it reads on any host: its times relative to when
/// it was read (the map's are this host's monotonic clock), so a cluster
/// node can hand it to a CLI elsewhere. The shape of `whitelist list --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryView {
    /// `None`: a key no CLI could have written.
    pub address: Option<String>,
    /// `None`: any source port.
    pub src_port: Option<u16>,
    pub proto: Option<String>,
    pub ports: Vec<String>,
    pub ttl_ms: u64,
    pub expired: bool,
    /// `None`: no packet has used it yet.
    pub idle_ms: Option<u64>,
    /// Added by an operator, not by a knock.
    pub operator: bool,
    pub owner: u32,
}

impl WhitelistEntry {
    /// The entry as it reads at `now` (CLOCK_MONOTONIC_COARSE ns).
    pub fn view(&self, now: u64) -> EntryView {
        let tuple = key_tuple(&self.key);
        EntryView {
            address: tuple.map(|t| t.addr.to_string()),
            src_port: tuple.and_then(|t| t.src_port),
            proto: tuple.map(|t| t.proto.name().to_string()),
            ports: self
                .value
                .used_spans()
                .map(|s| PortRange { lo: s.lo, hi: s.hi }.to_string())
                .collect(),
            ttl_ms: self.value.expires_ns.saturating_sub(now) / 1_000_000,
            expired: self.value.expires_ns <= now,
            idle_ms: (self.value.last_seen_ns != 0).then(|| now.saturating_sub(self.value.last_seen_ns) / 1_000_000),
            operator: self.value.flags & FLAG_OPERATOR != 0,
            owner: self.value.owner,
        }
    }
}

/// The tuple a key stands for; `None` for a protocol no CLI could have written.
pub fn key_tuple(k: &WhitelistKey) -> Option<Tuple> {
    Some(Tuple {
        addr: crate::spec::unmap_addr(k.addr),
        src_port: (k.src_port != names::ANY_PORT).then_some(k.src_port),
        proto: Proto::from_number(k.proto)?,
    })
}

fn prefix_key(p: &Prefix) -> Key<[u8; 16]> {
    Key::new(p.mapped_len(), p.mapped_network())
}
