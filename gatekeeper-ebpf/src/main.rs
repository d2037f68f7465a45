//! The gate's XDP program. It only adapts: packet access and BPF maps in,
//! the shared decision from `gatekeeper-common`, counters and the event ring
//! out. The rules themselves live in `gatekeeper_common::decide`.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

use core::arch::asm;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_xdp_load_bytes},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::XdpContext,
};
use gatekeeper_common::{
    decide::{Action, Decision, Reason, STATS_LEN, Tables, counter_index, decide},
    knock,
    maps::{
        ALLOWLIST_MAX, AllowValue, BPF_F_MMAPABLE, Config, EVENT_AUDIT_SAMPLE, EVENT_KNOCK, EVENTS_BYTES, Event,
        IFACE_NAME_LEN, KEY_ID_LEN, KNOCK_KEYS_MAX, KNOCK_RATE_MAX, KnockBucket, MAX_IFACES, NONCE_LEN, PRESENCE_SLOTS,
        PROTECTED_WORDS, PresenceCount, REPLAY_MAX, TAG_KEY_SLOTS, TagKey, WHITELIST_MAX, WhitelistKey, WhitelistValue,
        presence_slot,
    },
    parse::{Addr, Frame, Kind, MAX_FRAME, Packet, parse, parse_ip},
    ratelimit,
};

#[map]
static WHITELIST: LruHashMap<WhitelistKey, WhitelistValue> = LruHashMap::with_max_entries(WHITELIST_MAX, 0);
#[map]
static ALLOWLIST: LpmTrie<[u8; 16], AllowValue> = LpmTrie::with_max_entries(ALLOWLIST_MAX, 0);
#[map]
static PROTECTED: Array<u64> = Array::with_max_entries(PROTECTED_WORDS, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
#[map]
static KNOCK_RATE: LruHashMap<[u8; 16], KnockBucket> = LruHashMap::with_max_entries(KNOCK_RATE_MAX, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN * MAX_IFACES, 0);
/// Written by the daemon; read here so a replay never reaches it.
#[map]
static REPLAY: HashMap<[u8; NONCE_LEN], u64> = HashMap::with_max_entries(REPLAY_MAX, 0);
#[map]
static KNOCK_KEYS: HashMap<[u8; KEY_ID_LEN], KnockBucket> = HashMap::with_max_entries(KNOCK_KEYS_MAX, 0);
#[map]
static KNOCK_BUDGET: PerCpuArray<KnockBucket> = PerCpuArray::with_max_entries(1, 0);
#[map]
static KNOCK_TAG_KEYS: Array<TagKey> = Array::with_max_entries(TAG_KEY_SLOTS, 0);
/// How many whitelist entries of each kind each source slot holds;
/// userspace keeps it, the program only reads it.
#[map]
static PRESENCE: Array<u64> = Array::with_max_entries(PRESENCE_SLOTS, BPF_F_MMAPABLE);
/// Declared here only so it is created and pinned with the gate's maps.
#[map]
static IFACES: Array<[u8; IFACE_NAME_LEN]> = Array::with_max_entries(MAX_IFACES, 0);

/// Set for each interface's instance of the program when it is loaded
/// (read-only data, so the verifier knows the value): the slot its
/// counters go to, and whether its device hands over bare IP packets
/// instead of Ethernet frames.
#[unsafe(no_mangle)]
static IFACE_SLOT: u32 = 0;
#[unsafe(no_mangle)]
static BARE_IP: u8 = 0;

/// Packet bytes between `data` and `data_end`. The program is loaded
/// without multi-buffer support, so the kernel always hands it the whole
/// frame in one linear buffer (generic XDP linearises GSO packets first).
struct XdpFrame {
    start: usize,
    end: usize,
}

impl XdpFrame {
    /// `data_end`, opaque to the optimiser. Otherwise LLVM proves some
    /// bounds checks redundant from earlier ones (the IP length check covers
    /// the L4 header) and drops them, and the verifier, which cannot follow
    /// that reasoning, rejects the load. A register move in asm hides the
    /// value in one instruction (`black_box` goes through the stack; an
    /// empty asm statement leaves line info the kernel refuses).
    #[inline(always)]
    fn end(&self) -> usize {
        let mut end = self.end;
        // SAFETY: a move of a register onto itself.
        unsafe { asm!("{0} = {0}", inout(reg) end, options(pure, nomem, nostack)) };
        end
    }
}

impl Frame for XdpFrame {
    #[inline(always)]
    fn covers(&self, len: usize) -> bool {
        // IP lengths stay below 64 KiB plus headers; the explicit bound
        // keeps the pointer sum within what the verifier accepts.
        len <= MAX_COVER && self.start + len <= self.end()
    }

    /// Callers use N >= 2: LLVM turns a one-byte check into `ptr >= end`,
    /// from which this kernel's verifier derives no readable range.
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        const { assert!(N >= 2, "XdpFrame::load needs N >= 2") };
        // The explicit bound lets the verifier prove the offset small.
        if off > MAX_FRAME || self.start + off + N > self.end() {
            return None;
        }
        // SAFETY: the N bytes at `off` lie inside the packet, checked above.
        Some(unsafe { load_words(self.start + off) })
    }
}

