//! What operators type: protocols, port ranges, protected-port lists,
//! whitelist tuples, address prefixes and durations. Every parser names the
//! bad input and says what would be accepted.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use gatekeeper_common::{parse::mapped_v4, proto};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("unknown protocol {0:?}: use tcp, udp or icmp")]
    Protocol(String),
    #[error("bad port {0:?}: use a number from 1 to 65535")]
    Port(String),
    #[error("bad port range {0:?}: use PORT or LOW-HIGH with 1 <= LOW <= HIGH <= 65535")]
    PortRange(String),
    #[error("bad port set {0:?}: use PROTO/PORT or PROTO/LOW-HIGH (tcp/22, udp/53, tcp/8000-8100), icmp, or all")]
    Protect(String),
    #[error("bad address {0:?}: use an IPv4 or IPv6 address such as 192.0.2.7 or 2001:db8::7")]
    Address(String),
    #[error(
        "bad tuple {0:?}: use ADDR/PROTO or ADDR:SRCPORT/PROTO, with [brackets] around IPv6 when a port follows (10.0.0.2:40000/tcp, [2001:db8::2]/udp)"
    )]
    Tuple(String),
    #[error(
        "bad prefix {0:?}: use ADDR/LEN such as 10.0.0.0/24 or 2001:db8::/32 (LEN up to 32 for IPv4, 128 for IPv6)"
    )]
    Prefix(String),
    #[error("bad duration {0:?}: use a number with a unit, such as 1500ms, 60s, 5m, 1h or 30d")]
    Duration(String),
    #[error("duration {0:?} is zero: use a positive duration such as 60s")]
    ZeroDuration(String),
    #[error("bad size {0:?}: use a positive number of bytes with a unit, such as 512KiB, 100MiB or 1GiB")]
    Size(String),
    #[error("{0:?} is not HOST:PORT (for example 127.0.0.1:8080 or [::1]:8080)")]
    Upstream(String),
    #[error(
        "bad destination {0:?}: use CIDR:PORTS such as 192.168.1.0/24:80, 10.0.0.5:8000-8100 or [2001:db8::/64]:443"
    )]
    AllowedDest(String),
}

/// A transport the gate knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP and ICMPv6 echo.
    Icmp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => proto::TCP,
            Proto::Udp => proto::UDP,
            Proto::Icmp => proto::ICMP,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            proto::TCP => Some(Proto::Tcp),
            proto::UDP => Some(Proto::Udp),
            proto::ICMP => Some(Proto::Icmp),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

impl FromStr for Proto {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "icmp" | "icmpv6" => Ok(Proto::Icmp),
            _ => Err(SpecError::Protocol(s.to_string())),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn port(s: &str) -> Result<u16, SpecError> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(SpecError::Port(s.to_string())),
    }
}

/// An inclusive destination-port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange { lo: 1, hi: 65535 };
}

impl FromStr for PortRange {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SpecError::PortRange(s.to_string());
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (port(lo.trim()).map_err(|_| bad())?, port(hi.trim()).map_err(|_| bad())?),
            None => {
                let p = port(s.trim()).map_err(|_| bad())?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(bad());
        }
        Ok(PortRange { lo, hi })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A set of TCP/UDP port ranges and, optionally, echo: what the gate
/// protects (`--protect`), and what a client may open (`--allow`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet {
    pub ranges: Vec<(Proto, PortRange)>,
    pub echo: bool,
}

