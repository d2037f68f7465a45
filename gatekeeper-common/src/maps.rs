//! BPF map names, key and value layouts, and the slot layouts inside the
//! array maps. Every type here crosses the kernel boundary: `#[repr(C)]`,
//! explicit padding, no bool/enum/Option, and a size check at compile time.
//! Addresses are IPv6 or IPv4-mapped IPv6 (`::ffff:a.b.c.d`); ports and times
//! are host byte order; times are CLOCK_MONOTONIC_COARSE nanoseconds, the
//! clock of `bpf_ktime_get_coarse_ns`.

use crate::{parse::Addr, proto};

pub const WHITELIST: &str = "WHITELIST";
pub const ALLOWLIST: &str = "ALLOWLIST";
pub const PROTECTED: &str = "PROTECTED";
pub const CONFIG: &str = "CONFIG";
pub const EVENTS: &str = "EVENTS";
pub const KNOCK_RATE: &str = "KNOCK_RATE";
pub const STATS: &str = "STATS";
/// Knock nonces seen inside the timestamp window. The daemon records them;
/// the XDP program drops a knock whose nonce is here, so a replay never
/// reaches userspace. Pinned with the gate's maps so a restarted daemon
/// keeps its replay protection.
pub const REPLAY: &str = "REPLAY";
/// Key ids of enrolled clients, written by the daemon, each with its own
/// knock bucket: a knock with any other key id dies in the kernel, and a
/// flood with one leaked key id can only exhaust that key's bucket.
pub const KNOCK_KEYS: &str = "KNOCK_KEYS";
/// One knock bucket per CPU, whatever the source: the most knocks per
/// second the daemon is ever handed.
pub const KNOCK_BUDGET: &str = "KNOCK_BUDGET";
/// The keys a v2 knock's flood tag may be made under
/// ([`crate::knock::flood_tag`]): the one every enrolled device derives
/// from the gateway's current knock key and, while a rotation's overlap
/// lasts, the previous one. An all-zero slot is unused. Written by the
/// daemon.
pub const KNOCK_TAG_KEYS: &str = "KNOCK_TAG_KEYS";

/// Which interface each program instance counts under: slot i holds the
/// name of the interface whose instance was loaded with slot i. Written and
/// read by userspace only.
pub const IFACES: &str = "IFACES";

/// Two counters per slot of source addresses ([`PresenceCount`]): how many
/// whitelist entries with a source port, and how many any-port entries,
/// have a source that hashes there ([`presence_slot`]). A stranger's slot
/// is almost always zero, so its packet is refused after one array read
/// instead of two hash lookups, and a client's packet skips the lookup of
/// the kind of entry its source does not have. Counts only ever err high
/// (an entry the kernel's LRU evicted is still counted), which costs a
/// lookup, never a wrong verdict. Userspace changes the counters with
/// atomic operations on the mapped array, so several processes may write
/// the whitelist at once.
pub const PRESENCE: &str = "PRESENCE";

/// Every map the daemon pins, in a fixed order.
pub const ALL: [&str; 13] = [
    WHITELIST,
    ALLOWLIST,
    PROTECTED,
    CONFIG,
    EVENTS,
    KNOCK_RATE,
    STATS,
    REPLAY,
    KNOCK_KEYS,
    KNOCK_BUDGET,
    IFACES,
    PRESENCE,
    KNOCK_TAG_KEYS,
];

pub const WHITELIST_MAX: u32 = 1 << 20;
pub const ALLOWLIST_MAX: u32 = 1 << 14;
pub const KNOCK_RATE_MAX: u32 = 1 << 16;
pub const EVENTS_BYTES: u32 = 1 << 22;
/// A plain hash, not LRU: a nonce still inside the window is never evicted;
/// when full, knocks are refused until the daemon sweeps.
pub const REPLAY_MAX: u32 = 1 << 18;
pub const NONCE_LEN: usize = 24;
pub const KNOCK_KEYS_MAX: u32 = 1 << 16;
/// Slots in KNOCK_TAG_KEYS: the current key and the previous one.
pub const TAG_KEY_SLOTS: u32 = 2;
/// A flood tag key: SipHash's two key words.
pub type TagKey = [u64; 2];
/// Interfaces one gate can span, each with its own counters.
pub const MAX_IFACES: u32 = 32;
/// An interface's name as the kernel limits it (IFNAMSIZ), NUL-padded.
pub const IFACE_NAME_LEN: usize = 16;
pub const KEY_ID_LEN: usize = 16;
/// Slots in PRESENCE: with the default whitelist of 65,536 entries full,
/// about one stranger in eight still shares a slot with someone. (Releases
/// that kept one count per slot had 2^18 slots: the loader tells their map
/// by its size, replaces it and counts the whitelist again.)
pub const PRESENCE_SLOTS: u32 = 1 << 19;
/// `BPF_F_MMAPABLE`: PRESENCE can be mapped into userspace.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// One PRESENCE slot: entries with a source port counted in the low 32
/// bits, any-port entries in the high 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PresenceCount(pub u64);

