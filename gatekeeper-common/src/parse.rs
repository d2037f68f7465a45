//! Frame parsing shared by the XDP program and the userspace reference
//! model. The parser reads through [`Frame`], so the XDP program can supply
//! bounds-checked packet access and tests can supply a byte slice.
//!
//! Anything the parser cannot account for is [`Kind::Malformed`]; the
//! decision drops it, so a parse failure never lets protected traffic pass.

use crate::{knock, proto};

/// Headers are read only within the first this many bytes of a frame; a
/// header chain reaching further is malformed. The bound keeps every packet
/// offset provably small for the verifier. Payloads may be longer: generic
/// XDP hands over whole 64 KiB GSO packets.
pub const MAX_FRAME: usize = 16 * 1024;

/// Byte access to one frame.
pub trait Frame {
    /// Whether the frame holds at least `len` bytes.
    fn covers(&self, len: usize) -> bool;
    /// `N` bytes at `off`, or `None` when they run past the frame or past
    /// [`MAX_FRAME`].
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl Frame for [u8] {
    fn covers(&self, len: usize) -> bool {
        len <= self.len()
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
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags accepted in front of IP (802.1ad outer + 802.1Q inner).
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up (and dropping).
pub const MAX_IPV6_EXT: usize = 6;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

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
    /// ICMP or ICMPv6 echo reply: passed like control messages, unless it
    /// carries an fwknop packet (fwknop's `-P icmp` sends replies).
    EchoReply,
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
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Packet {
    pub kind: Kind,
    /// L4 protocol number from the IP header (ICMPv6 stays 58).
    pub proto: u8,
    /// TCP flags byte; 0 otherwise.
    pub tcp_flags: u8,
    /// The L4 payload starts with the knock prefix.
    pub knock_prefix: bool,
    /// The L4 payload starts with knock v2's prefix.
    pub knock_v2: bool,
    /// Ports for TCP and UDP; 0 otherwise.
    pub sport: u16,
    pub dport: u16,
    /// Where the L4 payload sits in the frame (TCP, UDP, echo).
    pub payload_off: u16,
    pub payload_len: u16,
    /// The IP header the addresses are read from: its version (0 when
    /// the frame had no valid one) and where it starts. The addresses stay
    /// in the frame until a decision needs one: carried through the parser
    /// they took four more registers, which LLVM spilled to the stack at
    /// every early return.
    pub ip: Ip,
}

/// Where a packet's IP header sits, once the parser accepted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ip {
    pub version: u8,
    pub off: u16,
}

impl Ip {
    const NONE: Ip = Ip { version: 0, off: 0 };
}

impl Packet {
    /// A frame with no addresses to report (not IP, or broken before them).
    const fn of(kind: Kind) -> Packet {
        Packet::ip(kind, 0, Ip::NONE)
    }

    /// An IP packet without ports or payload.
    const fn ip(kind: Kind, proto: u8, ip: Ip) -> Packet {
        Packet {
            kind,
            proto,
            tcp_flags: 0,
            knock_prefix: false,
            knock_v2: false,
            sport: 0,
            dport: 0,
            payload_off: 0,
            payload_len: 0,
            ip,
        }
    }

    /// The source address, IPv4 as IPv4-mapped IPv6; all zeros for a frame
    /// without an IP header.
    #[inline(always)]
    pub fn src<F: Frame + ?Sized>(&self, f: &F) -> Addr {
        self.addr(f, 12, 8)
    }

    /// The destination address, like [`Packet::src`].
    #[inline(always)]
    pub fn dst<F: Frame + ?Sized>(&self, f: &F) -> Addr {
        self.addr(f, 16, 24)
    }

    /// The address at `v4_at` or `v6_at` bytes into the IP header. The
    /// parser checked that the header is inside `f`, so only a frame other
    /// than the parsed one could make the reads fail.
    #[inline(always)]
    fn addr<F: Frame + ?Sized>(&self, f: &F, v4_at: usize, v6_at: usize) -> Addr {
        let off = self.ip.off as usize;
        let addr = match self.ip.version {
            4 => f.load::<4>(off + v4_at).map(Addr::v4),
            6 => f.load::<16>(off + v6_at).map(Addr::from_bytes),
            _ => None,
        };
        addr.unwrap_or_default()
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// IPv4 address as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn mapped_v4(a: [u8; 4]) -> [u8; 16] {
    Addr::v4(a).bytes()
}

/// A source or destination as the decision handles it: the 16 bytes of an
/// IPv6 address (IPv4 as IPv4-mapped IPv6), held as two words in memory
/// order. Words, because from byte arrays LLVM's BPF backend extracts,
/// stores and reassembles every byte on its own.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Addr([u64; 2]);

impl Addr {
    #[inline(always)]
    pub const fn from_bytes(b: [u8; 16]) -> Addr {
        Addr([
            u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        ])
    }

    /// `::ffff:a.b.c.d`.
    #[inline(always)]
    pub const fn v4(a: [u8; 4]) -> Addr {
        Addr([0, u64::from_le_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]])])
    }

