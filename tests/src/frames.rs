//! Ethernet frames built byte by byte, and a seeded generator of frames,
//! well-formed and broken, for the verdict tests and the benchmarks.
//! Checksums are left zero: the XDP program never reads them; a packet
//! for the kernel itself ([`FrameSpec::ip_packet`]) carries them.

use gatekeeper_common::{knock, parse::mapped_v4, proto};

pub use gatekeeper_common::parse::{
    ETH_P_8021AD as TPID_8021AD, ETH_P_8021Q as TPID_8021Q, ETH_P_IP, ETH_P_IPV6, TCP_ACK as ACK, TCP_PSH as PSH,
    TCP_SYN as SYN,
};

pub const ETH_P_ARP: u16 = 0x0806;

/// The network layer of a frame.
#[derive(Clone, Debug)]
pub enum Net {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        /// IP options (padded to a multiple of 4 when built).
        options: Vec<u8>,
        /// Fragment offset in 8-byte units, and the more-fragments flag.
        frag_offset: u16,
        more_frags: bool,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        /// Extension headers in order: (type, body). Bodies of types 0, 43
        /// and 60 are padded to fill 8-octet units; 44 is a fragment header
        /// whose body is (offset in 8-byte units, more flag) as 2+1 bytes.
        ext: Vec<(u8, Vec<u8>)>,
    },
}

/// The transport layer of a frame.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    Icmp {
        typ: u8,
        payload: Vec<u8>,
    },
    /// Any protocol number with raw bytes after the IP header.
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

#[derive(Clone, Debug)]
pub struct FrameSpec {
    /// VLAN tags, outermost first: (TPID, TCI).
    pub vlans: Vec<(u16, u16)>,
    pub net: Net,
    pub l4: L4,
}

impl FrameSpec {
    pub fn v4(src: [u8; 4], dst: [u8; 4], l4: L4) -> Self {
        FrameSpec {
            vlans: vec![],
            net: Net::V4 {
                src,
                dst,
                options: vec![],
                frag_offset: 0,
                more_frags: false,
            },
            l4,
        }
    }

    pub fn v6(src: [u8; 16], dst: [u8; 16], l4: L4) -> Self {
        FrameSpec {
            vlans: vec![],
            net: Net::V6 { src, dst, ext: vec![] },
            l4,
        }
    }

    pub fn tagged(mut self, tags: &[(u16, u16)]) -> Self {
        self.vlans = tags.to_vec();
        self
    }

    /// The frame's source address as the maps store it.
    pub fn src_mapped(&self) -> [u8; 16] {
        match &self.net {
            Net::V4 { src, .. } => mapped_v4(*src),
            Net::V6 { src, .. } => *src,
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2]);
        for &(tpid, tci) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        let (l4_proto, l4_bytes) = self.l4.bytes(matches!(self.net, Net::V6 { .. }));
        match &self.net {
            Net::V4 {
                src,
                dst,
                options,
                frag_offset,
                more_frags,
            } => {
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let mut opts = options.clone();
                while opts.len() % 4 != 0 {
                    opts.push(0);
                }
                let ihl = 5 + opts.len() / 4;
                let total = ihl * 4 + l4_bytes.len();
                let frag = (frag_offset & 0x1fff) | if *more_frags { 0x2000 } else { 0 };
                f.push(0x40 | ihl as u8);
                f.push(0);
                f.extend_from_slice(&(total as u16).to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]);
                f.extend_from_slice(&frag.to_be_bytes());
                f.push(64);
                f.push(l4_proto);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                f.extend_from_slice(&opts);
            }
            Net::V6 { src, dst, ext } => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let mut chain = Vec::new();
                for (i, (typ, body)) in ext.iter().enumerate() {
                    let next = ext.get(i + 1).map(|(t, _)| *t).unwrap_or(l4_proto);
                    chain.extend(ext_header(*typ, next, body));
                }
                let first = ext.first().map(|(t, _)| *t).unwrap_or(l4_proto);
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((chain.len() + l4_bytes.len()) as u16).to_be_bytes());
                f.push(first);
                f.push(64);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                f.extend(chain);
            }
        }
        f.extend(l4_bytes);
        f
    }
}

impl FrameSpec {
    /// The bare IPv4 packet, checksums filled in, as a tunnel device (tun,
    /// WireGuard) hands it to the host: without an Ethernet header.
    pub fn ip_packet(&self) -> Vec<u8> {
        let frame = self.build();
        let mut p = frame[14 + 4 * self.vlans.len()..].to_vec();
        if let Net::V4 { src, dst, .. } = &self.net {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let sum = checksum(&p[..ihl], 0);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
            let at = match p[9] {
                proto::TCP => Some(16),
                proto::UDP => Some(6),
                _ => None,
            };
            if let Some(at) = at {
                let len = p.len() - ihl;
                let mut pseudo = Vec::with_capacity(12);
                pseudo.extend_from_slice(src);
                pseudo.extend_from_slice(dst);
                pseudo.extend_from_slice(&[0, p[9]]);
                pseudo.extend_from_slice(&(len as u16).to_be_bytes());
                let sum = checksum(&p[ihl..], checksum_add(&pseudo));
                p[ihl + at..ihl + at + 2].copy_from_slice(&sum.to_be_bytes());
            }
        }
        p
    }
}

