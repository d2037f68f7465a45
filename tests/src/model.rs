//! The reference model: the shared decision function over plain
//! collections. Tests install the same contents into the real maps and
//! check that the real XDP program agrees with the model frame by frame.

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeSet, HashMap, HashSet},
};

use anyhow::Result;
use gatekeeper::{
    gate::{Gate, protected_words},
    spec::{PortSet, Prefix, map_addr},
};
use gatekeeper_common::{
    decide::{Decision, Tables, decide},
    maps::{
        ANY_PORT, AllowValue, CFG_ALLOWLIST, Config, KEY_ID_LEN, KnockBucket, NONCE_LEN, PresenceCount, TAG_KEY_SLOTS,
        TagKey, WhitelistKey, WhitelistValue,
    },
    parse::{Addr, Packet, parse, parse_ip},
    ratelimit,
};

pub struct Model {
    pub config: Config,
    pub protect: PortSet,
    protected: Vec<u64>,
    pub whitelist: RefCell<HashMap<WhitelistKey, WhitelistValue>>,
    allowlist: Vec<(Prefix, AllowValue)>,
    buckets: RefCell<HashMap<[u8; 16], KnockBucket>>,
    /// Enrolled key ids and their buckets (KNOCK_KEYS).
    pub knock_keys: RefCell<HashMap<[u8; KEY_ID_LEN], KnockBucket>>,
    /// Nonces in the replay cache.
    pub replay: HashSet<[u8; NONCE_LEN]>,
    /// The knock budget of the one CPU the tests run on.
    pub budget: Cell<KnockBucket>,
    /// KNOCK_TAG_KEYS: the keys v2 knocks' flood tags may be made under.
    pub tag_keys: [TagKey; TAG_KEY_SLOTS as usize],
    now: Cell<u64>,
}

impl Model {
    /// A model of `config`; enrolled keys start with full buckets
    /// ([`Model::enroll`]), as the daemon gives them.
    pub fn new(config: Config, protect: PortSet) -> Model {
        Model {
            config,
            protected: protected_words(&protect),
            protect,
            whitelist: RefCell::new(HashMap::new()),
            allowlist: Vec::new(),
            buckets: RefCell::new(HashMap::new()),
            knock_keys: RefCell::new(HashMap::new()),
            replay: HashSet::new(),
            budget: Cell::new(ratelimit::full(config.knock_budget_burst, 0)),
            tag_keys: [[0, 0]; TAG_KEY_SLOTS as usize],
            now: Cell::new(0),
        }
    }

    /// Enrolls `key_id` with a full bucket.
    pub fn enroll(&self, key_id: [u8; KEY_ID_LEN]) {
        self.knock_keys
            .borrow_mut()
            .insert(key_id, ratelimit::full(self.config.knock_key_burst, 0));
    }

    /// Adds an allowlist prefix; like userspace, raises the CONFIG flag
    /// that makes the program look the allowlist up.
    pub fn allow(&mut self, prefix: Prefix, value: AllowValue) {
        self.allowlist.push((prefix, value));
        self.config.flags |= CFG_ALLOWLIST;
    }

    /// Writes the model's contents into a real gate's maps.
    pub fn install(&self, gate: &Gate) -> Result<()> {
        gate.set_config(&self.config)?;
        gate.set_protected(&self.protect)?;
        for (k, v) in self.whitelist.borrow().iter() {
            gate.whitelist_insert(k, v)?;
        }
        for (p, v) in &self.allowlist {
            gate.allow_insert(p, v)?;
        }
        let keys: BTreeSet<[u8; KEY_ID_LEN]> = self.knock_keys.borrow().keys().copied().collect();
        gate.sync_knock_keys(&keys, ratelimit::full(self.config.knock_key_burst, 0))?;
        gate.fill_knock_budget(self.budget.get())?;
        gate.set_tag_keys(&self.tag_keys)?;
        for nonce in &self.replay {
            gate.replay_record(nonce, u64::MAX)?;
        }
        Ok(())
    }

