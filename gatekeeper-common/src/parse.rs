//! Frame parsing shared by the XDP program and the userspace reference
//! model. The parser reads through [`Frame`], so the XDP program can supply
//! bounds-checked packet access and tests can supply a byte slice.
//!
//! Anything the parser cannot account for is [`Kind::Malformed`]; the
//! decision drops it, so a parse failure never lets protected traffic pass.

use crate::{knock, proto};

/// The parser reads no further than this into a frame; a longer IP packet
/// is malformed. XDP frames are at most a page without multi-buffer, and the
/// bound keeps every packet offset provably small for the verifier.
pub const MAX_FRAME: usize = 16 * 1024;

/// Byte access to one frame. Both methods treat bytes at or beyond
/// [`MAX_FRAME`] as absent.
pub trait Frame {
    /// Whether the frame holds at least `len` bytes.
    fn covers(&self, len: usize) -> bool;
    /// `N` bytes at `off`, or `None` when they run past the frame.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl Frame for [u8] {
    fn covers(&self, len: usize) -> bool {
        len <= MAX_FRAME && len <= self.len()
    }

    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        if end > MAX_FRAME {
            return None;
        }
        let bytes = self.get(off..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags accepted in front of IP (802.1ad outer + 802.1Q inner).
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up (and dropping).
pub const MAX_IPV6_EXT: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// What a frame turned out to be.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Kind {
    /// Truncated or inconsistent headers.
    #[default]
    Malformed = 0,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp,
    Tcp,
    Udp,
    /// ICMP or ICMPv6 echo request.
    Echo,
    /// Every other ICMP/ICMPv6 message: errors (path MTU discovery) and
    /// IPv6 neighbour discovery.
    IcmpControl,
    /// A fragment other than the first: it carries no L4 header.
    Fragment,
    /// An L4 protocol the gate does not look into.
    Other,
}

/// A parsed frame. Flat and always fully initialised: the verifier rejects
/// programs that copy enum payloads with uninitialised bytes through the
/// stack, which is what LLVM makes of data-carrying enums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Packet {
    pub kind: Kind,
    /// L4 protocol number from the IP header (ICMPv6 stays 58).
    pub proto: u8,
    /// TCP flags byte; 0 otherwise.
    pub tcp_flags: u8,
    /// The L4 payload starts with the knock prefix.
    pub knock_prefix: bool,
    /// Ports for TCP and UDP; 0 otherwise.
    pub sport: u16,
    pub dport: u16,
    /// Where the L4 payload sits in the frame (TCP, UDP, echo).
    pub payload_off: u16,
    pub payload_len: u16,
    /// Source and destination, IPv4 as IPv4-mapped IPv6.
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl Packet {
    const fn of(kind: Kind) -> Packet {
        Packet {
            kind,
            proto: 0,
            tcp_flags: 0,
            knock_prefix: false,
            sport: 0,
            dport: 0,
            payload_off: 0,
            payload_len: 0,
            src: [0; 16],
            dst: [0; 16],
        }
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// IPv4 address as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn mapped_v4(a: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// Parses one Ethernet frame.
#[inline(always)]
pub fn parse<F: Frame + ?Sized>(f: &F) -> Packet {
    let Some(mut ethertype) = f.load::<2>(12).map(be16) else {
        return Packet::of(Kind::Malformed);
    };
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = f.load::<2>(off + 2).map(be16) else {
            return Packet::of(Kind::Malformed);
        };
        ethertype = inner;
        off += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(f, off),
        ETH_P_IPV6 => parse_ipv6(f, off),
        // A third VLAN tag is more than we walk: refuse rather than guess.
        ETH_P_8021Q | ETH_P_8021AD => Packet::of(Kind::Malformed),
        _ => Packet::of(Kind::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4<F: Frame + ?Sized>(f: &F, off: usize) -> Packet {
    let Some(h) = f.load::<20>(off) else {
        return Packet::of(Kind::Malformed);
    };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    let total = be16([h[2], h[3]]) as usize;
    if h[0] >> 4 != 4 || ihl < 20 || total < ihl || !f.covers(off + total) {
        return Packet::of(Kind::Malformed);
    }
    let mut p = Packet::of(Kind::Malformed);
    p.src = mapped_v4([h[12], h[13], h[14], h[15]]);
    p.dst = mapped_v4([h[16], h[17], h[18], h[19]]);
    p.proto = h[9];
    let frag_offset = be16([h[6], h[7]]) & 0x1fff;
    if frag_offset != 0 {
        p.kind = Kind::Fragment;
        return p;
    }
    parse_l4(f, p, false, off + ihl, total - ihl)
}

#[inline(always)]
fn parse_ipv6<F: Frame + ?Sized>(f: &F, off: usize) -> Packet {
    let Some(h) = f.load::<40>(off) else {
        return Packet::of(Kind::Malformed);
    };
    let payload_len = be16([h[4], h[5]]) as usize;
    if h[0] >> 4 != 6 || !f.covers(off + 40 + payload_len) {
        return Packet::of(Kind::Malformed);
    }
    let mut p = Packet::of(Kind::Malformed);
    p.src.copy_from_slice(&h[8..24]);
    p.dst.copy_from_slice(&h[24..40]);

    let end = off + 40 + payload_len;
    let mut next = h[6];
    let mut at = off + 40;
    for _ in 0..MAX_IPV6_EXT + 1 {
        let ext_len = match next {
            // Hop-by-hop, routing, destination options: 8-octet units after the first 8.
            0 | 43 | 60 => match f.load::<2>(at) {
                Some(e) => (e[1] as usize + 1) * 8,
                None => return Packet::of(Kind::Malformed),
            },
            // Fragment header: fixed 8 bytes; non-first fragments end the walk.
            44 => match f.load::<4>(at) {
                Some(e) if be16([e[2], e[3]]) >> 3 != 0 => {
                    p.kind = Kind::Fragment;
                    p.proto = e[0];
                    return p;
                }
                Some(_) => 8,
                None => return Packet::of(Kind::Malformed),
            },
            // Authentication header: 4-octet units after the first 8.
            51 => match f.load::<2>(at) {
                Some(e) => (e[1] as usize + 2) * 4,
                None => return Packet::of(Kind::Malformed),
            },
            l4 => {
                p.proto = l4;
                return parse_l4(f, p, true, at, end - at);
            }
        };
        let Some(e) = f.load::<2>(at) else {
            return Packet::of(Kind::Malformed);
        };
        next = e[0];
        at += ext_len;
        if at > end {
            return Packet::of(Kind::Malformed);
        }
    }
    // More extension headers than we walk.
    Packet::of(Kind::Malformed)
}

/// Fills in the L4 part of `p` from the header at `off`, `len` bytes long
/// per the IP header. `p.proto` is already set.
#[inline(always)]
fn parse_l4<F: Frame + ?Sized>(f: &F, mut p: Packet, v6: bool, off: usize, len: usize) -> Packet {
    let (kind, payload_off) = match p.proto {
        proto::TCP => {
            let Some(h) = f.load::<20>(off) else {
                return Packet::of(Kind::Malformed);
            };
            let doff = ((h[12] >> 4) as usize) * 4;
            if doff < 20 || doff > len {
                return Packet::of(Kind::Malformed);
            }
            p.sport = be16([h[0], h[1]]);
            p.dport = be16([h[2], h[3]]);
            p.tcp_flags = h[13];
            (Kind::Tcp, doff)
        }
        proto::UDP => {
            let Some(h) = f.load::<8>(off) else {
                return Packet::of(Kind::Malformed);
            };
            if len < 8 {
                return Packet::of(Kind::Malformed);
            }
            p.sport = be16([h[0], h[1]]);
            p.dport = be16([h[2], h[3]]);
            (Kind::Udp, 8)
        }
        proto::ICMP | proto::ICMPV6 if v6 == (p.proto == proto::ICMPV6) => {
            let Some(h) = f.load::<2>(off) else {
                return Packet::of(Kind::Malformed);
            };
            if len < 8 {
                return Packet::of(Kind::Malformed);
            }
            let echo_request = if v6 { ICMPV6_ECHO_REQUEST } else { ICMP_ECHO_REQUEST };
            if h[0] != echo_request {
                p.kind = Kind::IcmpControl;
                return p;
            }
            (Kind::Echo, 8)
        }
        _ => {
            p.kind = Kind::Other;
            return p;
        }
    };
    p.kind = kind;
    p.payload_off = (off + payload_off) as u16;
    p.payload_len = (len - payload_off) as u16;
    p.knock_prefix = len - payload_off >= knock::PREFIX.len() && f.load::<3>(off + payload_off) == Some(knock::PREFIX);
    p
}