/// The ones' complement sum of `bytes` as 16-bit words, unfolded.
fn checksum_add(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

/// The Internet checksum of `bytes`, starting from the partial sum `start`.
fn checksum(bytes: &[u8], start: u32) -> u16 {
    let mut sum = start + checksum_add(bytes);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ext_header(typ: u8, next: u8, body: &[u8]) -> Vec<u8> {
    match typ {
        44 => {
            let offset = u16::from_be_bytes([body.first().copied().unwrap_or(0), body.get(1).copied().unwrap_or(0)]);
            let more = body.get(2).copied().unwrap_or(0) & 1;
            let field = (offset << 3) | more as u16;
            let mut h = vec![next, 0];
            h.extend_from_slice(&field.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 7]);
            h
        }
        51 => {
            // AH: length in 4-octet units minus 2; at least 12 bytes.
            let mut h = vec![next, 0, 0, 0];
            h.extend_from_slice(body);
            while h.len() < 12 || h.len() % 4 != 0 {
                h.push(0);
            }
            h[1] = (h.len() / 4 - 2) as u8;
            h
        }
        _ => {
            let mut h = vec![next, 0];
            h.extend_from_slice(body);
            while h.len() < 8 || h.len() % 8 != 0 {
                h.push(0);
            }
            h[1] = (h.len() / 8 - 1) as u8;
            h
        }
    }
}

impl L4 {
    fn bytes(&self, v6: bool) -> (u8, Vec<u8>) {
        match self {
            L4::Tcp {
                sport,
                dport,
                flags,
                payload,
            } => {
                let mut h = Vec::with_capacity(20 + payload.len());
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
                h.push(5 << 4);
                h.push(*flags);
                h.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
                h.extend_from_slice(payload);
                (proto::TCP, h)
            }
            L4::Udp { sport, dport, payload } => {
                let mut h = Vec::with_capacity(8 + payload.len());
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(payload);
                (proto::UDP, h)
            }
            L4::Icmp { typ, payload } => {
                let mut h = vec![*typ, 0, 0, 0, 0, 1, 0, 1];
                h.extend_from_slice(payload);
                (if v6 { proto::ICMPV6 } else { proto::ICMP }, h)
            }
            L4::Raw { proto, bytes } => (*proto, bytes.clone()),
        }
    }
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags,
        payload: vec![],
    }
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> L4 {
    L4::Udp {
        sport,
        dport,
        payload: payload.to_vec(),
    }
}

/// A payload of `len` bytes that starts with the knock prefix.
pub fn knock_payload(len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    let n = len.min(knock::PREFIX.len());
    p[..n].copy_from_slice(&knock::PREFIX[..n]);
    p
}

/// A v2 knock payload of `len` bytes (at least `V2_MIN_LEN`) whose flood
/// tag is made under `key`, with `seed` in its ephemeral key and nonce.
pub fn knock_v2_payload(len: usize, key: [u64; 2], seed: u8) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect();
    p[..3].copy_from_slice(&knock::PREFIX_V2);
    let mut ephemeral = [0u8; 32];
    ephemeral.copy_from_slice(&p[knock::V2_EPHEMERAL_AT..knock::V2_EPHEMERAL_AT + 32]);
    let mut nonce = [0u8; 24];
    nonce.copy_from_slice(&p[len - 24..]);
    let tag = knock::flood_tag(key, &knock::tag_words(&ephemeral, &nonce));
    p[knock::V2_TAG_AT..knock::V2_TAG_AT + 8].copy_from_slice(&tag.to_le_bytes());
    p
}

/// The key id every [`knock_payload`] of plausible length carries.
pub fn knock_key_id() -> [u8; 16] {
    let p = knock_payload(knock::MIN_LEN);
    let mut id = [0u8; 16];
    id.copy_from_slice(&p[knock::PREFIX.len()..knock::PREFIX.len() + 16]);
    id
}

/// The nonce a [`knock_payload`] of `len` bytes ends with.
pub fn knock_nonce(len: usize) -> [u8; 24] {
    let p = knock_payload(len);
    let mut n = [0u8; 24];
    n.copy_from_slice(&p[len - 24..]);
    n
}

/// An ARP request: not IP, always passes.
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0; 20]);
    f
}

/// xorshift64*: small, seeded and reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// What the generator draws from: the sources, destinations and ports that
/// the verdict tests give meaning to (whitelisted, allowlisted, protected,
/// unprotected, ephemeral), so most frames exercise a real rule.
pub struct Pools {
    pub v4_sources: Vec<[u8; 4]>,
    pub v6_sources: Vec<[u8; 16]>,
    pub v4_dst: [u8; 4],
    pub v6_dst: [u8; 16],
    pub ports: Vec<u16>,
}

/// Generates frames: mostly well-formed ones across every shape the parser
/// knows, and a share of broken ones (truncated, lengths that lie, random
/// bytes, too many tags or extension headers).
pub struct Generator {
    rng: Rng,
    pools: Pools,
}

