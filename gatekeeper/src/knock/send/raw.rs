//! Raw sockets for knocks that ride in a TCP SYN or an ICMP echo request.
//! The kernel writes the IP header; we write the TCP or ICMP header.

use std::net::{IpAddr, SocketAddr};

use rand_core::{OsRng, RngCore};
use socket2::{Domain, Protocol, Socket, Type};

use super::ClientError;
use crate::platform;

/// IANA protocol numbers, for the pseudo-header and the socket.
const TCP: u8 = 6;
const ICMP: i32 = 1;
const ICMPV6: i32 = 58;

/// Sends `bytes` (a TCP or ICMP header and what follows) to `to` through
/// a raw socket for `proto`.
fn send_raw(to: IpAddr, proto: i32, bytes: &[u8], what: &'static str) -> Result<(), ClientError> {
    let domain = if to.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let sock = Socket::new(domain, Type::RAW, Some(Protocol::from(proto))).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::NeedsRaw {
            what,
            needs: platform::RAW_SOCKET_NEEDS,
        },
        _ => ClientError::Io {
            what: what.to_string(),
            source: e,
        },
    })?;
    sock.send_to(bytes, &SocketAddr::new(to, 0).into())
        .map_err(|source| ClientError::Io {
            what: what.to_string(),
            source,
        })?;
    Ok(())
}

/// The Internet checksum (RFC 1071) over `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for b in parts.iter().flat_map(|p| p.iter().copied()) {
        match odd.take() {
            None => odd = Some(b),
            Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A port in the usual ephemeral range, for a SYN knock's source.
pub fn ephemeral_port() -> u16 {
    32768 + (OsRng.next_u32() % 28000) as u16
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;

/// Sends a SYN carrying `payload` from `src:sport` to `dst:dport`, then a
/// RST for the same tuple. The gateway never answers the SYN, so a NAT or
/// firewall on the way would keep tracking it as half-open and then refuse
/// the real connection's different sequence numbers; the RST closes that
/// tracking, and the real SYN starts afresh on the same tuple.
pub fn send_syn(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Result<(), ClientError> {
    let seq = OsRng.next_u32();
    send_tcp(src, sport, dst, dport, seq, SYN, payload)?;
    send_tcp(src, sport, dst, dport, seq.wrapping_add(1), RST, &[])
}

fn send_tcp(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    seq: u32,
    flags: u8,
    payload: &[u8],
) -> Result<(), ClientError> {
    const WHAT: &str = "a TCP SYN knock";
    if !platform::RAW_TCP {
        return Err(ClientError::NoRawTcp);
    }
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0, 5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let len = (tcp.len() as u32).to_be_bytes();
    let pseudo: Vec<u8> = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [&s.octets()[..], &d.octets(), &[0, TCP], &len[2..]].concat(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [&s.octets()[..], &d.octets(), &len, &[0, 0, 0, TCP]].concat(),
        _ => {
            return Err(ClientError::Io {
                what: WHAT.into(),
                source: std::io::Error::other("source and server address families differ"),
            });
        }
    };
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    send_raw(dst, i32::from(TCP), &tcp, WHAT)
}

/// Sends an echo request carrying `payload` to `dst`.
pub fn send_echo(dst: IpAddr, payload: &[u8]) -> Result<(), ClientError> {
    const WHAT: &str = "an ICMP echo knock";
    let (proto, typ) = if dst.is_ipv4() {
        (ICMP, 8u8)
    } else {
        // The kernel fills in ICMPv6 checksums on raw sockets.
        (ICMPV6, 128u8)
    };
    let id = (OsRng.next_u32() & 0xffff) as u16;
    let mut icmp = vec![typ, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(payload);
    if dst.is_ipv4() {
        let sum = checksum(&[&icmp]);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    send_raw(dst, proto, &icmp, WHAT)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc1071_example() {
        // The worked example from RFC 1071 section 3.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(super::checksum(&[&data]), !0xddf2);
        assert_eq!(
            super::checksum(&[&data[..3], &data[3..]]),
            !0xddf2,
            "split parts sum the same"
        );
    }
}
