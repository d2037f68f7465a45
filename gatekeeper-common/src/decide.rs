//! The packet decision: what happens to a parsed frame, given the maps.
//!
//! This is the one definition of the gate's rules. The XDP program calls
//! [`decide`] with [`Tables`] backed by BPF maps; userspace tests call it
//! with tables backed by ordinary collections and use it as the reference
//! the real program must agree with.

use crate::{
    knock,
    maps::{
        ANY_PORT, AllowValue, CFG_ALLOWLIST, CFG_ANY_TCP, CFG_ANY_UDP, CFG_FWKNOP, CFG_KNOCK_KEYS, CFG_PROTECT_ECHO,
        Config, KEY_ID_LEN, MODE_AUDIT, NONCE_LEN, PresenceCount, TAG_KEY_SLOTS, TagKey, WhitelistKey, WhitelistValue,
        protected_slot,
    },
    parse::{Addr, Frame, Kind, Packet, TCP_ACK, TCP_SYN},
    proto,
};

/// Why a packet got its verdict. Doubles as the index of its counter in the
/// STATS map, so the order is part of the map layout.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    NotIp = 0,
    IcmpControl,
    OtherProtocol,
    Unprotected,
    Reply,
    Whitelisted,
    Allowlisted,
    /// Audit mode: would have been dropped, passed instead.
    AuditWouldDrop,
    NotAllowed,
    Malformed,
    FragmentUnmatched,
    KnockDiverted,
    KnockRateLimited,
    KnockBadLength,
    /// The ring buffer had no room; set by the XDP program, not by [`decide`].
    KnockRingFull,
    /// The key id names no enrolled client, or a v2 knock's flood tag is
    /// not one an enrolled device made.
    KnockUnknownKey,
    /// The nonce is in the replay cache: a knock seen before.
    KnockReplayed,
    /// The key's own bucket is empty: someone floods with this key id.
    KnockKeyRateLimited,
    /// This CPU's budget for knocks is spent.
    KnockOverBudget,
}

/// Counters per interface: one per [`Reason`]. The STATS per-CPU array
/// holds a block of them for each interface slot.
pub const STATS_LEN: u32 = Reason::COUNT as u32;

/// Where `reason`'s counter for the interface in `slot` sits in STATS.
#[inline(always)]
pub const fn counter_index(slot: u32, reason: Reason) -> u32 {
    slot * STATS_LEN + reason as u32
}

impl Reason {
    pub const COUNT: usize = 19;
    pub const ALL: [Reason; Self::COUNT] = [
        Reason::NotIp,
        Reason::IcmpControl,
        Reason::OtherProtocol,
        Reason::Unprotected,
        Reason::Reply,
        Reason::Whitelisted,
        Reason::Allowlisted,
        Reason::AuditWouldDrop,
        Reason::NotAllowed,
        Reason::Malformed,
        Reason::FragmentUnmatched,
        Reason::KnockDiverted,
        Reason::KnockRateLimited,
        Reason::KnockBadLength,
        Reason::KnockRingFull,
        Reason::KnockUnknownKey,
        Reason::KnockReplayed,
        Reason::KnockKeyRateLimited,
        Reason::KnockOverBudget,
    ];

    /// Stable snake_case name, used by `gatekeeper stats` and in logs.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotIp => "pass_not_ip",
            Reason::IcmpControl => "pass_icmp_control",
            Reason::OtherProtocol => "pass_other_protocol",
            Reason::Unprotected => "pass_unprotected",
            Reason::Reply => "pass_reply",
            Reason::Whitelisted => "pass_whitelisted",
            Reason::Allowlisted => "pass_allowlisted",
            Reason::AuditWouldDrop => "audit_would_drop",
            Reason::NotAllowed => "drop_not_allowed",
            Reason::Malformed => "drop_malformed",
            Reason::FragmentUnmatched => "drop_fragment_unmatched",
            Reason::KnockDiverted => "knock_diverted",
            Reason::KnockRateLimited => "knock_rate_limited",
            Reason::KnockBadLength => "knock_bad_length",
            Reason::KnockRingFull => "knock_ring_full",
            Reason::KnockUnknownKey => "knock_unknown_key",
            Reason::KnockReplayed => "knock_replayed",
            Reason::KnockKeyRateLimited => "knock_key_rate_limited",
            Reason::KnockOverBudget => "knock_over_budget",
        }
    }

    pub fn from_u8(v: u8) -> Option<Reason> {
        Self::ALL.get(v as usize).copied()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    /// Copy to the daemon through the ring buffer, then drop.
    Divert,
}