impl Generator {
    pub fn new(seed: u64, pools: Pools) -> Generator {
        Generator {
            rng: Rng::new(seed),
            pools,
        }
    }

    /// A frame of at least 14 bytes (the least `BPF_PROG_TEST_RUN` takes)
    /// and at most 1514.
    pub fn frame(&mut self) -> Vec<u8> {
        let r = &mut self.rng;
        if r.chance(2) {
            return arp();
        }
        if r.chance(2) {
            let n = 14 + r.below(100) as usize;
            return r.bytes(n);
        }
        let spec = self.spec();
        let mut f = spec.build();
        let r = &mut self.rng;
        match r.below(100) {
            0..=4 => {
                let cut = 14 + r.below((f.len() - 13) as u64) as usize;
                f.truncate(cut.max(14));
            }
            5..=7 => {
                for _ in 0..1 + r.below(3) {
                    let i = r.below(f.len() as u64) as usize;
                    f[i] = r.next_u64() as u8;
                }
            }
            8..=9 => {
                let n = 1 + r.below(40) as usize;
                f.extend(r.bytes(n));
            }
            _ => {}
        }
        f.truncate(1514);
        f
    }

    fn payload(&mut self) -> Vec<u8> {
        let r = &mut self.rng;
        let len = match r.below(10) {
            0 => 0,
            1..=2 => knock::MIN_LEN - 2 + r.below(5) as usize,
            3 => knock::MAX_LEN - 1 + r.below(3) as usize,
            _ => r.below(200) as usize,
        };
        if !r.chance(50) {
            return r.bytes(len);
        }
        let mut p = knock_payload(len);
        // A quarter name a key no client has.
        if len >= knock::PREFIX.len() + 16 && r.chance(25) {
            let id = r.bytes(16);
            p[knock::PREFIX.len()..knock::PREFIX.len() + 16].copy_from_slice(&id);
        }
        p
    }

    fn spec(&mut self) -> FrameSpec {
        let sport = if self.rng.chance(30) {
            self.rng.pick(&self.pools.ports)
        } else {
            1024 + self.rng.below(60000) as u16
        };
        let dport = self.rng.pick(&self.pools.ports);
        let flags = self.rng.pick(&[SYN, SYN, SYN | ACK, ACK, ACK | PSH, 0x01, 0x04, 0]);
        let v6 = self.rng.chance(35);
        let l4 = match self.rng.below(12) {
            0..=4 => L4::Tcp {
                sport,
                dport,
                flags,
                payload: self.payload(),
            },
            5..=8 => L4::Udp {
                sport,
                dport,
                payload: self.payload(),
            },
            9..=10 => {
                let typ = if v6 {
                    self.rng.pick(&[128, 128, 129, 133, 135, 136, 1])
                } else {
                    self.rng.pick(&[8, 8, 0, 3, 11])
                };
                L4::Icmp {
                    typ,
                    payload: self.payload(),
                }
            }
            _ => {
                let proto = self.rng.pick(&[47, 50, 132, 1, 58, 59]);
                let n = self.rng.below(60) as usize;
                L4::Raw {
                    proto,
                    bytes: self.rng.bytes(n),
                }
            }
        };
        let mut spec = if v6 {
            let src = self.rng.pick(&self.pools.v6_sources);
            let mut s = FrameSpec::v6(src, self.pools.v6_dst, l4);
            if let Net::V6 { ext, .. } = &mut s.net {
                for _ in 0..self.rng.pick(&[0, 0, 0, 1, 2, 3, 6, 7, 8]) {
                    let typ = self.rng.pick(&[0, 43, 60, 60, 44, 51]);
                    let body = if typ == 44 {
                        let off = if self.rng.chance(50) {
                            0
                        } else {
                            1 + self.rng.below(100) as u16
                        };
                        let b = off.to_be_bytes();
                        vec![b[0], b[1], self.rng.below(2) as u8]
                    } else {
                        let n = self.rng.below(20) as usize;
                        self.rng.bytes(n)
                    };
                    ext.push((typ, body));
                }
            }
            s
        } else {
            let src = self.rng.pick(&self.pools.v4_sources);
            let mut s = FrameSpec::v4(src, self.pools.v4_dst, l4);
            if let Net::V4 {
                options,
                frag_offset,
                more_frags,
                ..
            } = &mut s.net
            {
                if self.rng.chance(10) {
                    let n = 1 + self.rng.below(40) as usize;
                    *options = self.rng.bytes(n);
                }
                if self.rng.chance(10) {
                    *frag_offset = if self.rng.chance(50) {
                        0
                    } else {
                        1 + self.rng.below(100) as u16
                    };
                    *more_frags = self.rng.chance(50);
                }
            }
            s
        };
        let tags = self.rng.pick(&[0usize, 0, 0, 0, 1, 1, 2, 3]);
        spec.vlans = (0..tags)
            .map(|i| {
                (
                    if i == 0 && tags > 1 { TPID_8021AD } else { TPID_8021Q },
                    100 + i as u16,
                )
            })
            .collect();
        spec
    }
}