impl PresenceCount {
    pub const fn new(exact: u32, any_port: u32) -> PresenceCount {
        PresenceCount((any_port as u64) << 32 | exact as u64)
    }

    /// What an entry with `src_port` adds to its source's slot.
    pub const fn unit(src_port: u16) -> u64 {
        if src_port == ANY_PORT { 1 << 32 } else { 1 }
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Some entry with a source port may have this source.
    pub const fn exact(self) -> bool {
        self.0 as u32 != 0
    }

    /// Some any-port entry may have this source.
    pub const fn any_port(self) -> bool {
        self.0 >> 32 != 0
    }
}

/// The PRESENCE slot of a source address: a multiplicative hash over both
/// halves, cheap enough to run on every packet. It is not keyed: someone
/// who knows a whitelisted address can pick sources that share its slot,
/// and their packets then cost the two lookups every packet cost before.
#[inline(always)]
pub fn presence_slot(addr: Addr) -> u32 {
    let [hi, lo] = addr.words();
    let h = (hi.rotate_left(29) ^ lo).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> (64 - PRESENCE_SLOTS.trailing_zeros())) as u32
}

/// `src_port` value of an entry that matches any source port.
pub const ANY_PORT: u16 = 0;

/// (source address, source port or [`ANY_PORT`], protocol). ICMP and
/// ICMPv6 echo both use [`proto::ICMP`]. Aligned to 4 so the XDP program
/// copies the address with word moves: for byte arrays LLVM's BPF backend
/// calls a byte-at-a-time memcpy, which dominated the per-packet cost.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WhitelistKey {
    pub addr: [u8; 16],
    pub src_port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl WhitelistKey {
    pub const fn new(addr: [u8; 16], src_port: u16, proto: u8) -> Self {
        Self {
            addr,
            src_port,
            proto,
            _pad: 0,
        }
    }
}

/// Set on entries an operator added by hand, so audits can tell them apart
/// from knock-made ones.
pub const FLAG_OPERATOR: u32 = 1;

/// An inclusive destination-port range; `hi == 0` marks an unused slot
/// (echo entries use 0..=65535).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortSpan {
    pub lo: u16,
    pub hi: u16,
}

/// Port ranges one tuple's entry holds: a client that knocks for ssh and
/// then for a web port keeps both open, not only the last.
pub const SPANS: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WhitelistValue {
    pub expires_ns: u64,
    /// Last packet that matched; 0 until the first one.
    pub last_seen_ns: u64,
    pub spans: [PortSpan; SPANS],
    pub flags: u32,
    /// Who the entry belongs to (a client id once knocks create entries).
    pub owner: u32,
}

impl WhitelistValue {
    /// An entry open to `lo..=hi` until `expires_ns`.
    pub const fn new(expires_ns: u64, lo: u16, hi: u16, flags: u32, owner: u32) -> Self {
        let mut spans = [PortSpan { lo: 0, hi: 0 }; SPANS];
        spans[0] = PortSpan { lo, hi };
        WhitelistValue {
            expires_ns,
            last_seen_ns: 0,
            spans,
            flags,
            owner,
        }
    }

