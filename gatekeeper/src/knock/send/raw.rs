//! Raw sockets for knocks that ride in a TCP SYN or an ICMP echo request.
//! The kernel writes the IP header; we write the TCP or ICMP header.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use rand_core::{OsRng, RngCore};

use super::ClientError;

fn raw_socket(family: i32, proto: i32, what: &'static str) -> Result<OwnedFd, ClientError> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => ClientError::NeedsRaw { what },
            _ => ClientError::Io {
                what: what.to_string(),
                source: e,
            },
        });
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_to(fd: &OwnedFd, bytes: &[u8], to: IpAddr, what: &'static str) -> Result<(), ClientError> {
    let addr: socket2::SockAddr = SocketAddr::new(to, 0).into();
    // SAFETY: `bytes` and `addr` are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            addr.as_ptr().cast(),
            addr.len(),
        )
    };
    if n < 0 {
        return Err(ClientError::Io {
            what: what.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
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
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0, 5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let len = (tcp.len() as u32).to_be_bytes();
    let pseudo: Vec<u8> = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            [&s.octets()[..], &d.octets(), &[0, libc::IPPROTO_TCP as u8], &len[2..]].concat()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            [&s.octets()[..], &d.octets(), &len, &[0, 0, 0, libc::IPPROTO_TCP as u8]].concat()
        }
        _ => {
            return Err(ClientError::Io {
                what: WHAT.into(),
                source: std::io::Error::other("source and server address families differ"),
            });
        }
    };
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let family = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = raw_socket(family, libc::IPPROTO_TCP, WHAT)?;
    send_to(&fd, &tcp, dst, WHAT)
}

/// Sends an echo request carrying `payload` to `dst`.
pub fn send_echo(dst: IpAddr, payload: &[u8]) -> Result<(), ClientError> {
    const WHAT: &str = "an ICMP echo knock";
    let (family, proto, typ) = if dst.is_ipv4() {
        (libc::AF_INET, libc::IPPROTO_ICMP, 8u8)
    } else {
        // The kernel fills in ICMPv6 checksums on raw sockets.
        (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8)
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
    let fd = raw_socket(family, proto, WHAT)?;
    send_to(&fd, &icmp, dst, WHAT)
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