    #[inline(always)]
    pub const fn bytes(self) -> [u8; 16] {
        let (h, l) = (self.0[0].to_le_bytes(), self.0[1].to_le_bytes());
        [
            h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7],
        ]
    }

    /// The first and the last eight bytes, each read as a little-endian word.
    #[inline(always)]
    pub const fn words(self) -> [u64; 2] {
        self.0
    }
}

/// Parses one bare IP packet, as devices without a link layer hand them
/// over (WireGuard, GRE, IPIP, SIT): the version nibble says which IP.
#[inline(always)]
pub fn parse_ip<F: Frame + ?Sized>(f: &F) -> Packet {
    match f.load::<2>(0).map(|b| b[0] >> 4) {
        Some(4) => parse_ipv4(f, 0),
        Some(6) => parse_ipv6(f, 0),
        _ => Packet::of(Kind::Malformed),
    }
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
    let ip = Ip {
        version: 4,
        off: off as u16,
    };
    let frag_offset = be16([h[6], h[7]]) & 0x1fff;
    if frag_offset != 0 {
        return Packet::ip(Kind::Fragment, h[9], ip);
    }
    parse_l4(f, h[9], ip, off + ihl, total - ihl)
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
    let ip = Ip {
        version: 6,
        off: off as u16,
    };

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
                Some(e) if be16([e[2], e[3]]) >> 3 != 0 => return Packet::ip(Kind::Fragment, e[0], ip),
                Some(_) => 8,
                None => return Packet::of(Kind::Malformed),
            },
            // Authentication header: 4-octet units after the first 8.
            51 => match f.load::<2>(at) {
                Some(e) => (e[1] as usize + 2) * 4,
                None => return Packet::of(Kind::Malformed),
            },
            l4 => return parse_l4(f, l4, ip, at, end - at),
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

/// Parses the L4 header at `off`, `len` bytes long per the IP header.
/// Every packet with ports is built whole from what was read: zeroing a
/// struct first makes LLVM's BPF backend call a byte-at-a-time memset.
#[inline(always)]
fn parse_l4<F: Frame + ?Sized>(f: &F, proto: u8, ip: Ip, off: usize, len: usize) -> Packet {
    let v6 = ip.version == 6;
    let (kind, sport, dport, tcp_flags, header) = match proto {
        proto::TCP => {
            let Some(h) = f.load::<20>(off) else {
                return Packet::ip(Kind::Malformed, proto, ip);
            };
            let doff = ((h[12] >> 4) as usize) * 4;
            if doff < 20 || doff > len {
                return Packet::ip(Kind::Malformed, proto, ip);
            }
            (Kind::Tcp, be16([h[0], h[1]]), be16([h[2], h[3]]), h[13], doff)
        }
        proto::UDP => {
            let Some(h) = f.load::<8>(off) else {
                return Packet::ip(Kind::Malformed, proto, ip);
            };
            if len < 8 {
                return Packet::ip(Kind::Malformed, proto, ip);
            }
            (Kind::Udp, be16([h[0], h[1]]), be16([h[2], h[3]]), 0, 8)
        }
        proto::ICMP | proto::ICMPV6 if v6 == (proto == proto::ICMPV6) => {
            let Some(h) = f.load::<2>(off) else {
                return Packet::ip(Kind::Malformed, proto, ip);
            };
            if len < 8 {
                return Packet::ip(Kind::Malformed, proto, ip);
            }
            let (request, reply) = if v6 {
                (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
            } else {
                (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
            };
            let kind = match h[0] {
                t if t == request => Kind::Echo,
                t if t == reply => Kind::EchoReply,
                _ => return Packet::ip(Kind::IcmpControl, proto, ip),
            };
            (kind, 0, 0, 0, 8)
        }
        _ => return Packet::ip(Kind::Other, proto, ip),
    };
    let payload_len = len - header;
    let prefix = if payload_len >= knock::PREFIX.len() {
        f.load::<3>(off + header)
    } else {
        None
    };
    Packet {
        kind,
        proto,
        tcp_flags,
        knock_prefix: prefix == Some(knock::PREFIX),
        knock_v2: prefix == Some(knock::PREFIX_V2),
        sport,
        dport,
        payload_off: (off + header) as u16,
        payload_len: payload_len as u16,
        ip,
    }
}