/// Reads `N` packet bytes at `at` in 8-, 4-, 2- and 1-byte loads. Headers
/// sit at any alignment (IPv4 after Ethernet starts at 2 mod 4), and LLVM,
/// told the address may be misaligned, splits every load into bytes and
/// shifts. The verifier and the JITs of architectures with cheap unaligned
/// access accept misaligned packet loads, so they are written out here,
/// each into a 64-bit register (loads zero-extend), which needs no ALU32.
///
/// # Safety
/// The `N` bytes at `at` must lie inside the packet.
#[inline(always)]
unsafe fn load_words<const N: usize>(at: usize) -> [u8; N] {
    // Fixed trip counts, so LLVM unrolls the loop and keeps the words in
    // registers instead of an array on the stack.
    let mut out = [0u8; N];
    let mut i = 0;
    for _ in 0..N / 8 {
        let w: u64;
        // SAFETY (this and the three below): inside the packet per the
        // caller's contract.
        unsafe { asm!("{0} = *(u64 *)({1} + 0)", lateout(reg) w, in(reg) at + i, options(pure, readonly, nostack)) };
        out[i..i + 8].copy_from_slice(&w.to_le_bytes());
        i += 8;
    }
    if N % 8 >= 4 {
        let w: u64;
        unsafe { asm!("{0} = *(u32 *)({1} + 0)", lateout(reg) w, in(reg) at + i, options(pure, readonly, nostack)) };
        out[i..i + 4].copy_from_slice(&(w as u32).to_le_bytes());
        i += 4;
    }
    if N % 4 >= 2 {
        let w: u64;
        unsafe { asm!("{0} = *(u16 *)({1} + 0)", lateout(reg) w, in(reg) at + i, options(pure, readonly, nostack)) };
        out[i..i + 2].copy_from_slice(&(w as u16).to_le_bytes());
        i += 2;
    }
    if N % 2 == 1 {
        let w: u64;
        unsafe { asm!("{0} = *(u8 *)({1} + 0)", lateout(reg) w, in(reg) at + i, options(pure, readonly, nostack)) };
        out[i] = w as u8;
    }
    out
}

/// The longest length [`XdpFrame::covers`] is asked about: an IPv6
/// payload length after two VLAN tags and the fixed header.
const MAX_COVER: usize = 0x1_0000 + 64;

struct Maps;

// SAFETY: every field of Config is an integer, for which zero is valid.
static NO_CONFIG: Config = unsafe { core::mem::zeroed() };

impl Tables for Maps {
    #[inline(always)]
    fn config(&self) -> &Config {
        // Index 0 of a one-entry array is always there; the fallback
        // (enforce, no options) only satisfies the type.
        CONFIG.get(0).unwrap_or(&NO_CONFIG)
    }