impl PortSet {
    /// Every TCP and UDP port and echo requests.
    pub fn all() -> Self {
        PortSet {
            ranges: vec![(Proto::Tcp, PortRange::ALL), (Proto::Udp, PortRange::ALL)],
            echo: true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && !self.echo
    }

    /// The set with one port of `proto` taken out of its ranges.
    pub fn without(&self, proto: Proto, port: u16) -> PortSet {
        let mut ranges = Vec::with_capacity(self.ranges.len() + 1);
        for &(p, r) in &self.ranges {
            if p != proto || port < r.lo || r.hi < port {
                ranges.push((p, r));
                continue;
            }
            if r.lo < port {
                ranges.push((p, PortRange { lo: r.lo, hi: port - 1 }));
            }
            if port < r.hi {
                ranges.push((p, PortRange { lo: port + 1, hi: r.hi }));
            }
        }
        PortSet {
            ranges,
            echo: self.echo,
        }
    }

    /// Whether the set holds all of `ports` for `proto` (echo for icmp),
    /// inside one of its ranges.
    pub fn covers(&self, proto: Proto, ports: PortRange) -> bool {
        match proto {
            Proto::Icmp => self.echo,
            p => self
                .ranges
                .iter()
                .any(|&(q, r)| q == p && r.lo <= ports.lo && ports.hi <= r.hi),
        }
    }
}

impl FromStr for PortSet {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut spec = PortSet::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let lower = item.to_ascii_lowercase();
            if lower == "all" {
                return Ok(PortSet::all());
            }
            if lower == "icmp" || lower == "icmpv6" {
                spec.echo = true;
                continue;
            }
            let (p, r) = item
                .split_once('/')
                .ok_or_else(|| SpecError::Protect(item.to_string()))?;
            let p = p.parse::<Proto>()?;
            if p == Proto::Icmp {
                return Err(SpecError::Protect(item.to_string()));
            }
            spec.ranges.push((p, r.parse()?));
        }
        if spec.is_empty() {
            return Err(SpecError::Protect(s.to_string()));
        }
        Ok(spec)
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = self.ranges.iter().map(|(p, r)| format!("{p}/{r}")).collect();
        if self.echo {
            items.push("icmp".into());
        }
        f.write_str(&items.join(","))
    }
}

/// An IP address as the maps store it: IPv6, or IPv4-mapped IPv6.
pub fn map_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => mapped_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`map_addr`]: IPv4-mapped addresses come back as IPv4.
pub fn unmap_addr(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn addr(s: &str) -> Result<IpAddr, SpecError> {
    s.parse::<IpAddr>().map_err(|_| SpecError::Address(s.to_string()))
}

/// A whitelist key as typed: `ADDR[:SRCPORT]/PROTO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub addr: IpAddr,
    /// `None` matches any source port.
    pub src_port: Option<u16>,
    pub proto: Proto,
}

impl FromStr for Tuple {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SpecError::Tuple(s.to_string());
        let (host, proto) = s.rsplit_once('/').ok_or_else(bad)?;
        let proto = proto.parse::<Proto>()?;
        let (addr_s, port_s) = if let Some(rest) = host.strip_prefix('[') {
            let (a, after) = rest.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (a, None),
                p => (a, Some(p.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else if host.matches(':').count() == 1 {
            let (a, p) = host.split_once(':').ok_or_else(bad)?;
            (a, Some(p))
        } else {
            (host, None)
        };
        let addr = addr(addr_s)?;
        let src_port = port_s.map(port).transpose()?;
        if src_port.is_some() && proto == Proto::Icmp {
            return Err(bad());
        }
        Ok(Tuple { addr, src_port, proto })
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.addr, self.src_port) {
            (IpAddr::V6(a), Some(p)) => write!(f, "[{a}]:{p}/{}", self.proto),
            (a, Some(p)) => write!(f, "{a}:{p}/{}", self.proto),
            (a, None) => write!(f, "{a}/{}", self.proto),
        }
    }
}

/// An address prefix (`10.0.0.0/24`, `2001:db8::/32`, or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Prefix length over the 16-byte mapped address the LPM trie keys on.
    pub fn mapped_len(&self) -> u32 {
        match self.addr {
            IpAddr::V4(_) => 96 + self.len as u32,
            IpAddr::V6(_) => self.len as u32,
        }
    }