    /// What the XDP program must do with `frame` at `now`, applying the same
    /// side effects (last-seen refresh, knock buckets) to the model.
    pub fn decide(&self, frame: &[u8], now: u64) -> Decision {
        self.decide_parsed(frame, parse(frame), now)
    }

    /// Like [`Model::decide`], for a bare IP packet (the instance on a
    /// tunnel device).
    pub fn decide_ip(&self, packet: &[u8], now: u64) -> Decision {
        self.decide_parsed(packet, parse_ip(packet), now)
    }

    fn decide_parsed(&self, frame: &[u8], pkt: Packet, now: u64) -> Decision {
        self.now.set(now);
        let d = decide(frame, &pkt, self);
        if let Some(key) = d.touch.key(frame, &pkt)
            && let Some(v) = self.whitelist.borrow_mut().get_mut(&key)
        {
            v.last_seen_ns = now;
        }
        d
    }
}

/// Whether `addr` falls inside `p`.
fn contains(p: &Prefix, addr: &[u8; 16]) -> bool {
    let net = p.mapped_network();
    let bits = p.mapped_len() as usize;
    (0..bits).all(|i| {
        let mask = 0x80u8 >> (i % 8);
        addr[i / 8] & mask == net[i / 8] & mask
    })
}

impl Tables for Model {
    fn config(&self) -> &Config {
        &self.config
    }

    fn protected_word(&self, index: u32) -> u64 {
        self.protected.get(index as usize).copied().unwrap_or(0)
    }

    fn whitelist(&self, key: &WhitelistKey) -> Option<WhitelistValue> {
        self.whitelist.borrow().get(key).copied()
    }

    fn presence(&self, addr: Addr) -> PresenceCount {
        let whitelist = self.whitelist.borrow();
        let of = |any_port: bool| {
            let kind = whitelist
                .keys()
                .filter(|k| k.addr == addr.bytes() && (k.src_port == ANY_PORT) == any_port);
            kind.count() as u32
        };
        PresenceCount::new(of(false), of(true))
    }

    fn allowlist(&self, addr: Addr) -> Option<AllowValue> {
        self.allowlist
            .iter()
            .filter(|(p, _)| contains(p, &addr.bytes()))
            .max_by_key(|(p, _)| p.mapped_len())
            .map(|(_, v)| *v)
    }

    fn admit_knock(&self, src: Addr, cfg: &Config) -> bool {
        let src = src.bytes();
        let mut buckets = self.buckets.borrow_mut();
        let (b, ok) = ratelimit::take(
            buckets.get(&src).copied(),
            self.now.get(),
            cfg.knock_rate_per_sec,
            cfg.knock_burst,
        );
        buckets.insert(src, b);
        ok
    }

    fn known_key(&self, key_id: &[u8; KEY_ID_LEN]) -> bool {
        self.knock_keys.borrow().contains_key(key_id)
    }

    fn admit_key(&self, key_id: &[u8; KEY_ID_LEN], cfg: &Config) -> bool {
        let mut keys = self.knock_keys.borrow_mut();
        let Some(bucket) = keys.get_mut(key_id) else {
            return false;
        };
        let (b, ok) = ratelimit::take(
            Some(*bucket),
            self.now.get(),
            cfg.knock_key_rate_per_sec,
            cfg.knock_key_burst,
        );
        *bucket = b;
        ok
    }

    fn replayed(&self, nonce: &[u8; NONCE_LEN]) -> bool {
        self.replay.contains(nonce)
    }

    fn admit_budget(&self, cfg: &Config) -> bool {
        let (b, ok) = ratelimit::take(
            Some(self.budget.get()),
            self.now.get(),
            cfg.knock_budget_per_sec,
            cfg.knock_budget_burst,
        );
        self.budget.set(b);
        ok
    }

    fn tag_key(&self, slot: u32) -> TagKey {
        self.tag_keys.get(slot as usize).copied().unwrap_or([0, 0])
    }

    fn now(&self) -> u64 {
        self.now.get()
    }
}

/// The 16-byte form of an address literal, for building keys in tests.
pub fn addr(s: &str) -> [u8; 16] {
    map_addr(s.parse().expect("test address literal"))
}