    #[inline(always)]
    fn protected_word(&self, index: u32) -> u64 {
        PROTECTED.get(index).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn whitelist(&self, key: &WhitelistKey) -> Option<WhitelistValue> {
        // SAFETY: the value is copied out at once; concurrent writers only
        // ever store whole timestamps.
        unsafe { WHITELIST.get(key) }.copied()
    }

    #[inline(always)]
    fn presence(&self, addr: Addr) -> PresenceCount {
        PresenceCount(PRESENCE.get(presence_slot(addr)).copied().unwrap_or(0))
    }

    #[inline(always)]
    fn allowlist(&self, addr: Addr) -> Option<AllowValue> {
        ALLOWLIST.get(Key::new(128, addr.bytes())).copied()
    }

    #[inline(always)]
    fn admit_knock(&self, src: Addr, cfg: &Config) -> bool {
        let src = src.bytes();
        // SAFETY: copied out at once; a racing CPU can at worst let one
        // extra knock through, which the daemon's own checks absorb.
        let bucket = unsafe { KNOCK_RATE.get(src) }.copied();
        let (bucket, allowed) = ratelimit::take(bucket, now(), cfg.knock_rate_per_sec, cfg.knock_burst);
        let _ = KNOCK_RATE.insert(src, bucket, 0);
        allowed
    }

    #[inline(always)]
    fn known_key(&self, key_id: &[u8; KEY_ID_LEN]) -> bool {
        // SAFETY: only the presence is used.
        unsafe { KNOCK_KEYS.get(key_id) }.is_some()
    }

    #[inline(always)]
    fn admit_key(&self, key_id: &[u8; KEY_ID_LEN], cfg: &Config) -> bool {
        let Some(bucket) = KNOCK_KEYS.get_ptr_mut(key_id) else {
            return false;
        };
        // SAFETY: a map value pointer from a successful lookup; CPUs racing
        // on one key can at worst let an extra knock through.
        unsafe {
            let (next, allowed) =
                ratelimit::take(Some(*bucket), now(), cfg.knock_key_rate_per_sec, cfg.knock_key_burst);
            *bucket = next;
            allowed
        }
    }

    #[inline(always)]
    fn replayed(&self, nonce: &[u8; NONCE_LEN]) -> bool {
        // SAFETY: only the presence is used.
        unsafe { REPLAY.get(nonce) }.is_some()
    }

    #[inline(always)]
    fn admit_budget(&self, cfg: &Config) -> bool {
        let Some(bucket) = KNOCK_BUDGET.get_ptr_mut(0) else {
            return false;
        };
        // SAFETY: this CPU's own slot; nothing else on this CPU runs meanwhile.
        unsafe {
            let (next, allowed) =
                ratelimit::take(Some(*bucket), now(), cfg.knock_budget_per_sec, cfg.knock_budget_burst);
            *bucket = next;
            allowed
        }
    }

    #[inline(always)]
    fn tag_key(&self, slot: u32) -> TagKey {
        KNOCK_TAG_KEYS.get(slot).copied().unwrap_or([0, 0])
    }

    #[inline(always)]
    fn now(&self) -> u64 {
        now()
    }
}

/// CLOCK_MONOTONIC_COARSE, as userspace writes expiries in: a tick-old
/// time is exact enough for expiries and rate limits, and here it costs
/// about 30 ns per whitelisted packet less than `bpf_ktime_get_ns`.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[xdp]
pub fn gatekeeper(ctx: XdpContext) -> u32 {
    let frame = XdpFrame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    // SAFETY: plain reads of constants the loader set.
    let (slot, bare_ip) = unsafe {
        (
            core::ptr::read_volatile(&IFACE_SLOT),
            core::ptr::read_volatile(&BARE_IP),
        )
    };
    let pkt = if bare_ip != 0 { parse_ip(&frame) } else { parse(&frame) };
    let mut decision = decide(&frame, &pkt, &Maps);

    if let Some(key) = decision.touch.key(&frame, &pkt)
        && let Some(v) = WHITELIST.get_ptr_mut(key)
    {
        // SAFETY: a map value pointer from a successful lookup.
        unsafe { (*v).last_seen_ns = now() };
    }
    match decision.action {
        Action::Divert => {
            if !emit(&ctx, &frame, &pkt, EVENT_KNOCK, Reason::KnockDiverted) {
                decision.reason = Reason::KnockRingFull;
            }
        }
        Action::Pass if decision.reason.is_denial() => sample_audit(&ctx, &frame, &pkt, &decision),
        _ => {}
    }
    count(slot, decision.counter());
    match decision.action {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop | Action::Divert => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn count(slot: u32, reason: Reason) {
    if let Some(c) = STATS.get_ptr_mut(counter_index(slot, reason)) {
        // SAFETY: per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn sample_audit(ctx: &XdpContext, frame: &XdpFrame, pkt: &Packet, d: &Decision) {
    let every = Maps.config().audit_sample_every;
    if every != 0 && unsafe { bpf_get_prandom_u32() } % every == 0 {
        emit(ctx, frame, pkt, EVENT_AUDIT_SAMPLE, d.reason);
    }
}

/// Writes one event (with the L4 payload for knocks) into the ring.
/// Returns false when the ring is full.
#[inline(always)]
fn emit(ctx: &XdpContext, frame: &XdpFrame, pkt: &Packet, kind: u32, reason: Reason) -> bool {
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        return false;
    };
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned ring slot of
    // size_of::<Event>(); every field is written before submit.
    unsafe {
        (*ev).kind = kind;
        (*ev).ifindex = ctx.ingress_ifindex() as u32;
        // The precise clock: events are rare, and the daemon times a
        // knock from this stamp to its open gate.
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).src = pkt.src(frame).bytes();
        (*ev).dst = pkt.dst(frame).bytes();
        (*ev).sport = pkt.sport;
        (*ev).dport = pkt.dport;
        (*ev).proto = pkt.proto;
        (*ev).tcp_flags = pkt.tcp_flags;
        (*ev).reason = reason as u8;
        (*ev)._pad = 0;
        (*ev)._pad2 = 0;
        (*ev).payload_len = 0;
        let len = pkt.payload_len as u32;
        let carries_payload = matches!(pkt.kind, Kind::Tcp | Kind::Udp | Kind::Echo | Kind::EchoReply);
        if kind == EVENT_KNOCK && carries_payload && len > 0 && len <= knock::MAX_LEN as u32 {
            let dst = (*ev).payload.as_mut_ptr() as *mut core::ffi::c_void;
            // Same value as `len`, rebuilt through a mask the verifier can
            // see: LLVM would otherwise drop the bound it already proved.
            let n = ((core::hint::black_box(len) - 1) & (knock::MAX_LEN as u32 - 1)) + 1;
            if bpf_xdp_load_bytes(ctx.ctx, pkt.payload_off as u32, dst, n) == 0 {
                (*ev).payload_len = len;
            }
        }
    }
    slot.submit(0);
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