    /// The mapped address with host bits cleared, as the LPM trie keys on.
    pub fn mapped_network(&self) -> [u8; 16] {
        let mut bytes = map_addr(self.addr);
        let keep = self.mapped_len() as usize;
        for (i, b) in bytes.iter_mut().enumerate() {
            let bits_here = keep.saturating_sub(i * 8).min(8);
            *b &= if bits_here == 0 { 0 } else { 0xffu8 << (8 - bits_here) };
        }
        bytes
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let probe = Prefix {
            addr: ip,
            len: self.len,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && probe.mapped_network() == self.mapped_network()
    }

    /// From a trie key back to what an operator would type.
    pub fn from_mapped(bytes: [u8; 16], mapped_len: u32) -> Prefix {
        let addr = unmap_addr(bytes);
        let len = match addr {
            IpAddr::V4(_) => mapped_len.saturating_sub(96),
            IpAddr::V6(_) => mapped_len,
        } as u8;
        Prefix { addr, len }
    }
}

impl FromStr for Prefix {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SpecError::Prefix(s.to_string());
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (addr(a).map_err(|_| bad())?, Some(l.parse::<u8>().map_err(|_| bad())?)),
            None => (addr(s).map_err(|_| bad())?, None),
        };
        let max = if a.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        if len > max {
            return Err(bad());
        }
        let p = Prefix { addr: a, len };
        Ok(Prefix {
            addr: Prefix::from_mapped(p.mapped_network(), p.mapped_len()).addr,
            len,
        })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Destinations a SOCKS5 agent lets visitors reach: `CIDR:PORTS`, such as
/// `192.168.1.0/24:80`, `10.0.0.5:8000-8100` or `[2001:db8::/64]:443`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowedDest {
    pub prefix: Prefix,
    pub ports: PortRange,
}

impl AllowedDest {
    pub fn admits(&self, to: SocketAddr) -> bool {
        self.prefix.contains(to.ip()) && (self.ports.lo..=self.ports.hi).contains(&to.port())
    }
}

impl FromStr for AllowedDest {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SpecError::AllowedDest(s.to_string());
        let (prefix, ports) = s.trim().rsplit_once(':').ok_or_else(bad)?;
        let prefix = prefix
            .strip_prefix('[')
            .and_then(|p| p.strip_suffix(']'))
            .unwrap_or(prefix);
        Ok(AllowedDest {
            prefix: prefix.parse().map_err(|_| bad())?,
            ports: ports.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for AllowedDest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix.addr {
            IpAddr::V4(_) => write!(f, "{}:{}", self.prefix, self.ports),
            IpAddr::V6(_) => write!(f, "[{}]:{}", self.prefix, self.ports),
        }
    }
}

/// Parses `1500ms`, `60s`, `5m`, `1h`, `30d`; zero is refused.
pub fn duration(s: &str) -> Result<Duration, SpecError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| SpecError::Duration(s.to_string()))?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => None,
    }
    .ok_or_else(|| SpecError::Duration(s.to_string()))?;
    if d.is_zero() {
        return Err(SpecError::ZeroDuration(s.to_string()));
    }
    Ok(d)
}

/// Checks a `HOST:PORT` upstream as given on the command line or in a
/// client record; it is resolved when a session needs it.
pub fn upstream(s: &str) -> Result<String, SpecError> {
    let bad = || SpecError::Upstream(s.to_string());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(s.to_string())
}

/// Parses `4096`, `512KiB`, `100MiB`, `1GiB` (also `KB`, `MB`, `GB` as
/// powers of 1000); zero is refused.
pub fn size(s: &str) -> Result<u64, SpecError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| SpecError::Size(s.to_string()))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(SpecError::Size(s.to_string())),
    };
    match n.checked_mul(mult) {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => Err(SpecError::Size(s.to_string())),
    }
}