    /// Whether one of the entry's ranges holds `port`.
    #[inline(always)]
    pub fn admits_port(&self, port: u16) -> bool {
        let mut i = 0;
        while i < SPANS {
            let s = self.spans[i];
            if s.hi != 0 && s.lo <= port && port <= s.hi {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Adds `lo..=hi` unless already held; when every slot is taken, the
    /// oldest range gives way.
    pub fn add_span(&mut self, lo: u16, hi: u16) {
        let span = PortSpan { lo, hi };
        if self.spans.contains(&span) {
            return;
        }
        match self.spans.iter().position(|s| s.hi == 0) {
            Some(free) => self.spans[free] = span,
            None => {
                self.spans.rotate_left(1);
                self.spans[SPANS - 1] = span;
            }
        }
    }

    /// The ranges in use.
    pub fn used_spans(&self) -> impl Iterator<Item = PortSpan> + '_ {
        self.spans.iter().copied().filter(|s| s.hi != 0)
    }
}

/// Value of the ALLOWLIST LPM trie, keyed by a prefix of the 16-byte address
/// (an IPv4 /24 is a /120 over the mapped address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowValue {
    pub expires_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KnockBucket {
    /// Nano-tokens: one knock costs 10^9.
    pub tokens: u64,
    pub last_ns: u64,
}

pub const MODE_ENFORCE: u32 = 0;
pub const MODE_AUDIT: u32 = 1;

/// `Config::flags`: ICMP and ICMPv6 echo requests are gated.
pub const CFG_PROTECT_ECHO: u32 = 1;
/// `Config::flags`: at least one TCP port is gated, so TCP fragments are too.
pub const CFG_ANY_TCP: u32 = 2;
/// `Config::flags`: at least one UDP port is gated, so UDP fragments are too.
pub const CFG_ANY_UDP: u32 = 4;
/// `Config::flags`: the daemon keeps KNOCK_KEYS, so a knock whose key id
/// is not there is dropped in the kernel. Off while no daemon verifies
/// knocks (then every knock is handed over, for the log).
pub const CFG_KNOCK_KEYS: u32 = 16;
/// `Config::flags`: the daemon reads fwknop's packets, so base64 text on the
/// knock port is handed over (rate-limited) instead of dropped.
pub const CFG_FWKNOP: u32 = 32;
/// `Config::flags`: the allowlist has prefixes. Kept in step with the map by
/// the userspace that writes it, so strangers skip the trie lookup when the
/// allowlist is empty.
pub const CFG_ALLOWLIST: u32 = 8;

/// The single entry of the CONFIG array. An all-zero config (a program whose
/// daemon has not configured it yet) gates nothing; the daemon writes it
/// before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    pub mode: u32,
    pub flags: u32,
    /// An expired entry keeps passing established traffic until it has been
    /// idle this long.
    pub idle_timeout_ns: u64,
    pub knock_rate_per_sec: u32,
    pub knock_burst: u32,
    /// The host's ephemeral port range: replies to connections the gateway
    /// opened arrive here.
    pub ephemeral_lo: u16,
    pub ephemeral_hi: u16,
    /// UDP port that accepts knocks even when it is not otherwise protected
    /// (0: none).
    pub knock_udp_port: u16,
    pub _pad: u16,
    /// Report one in this many audit-mode would-drop packets (0: none).
    pub audit_sample_every: u32,
    /// Each enrolled key's knock bucket.
    pub knock_key_rate_per_sec: u32,
    pub knock_key_burst: u32,
    /// Each CPU's knock bucket, for all sources together.
    pub knock_budget_per_sec: u32,
    pub knock_budget_burst: u32,
    pub _pad2: u32,
}

/// PROTECTED is an array of u64 words: a bitmap of TCP ports, then one of
/// UDP ports.
pub const PROTECTED_WORDS_PER_PROTO: u32 = 65536 / 64;
pub const PROTECTED_WORDS: u32 = 2 * PROTECTED_WORDS_PER_PROTO;

/// Word index and bit mask of `port` in the PROTECTED bitmap, or `None` for
/// protocols without ports.
#[inline(always)]
pub const fn protected_slot(l4: u8, port: u16) -> Option<(u32, u64)> {
    let base = match l4 {
        proto::TCP => 0,
        proto::UDP => PROTECTED_WORDS_PER_PROTO,
        _ => return None,
    };
    Some((base + (port as u32 >> 6), 1u64 << (port & 63)))
}

/// Ring-buffer event kinds.
pub const EVENT_KNOCK: u32 = 1;
pub const EVENT_AUDIT_SAMPLE: u32 = 2;

/// One record in the EVENTS ring buffer: a diverted knock (with its payload)
/// or a sampled audit-mode would-drop packet (payload empty).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Event {
    pub kind: u32,
    pub ifindex: u32,
    /// When the program saw the packet, CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// Why the packet would have been dropped (a `decide::Reason` as a
    /// number), for audit samples.
    pub reason: u8,
    pub _pad: u8,
    pub payload_len: u32,
    pub _pad2: u32,
    pub payload: [u8; crate::knock::MAX_LEN],
}

const _: () = {
    assert!(core::mem::size_of::<WhitelistKey>() == 20);
    assert!(core::mem::size_of::<WhitelistValue>() == 40);
    assert!(core::mem::size_of::<AllowValue>() == 8);
    assert!(core::mem::size_of::<KnockBucket>() == 16);
    assert!(core::mem::size_of::<Config>() == 56);
    assert!(core::mem::size_of::<Event>() == 64 + crate::knock::MAX_LEN);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_holds_up_to_four_ranges_and_the_oldest_gives_way() {
        let mut v = WhitelistValue::new(1, 22, 22, 0, 0);
        v.add_span(8000, 8100);
        v.add_span(22, 22);
        assert!(v.admits_port(22) && v.admits_port(8050) && !v.admits_port(23));
        assert_eq!(v.used_spans().count(), 2, "a range already held is not added twice");
        for p in [1000, 2000, 3000] {
            v.add_span(p, p);
        }
        assert!(!v.admits_port(22), "the oldest range gave way to the fifth");
        assert!(v.admits_port(8050) && v.admits_port(3000));
        let echo = WhitelistValue::new(1, 0, u16::MAX, 0, 0);
        assert!(echo.admits_port(0), "echo entries cover port 0");
    }
}