/// Which whitelist entry's `last_seen` to refresh after a pass. The key
/// itself follows from the packet ([`Touch::key`]), so the decision stays
/// small and needs no zeroed key when nothing matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    None,
    /// The exact (source, source port, protocol) entry.
    Exact,
    /// The (source, any port, protocol) entry.
    AnyPort,
}

impl Touch {
    /// The key of the entry to refresh for `pkt`, read from `frame`.
    pub fn key<F: Frame + ?Sized>(self, frame: &F, pkt: &Packet) -> Option<WhitelistKey> {
        let sport = match self {
            Touch::None => return None,
            Touch::Exact => pkt.sport,
            Touch::AnyPort => ANY_PORT,
        };
        Some(WhitelistKey::new(pkt.src(frame).bytes(), sport, key_proto(pkt)))
    }
}

/// The protocol whitelist keys use for `pkt`: echo in either IP version is
/// [`proto::ICMP`].
#[inline(always)]
pub fn key_proto(pkt: &Packet) -> u8 {
    if pkt.proto == proto::ICMPV6 {
        proto::ICMP
    } else {
        pkt.proto
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// Why. In audit mode a would-drop packet has `action == Pass` and keeps
    /// the reason it would have been dropped for.
    pub reason: Reason,
    pub touch: Touch,
}

impl Decision {
    const fn new(action: Action, reason: Reason) -> Self {
        Decision {
            action,
            reason,
            touch: Touch::None,
        }
    }

    /// The STATS counter this decision increments.
    pub fn counter(&self) -> Reason {
        match (self.action, self.reason) {
            (Action::Pass, r) if r.is_denial() => Reason::AuditWouldDrop,
            (_, r) => r,
        }
    }
}

impl Reason {
    /// Reasons that drop in enforce mode.
    pub const fn is_denial(self) -> bool {
        matches!(
            self,
            Reason::NotAllowed
                | Reason::Malformed
                | Reason::FragmentUnmatched
                | Reason::KnockRateLimited
                | Reason::KnockBadLength
                | Reason::KnockUnknownKey
                | Reason::KnockReplayed
                | Reason::KnockKeyRateLimited
                | Reason::KnockOverBudget
        )
    }
}

/// The map lookups the decision needs. The XDP program implements this over
/// BPF maps; tests implement it over collections.
pub trait Tables {
    /// The CONFIG entry.
    fn config(&self) -> &Config;
    /// One 64-bit word of the PROTECTED bitmap.
    fn protected_word(&self, index: u32) -> u64;
    fn whitelist(&self, key: &WhitelistKey) -> Option<WhitelistValue>;
    /// Which kinds of whitelist entry may have source `addr`: a kind
    /// counted zero has none, so its lookup can be skipped. May err high.
    fn presence(&self, addr: Addr) -> PresenceCount;
    /// Longest-prefix match of `addr` in the operator allowlist.
    fn allowlist(&self, addr: Addr) -> Option<AllowValue>;
    /// Takes a token from `src`'s knock bucket (see [`crate::ratelimit`]).
    fn admit_knock(&self, src: Addr, cfg: &Config) -> bool;
    /// Whether `key_id` belongs to an enrolled client (KNOCK_KEYS).
    fn known_key(&self, key_id: &[u8; KEY_ID_LEN]) -> bool;
    /// Takes a token from the bucket of the enrolled key `key_id`.
    fn admit_key(&self, key_id: &[u8; KEY_ID_LEN], cfg: &Config) -> bool;
    /// Whether `nonce` is in the replay cache.
    fn replayed(&self, nonce: &[u8; NONCE_LEN]) -> bool;
    /// Takes a token from this CPU's knock budget.
    fn admit_budget(&self, cfg: &Config) -> bool;
    /// Flood tag key `slot` (KNOCK_TAG_KEYS); all zeros when unused.
    fn tag_key(&self, slot: u32) -> TagKey;
    /// The current CLOCK_MONOTONIC_COARSE time in ns. Asked for only when an entry
    /// was found, so dropping a stranger never reads the clock.
    fn now(&self) -> u64;
}

/// Refresh `last_seen` at most this often per entry, so busy flows do not
/// write the shared map on every packet.
pub const TOUCH_GRANULARITY_NS: u64 = 100_000_000;

/// Whether a whitelist entry still exists for the sweeper: it is inside its
/// TTL, or traffic matched it less than `idle_ns` ago.
#[inline(always)]
pub fn entry_is_live(v: &WhitelistValue, now: u64, idle_ns: u64) -> bool {
    now < v.expires_ns || (v.last_seen_ns != 0 && now.saturating_sub(v.last_seen_ns) < idle_ns)
}

/// Whether `v` passes a packet to `dport`. Inside its TTL an entry passes
/// everything in its port range; after it, only an active flow that keeps
/// it from going idle, and no new TCP connection.
#[inline(always)]
fn entry_admits(v: &WhitelistValue, dport: u16, now: u64, idle_ns: u64, new_tcp: bool) -> bool {
    if !v.admits_port(dport) {
        return false;
    }
    now < v.expires_ns || (!new_tcp && entry_is_live(v, now, idle_ns))
}

#[inline(always)]
fn pass(reason: Reason) -> Decision {
    Decision::new(Action::Pass, reason)
}

/// Drop, or in audit mode pass while keeping the reason.
#[inline(always)]
fn deny(cfg: &Config, reason: Reason) -> Decision {
    let action = if cfg.mode == MODE_AUDIT {
        Action::Pass
    } else {
        Action::Drop
    };
    Decision::new(action, reason)
}

/// Decides one frame, parsed into `pkt`. The frame itself is read again
/// for the source address, once the packet is known to need it, and for a
/// knock's key id and nonce.
#[inline(always)]
pub fn decide<F: Frame + ?Sized, T: Tables>(frame: &F, pkt: &Packet, t: &T) -> Decision {
    match pkt.kind {
        Kind::NotIp => return pass(Reason::NotIp),
        Kind::IcmpControl => return pass(Reason::IcmpControl),
        Kind::Other => return pass(Reason::OtherProtocol),
        Kind::Malformed | Kind::Fragment | Kind::Tcp | Kind::Udp | Kind::Echo | Kind::EchoReply => {}
    }
    // Read only here: what passes above needs no configuration, and ARP
    // is much of a LAN's traffic.
    let cfg = t.config();
    match pkt.kind {
        Kind::Malformed => return deny(cfg, Reason::Malformed),
        Kind::Fragment => return fragment(frame, pkt, cfg, t),
        _ => {}
    }
    // Echo has neither port: its entries are any-port entries.
    let (key_proto, sport, dport) = (key_proto(pkt), pkt.sport, pkt.dport);
    let knock_port = cfg.knock_udp_port != 0 && dport == cfg.knock_udp_port;
    let udp_knock_port = key_proto == proto::UDP && knock_port;
    let new_tcp = key_proto == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // fwknop's raw carriers: a SYN with its packet to the knock port
    // (`-P tcpraw`), echo requests or replies (`-P icmp`). Only what looks
    // like its packet is taken; the rest goes on as any other packet.
    // (`-P tcp` writes into a connection, which the daemon reads.)
    if cfg.flags & CFG_FWKNOP != 0
        && ((new_tcp && knock_port) || key_proto == proto::ICMP)
        && fwknop_shape(frame, pkt).is_none()
    {
        return fwknop(frame, pkt, cfg, t);
    }
    if pkt.kind == Kind::EchoReply {
        return pass(Reason::IcmpControl);
    }
    if !udp_knock_port && !is_protected(cfg, t, key_proto, dport) {
        return pass(Reason::Unprotected);
    }
    // Knocks ride in UDP, in a TCP SYN (never in an established stream) and
    // in echo requests.
    if pkt.knock_prefix && (key_proto != proto::TCP || new_tcp) {
        return knock(frame, pkt, cfg, t);
    }
    if pkt.knock_v2 && (key_proto != proto::TCP || new_tcp) {
        return knock_v2(frame, pkt, cfg, t);
    }
    if udp_knock_port && cfg.flags & CFG_FWKNOP != 0 {
        return match fwknop_shape(frame, pkt) {
            Some(reason) => deny(cfg, reason),
            None => fwknop(frame, pkt, cfg, t),
        };
    }
    if is_reply(cfg, key_proto, new_tcp, dport) {
        return pass(Reason::Reply);
    }
    let src = pkt.src(frame);
    // A stranger's source has no entry at all: one cheap check instead of
    // two lookups, which also skips the lookup of a kind of entry the
    // source does not have.
    let seen = t.presence(src);
    if !seen.is_empty() {
        let idle = cfg.idle_timeout_ns;
        // Exact tuple first, then the any-port entry. Echo has no source
        // port, so for it the two keys are the same.
        if sport != ANY_PORT && seen.exact() {
            let exact = WhitelistKey::new(src.bytes(), sport, key_proto);
            if let Some(d) = whitelisted(t, &exact, Touch::Exact, dport, idle, new_tcp) {
                return d;
            }
        }
        if seen.any_port() {
            let any = WhitelistKey::new(src.bytes(), ANY_PORT, key_proto);
            if let Some(d) = whitelisted(t, &any, Touch::AnyPort, dport, idle, new_tcp) {
                return d;
            }
        }
    }
    if allowlisted(t, cfg, src) {
        return pass(Reason::Allowlisted);
    }
    deny(cfg, Reason::NotAllowed)
}

/// A knock, from cheapest refusal to dearest: its length; whether its key
/// id is enrolled and its nonce unseen (one lookup each, so a flood of
/// garbage or of replays dies here without touching any bucket); its
/// source's bucket; its key's bucket; this CPU's budget. Only then is it
/// worth the daemon's time.
#[inline(always)]
fn knock<F: Frame + ?Sized, T: Tables>(frame: &F, pkt: &Packet, cfg: &Config, t: &T) -> Decision {
    if !knock::plausible_len(pkt.payload_len as usize) {
        return deny(cfg, Reason::KnockBadLength);
    }
    let off = pkt.payload_off as usize;
    // Opaque to the optimiser: folded into the bounds check, `- NONCE_LEN`
    // would leave a read before the checked pointer, which the BPF
    // verifier refuses.
    let nonce_off = core::hint::black_box(off + pkt.payload_len as usize - NONCE_LEN);
    let (Some(key_id), Some(nonce)) = (
        frame.load::<KEY_ID_LEN>(off + knock::PREFIX.len()),
        frame.load::<NONCE_LEN>(nonce_off),
    ) else {
        return deny(cfg, Reason::Malformed);
    };
    let keys = cfg.flags & CFG_KNOCK_KEYS != 0;
    if keys && !t.known_key(&key_id) {
        return deny(cfg, Reason::KnockUnknownKey);
    }
    admit(frame, pkt, cfg, t, &nonce, keys.then_some(&key_id))
}

/// What every knock meets once its key id (or its flood tag) passed: the
/// replay cache, the source's bucket, the key's own bucket (v1's: v2
/// names no key), this CPU's budget.
#[inline(always)]
fn admit<F: Frame + ?Sized, T: Tables>(
    frame: &F,
    pkt: &Packet,
    cfg: &Config,
    t: &T,
    nonce: &[u8; NONCE_LEN],
    key_id: Option<&[u8; KEY_ID_LEN]>,
) -> Decision {
    if t.replayed(nonce) {
        return deny(cfg, Reason::KnockReplayed);
    }
    if !t.admit_knock(pkt.src(frame), cfg) {
        return deny(cfg, Reason::KnockRateLimited);
    }
    if let Some(key_id) = key_id
        && !t.admit_key(key_id, cfg)
    {
        return deny(cfg, Reason::KnockKeyRateLimited);
    }
    if !t.admit_budget(cfg) {
        return deny(cfg, Reason::KnockOverBudget);
    }
    Decision::new(Action::Divert, Reason::KnockDiverted)
}

/// A v2 knock carries no key id: its flood tag, which only a device that
/// holds the gateway's public knock key can make, stands in for the key
/// id check (so garbage dies here, whatever source it spoofs); then the
/// replay cache, the source's bucket and this CPU's budget.
#[inline(always)]
fn knock_v2<F: Frame + ?Sized, T: Tables>(frame: &F, pkt: &Packet, cfg: &Config, t: &T) -> Decision {
    if !knock::plausible_v2_len(pkt.payload_len as usize) {
        return deny(cfg, Reason::KnockBadLength);
    }
    let off = pkt.payload_off as usize;
    // Opaque to the optimiser, as in `knock`.
    let nonce_off = core::hint::black_box(off + pkt.payload_len as usize - NONCE_LEN);
    let Some((words, tag)) = tag_input(frame, off + knock::V2_EPHEMERAL_AT, nonce_off) else {
        return deny(cfg, Reason::Malformed);
    };
    let Some(nonce) = frame.load::<NONCE_LEN>(nonce_off) else {
        return deny(cfg, Reason::Malformed);
    };
    let mut made = false;
    for slot in 0..TAG_KEY_SLOTS {
        let key = t.tag_key(slot);
        made |= key != [0, 0] && knock::flood_tag(key, &words) == tag;
    }
    if !made {
        return deny(cfg, Reason::KnockUnknownKey);
    }
    admit(frame, pkt, cfg, t, &nonce, None)
}

/// What a v2 knock's flood tag is computed over (the ephemeral key at
/// `ephemeral_at`, then the nonce at `nonce_at`, as seven little-endian
/// words) and the tag itself, right after the ephemeral key. Read a word
/// at a time: byte arrays cost the BPF backend a load and a shift per byte.
/// Each offset is opaque to the optimiser, which would otherwise check the
/// first word's bounds and read the next ones past them.
#[inline(always)]
fn tag_input<F: Frame + ?Sized>(frame: &F, ephemeral_at: usize, nonce_at: usize) -> Option<([u64; 7], u64)> {
    let word = |at: usize| frame.load::<8>(core::hint::black_box(at)).map(u64::from_le_bytes);
    let words = [
        word(ephemeral_at)?,
        word(ephemeral_at + 8)?,
        word(ephemeral_at + 16)?,
        word(ephemeral_at + 24)?,
        word(nonce_at)?,
        word(nonce_at + 8)?,
        word(nonce_at + 16)?,
    ];
    Some((words, word(ephemeral_at + 32)?))
}

/// Why a payload cannot be an fwknop packet, or `None` when it may be
/// one: base64 text with no key id and no nonce in the clear, so only its
/// length and first two characters are checked here.
#[inline(always)]
fn fwknop_shape<F: Frame + ?Sized>(frame: &F, pkt: &Packet) -> Option<Reason> {
    if !knock::plausible_fwknop_len(pkt.payload_len as usize) {
        return Some(Reason::KnockBadLength);
    }
    match frame.load::<2>(pkt.payload_off as usize) {
        Some([a, b]) if knock::base64_char(a) && knock::base64_char(b) => None,
        _ => Some(Reason::Malformed),
    }
}

/// A payload shaped like an fwknop packet: the source's bucket and this
/// CPU's budget decide whether it reaches the daemon, which finds the key
/// by HMAC.
#[inline(always)]
fn fwknop<F: Frame + ?Sized, T: Tables>(frame: &F, pkt: &Packet, cfg: &Config, t: &T) -> Decision {
    if !t.admit_knock(pkt.src(frame), cfg) {
        return deny(cfg, Reason::KnockRateLimited);
    }
    if !t.admit_budget(cfg) {
        return deny(cfg, Reason::KnockOverBudget);
    }
    Decision::new(Action::Divert, Reason::KnockDiverted)
}

#[inline(always)]
fn whitelisted<T: Tables>(
    t: &T,
    key: &WhitelistKey,
    which: Touch,
    dport: u16,
    idle: u64,
    new_tcp: bool,
) -> Option<Decision> {
    let v = t.whitelist(key)?;
    let now = t.now();
    if !entry_admits(&v, dport, now, idle, new_tcp) {
        return None;
    }
    let touch = if now.saturating_sub(v.last_seen_ns) >= TOUCH_GRANULARITY_NS {
        which
    } else {
        Touch::None
    };
    Some(Decision {
        action: Action::Pass,
        reason: Reason::Whitelisted,
        touch,
    })
}

#[inline(always)]
fn is_protected<T: Tables>(cfg: &Config, t: &T, key_proto: u8, dport: u16) -> bool {
    if key_proto == proto::ICMP {
        return cfg.flags & CFG_PROTECT_ECHO != 0;
    }
    match protected_slot(key_proto, dport) {
        Some((index, mask)) => t.protected_word(index) & mask != 0,
        None => false,
    }
}

/// Replies to connections the gateway itself opened arrive on its ephemeral
/// ports: UDP there, and TCP segments that do not open a connection, pass.
/// A bare SYN to an ephemeral port is never a reply, so scans still see
/// nothing there.
#[inline(always)]
fn is_reply(cfg: &Config, key_proto: u8, new_tcp: bool, dport: u16) -> bool {
    let ephemeral = cfg.ephemeral_lo != 0 && dport >= cfg.ephemeral_lo && dport <= cfg.ephemeral_hi;
    ephemeral && (key_proto == proto::UDP || (key_proto == proto::TCP && !new_tcp))
}

#[inline(always)]
fn allowlisted<T: Tables>(t: &T, cfg: &Config, src: Addr) -> bool {
    cfg.flags & CFG_ALLOWLIST != 0 && matches!(t.allowlist(src), Some(v) if t.now() < v.expires_ns)
}

/// A non-first fragment has no ports. It passes when its protocol is not
/// gated at all, or when its source holds a live any-port entry or an
/// allowlist prefix; the first fragment, which carries the ports, was
/// checked in full, and the stack cannot reassemble without it.
#[inline(always)]
fn fragment<F: Frame + ?Sized, T: Tables>(frame: &F, pkt: &Packet, cfg: &Config, t: &T) -> Decision {
    let l4 = pkt.proto;
    let gated = match l4 {
        proto::TCP => cfg.flags & CFG_ANY_TCP != 0,
        proto::UDP => cfg.flags & CFG_ANY_UDP != 0,
        proto::ICMP | proto::ICMPV6 => cfg.flags & CFG_PROTECT_ECHO != 0,
        _ => false,
    };
    if !gated {
        return pass(Reason::Unprotected);
    }
    let src = pkt.src(frame);
    if t.presence(src).any_port()
        && let Some(v) = t.whitelist(&WhitelistKey::new(src.bytes(), ANY_PORT, key_proto(pkt)))
        && entry_is_live(&v, t.now(), cfg.idle_timeout_ns)
    {
        return pass(Reason::Whitelisted);
    }
    if allowlisted(t, cfg, src) {
        return pass(Reason::Allowlisted);
    }
    deny(cfg, Reason::FragmentUnmatched)
}