/// A duration as `duration` would read it back, in its largest whole unit.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}s", ms / 1000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_destinations_admit_their_network_and_ports_only() {
        let net: AllowedDest = "192.168.77.2/31:8081".parse().unwrap();
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(net.admits(at("192.168.77.2:8081")) && net.admits(at("192.168.77.3:8081")));
        assert!(!net.admits(at("192.168.77.1:8081")), "outside the prefix");
        assert!(!net.admits(at("192.168.77.2:22")), "outside the ports");
        assert!(
            net.admits(at("[::ffff:192.168.77.2]:8081")),
            "a mapped address is the IPv4 one"
        );
        let v6: AllowedDest = "[2001:db8::/64]:443-444".parse().unwrap();
        assert!(v6.admits(at("[2001:db8::9]:444")) && !v6.admits(at("[2001:db9::9]:443")));
        assert_eq!(v6.to_string(), "[2001:db8::/64]:443-444");
        for bad in ["192.168.77.0/24", "192.168.77.0/33:80", "host:80", "10.0.0.1:0", ""] {
            assert!(bad.parse::<AllowedDest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_and_ranges() {
        assert_eq!("22".parse::<PortRange>(), Ok(PortRange { lo: 22, hi: 22 }));
        assert_eq!("8000-8100".parse::<PortRange>(), Ok(PortRange { lo: 8000, hi: 8100 }));
        for bad in ["0", "65536", "9-8", "x", "", "1-0", "-5"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn protect_lists() {
        let s: PortSet = "tcp/22,tcp/8000-8100, udp/53,icmp".parse().unwrap();
        assert_eq!(s.ranges.len(), 3);
        assert!(s.echo);
        assert_eq!(s.to_string(), "tcp/22,tcp/8000-8100,udp/53,icmp");
        assert_eq!("ALL".parse::<PortSet>().unwrap(), PortSet::all());
        for bad in ["tcp/0", "sctp/5", "tcp", "icmp/8", "", ","] {
            assert!(bad.parse::<PortSet>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn taking_a_port_out() {
        let all = PortSet::all().without(Proto::Tcp, 443);
        assert_eq!(all.to_string(), "tcp/1-442,tcp/444-65535,udp/1-65535,icmp");
        let edges: PortSet = "tcp/443,tcp/443-500,tcp/1-443,udp/443".parse().unwrap();
        assert_eq!(
            edges.without(Proto::Tcp, 443).to_string(),
            "tcp/444-500,tcp/1-442,udp/443"
        );
    }

    #[test]
    fn tuples() {
        let t: Tuple = "10.0.0.2:40000/tcp".parse().unwrap();
        assert_eq!((t.src_port, t.proto), (Some(40000), Proto::Tcp));
        let t: Tuple = "2001:db8::2/udp".parse().unwrap();
        assert_eq!(t.src_port, None);
        let t: Tuple = "[2001:db8::2]:53/udp".parse().unwrap();
        assert_eq!(t.to_string(), "[2001:db8::2]:53/udp");
        for bad in [
            "10.0.0.2",
            "10.0.0.2:0/tcp",
            "10.0.0.2/gre",
            "1.2.3/tcp",
            "10.0.0.2:5/icmp",
            "[::1:5/tcp",
        ] {
            assert!(bad.parse::<Tuple>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn prefixes_are_normalised() {
        let p: Prefix = "10.1.2.3/24".parse().unwrap();
        assert_eq!(p.to_string(), "10.1.2.0/24");
        assert_eq!(p.mapped_len(), 120);
        assert_eq!("2001:db8::1".parse::<Prefix>().unwrap().len, 128);
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("nope/8".parse::<Prefix>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(duration("0s"), Err(SpecError::ZeroDuration("0s".into())));
        for bad in ["", "s", "10", "10y", "-1s", "99999999999999999999d"] {
            assert!(duration(bad).is_err(), "{bad} must be refused");
        }
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        for ok in ["127.0.0.1:8080", "[::1]:443", "service.local:80"] {
            assert_eq!(upstream(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "8080", "host:", ":80", "host:0", "host:70000", "a b:80"] {
            assert!(upstream(bad).is_err(), "{bad}");
        }
        assert_eq!(size("100MiB"), Ok(100 << 20));
        assert_eq!(size("2KB"), Ok(2000));
        assert_eq!(size("4096"), Ok(4096));
        for bad in ["", "0", "MiB", "5TB", "-1MiB", "99999999999999GiB"] {
            assert!(size(bad).is_err(), "{bad} must be refused");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
    }
}
