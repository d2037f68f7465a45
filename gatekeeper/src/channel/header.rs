//! The first bytes inside every channel connection: a PROXY protocol v2
//! header naming the application's connection (its source, and the
//! destination it dialed). The inbound side trusts it because only a
//! pinned peer can have sent it, and either re-originates from that
//! source or passes the header on to a backend that reads it.

use std::net::SocketAddr;

use ppp::v2::{Addresses, Builder, Command, Header, IPv4, IPv6, Protocol, Version};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A v2 header's fixed part: signature, version/command, family, length.
const FIXED: usize = 16;
/// The largest header this side sends (IPv6 addresses, no TLVs).
const MAX_ADDRESSES: usize = 36;

#[derive(Debug, Error)]
pub enum HeaderError {
    #[error("reading the connection header")]
    Io(#[from] std::io::Error),
    #[error("the connection header is not PROXY protocol v2 with TCP addresses")]
    Malformed,
}

/// The original connection, as an application made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub client: SocketAddr,
    pub destination: SocketAddr,
}

impl Origin {
    pub fn encode(&self) -> Vec<u8> {
        let addresses: Addresses = match (self.client, self.destination) {
            (SocketAddr::V4(c), SocketAddr::V4(d)) => IPv4::new(*c.ip(), *d.ip(), c.port(), d.port()).into(),
            (c, d) => IPv6::new(v6(c.ip()), v6(d.ip()), c.port(), d.port()).into(),
        };
        Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
            .build()
            .expect("a header of addresses alone always builds")
    }

    /// Reads one header off `stream`, and nothing after it.
    pub async fn read(stream: &mut (impl AsyncRead + Unpin)) -> Result<Origin, HeaderError> {
        let mut buf = vec![0u8; FIXED];
        stream.read_exact(&mut buf).await?;
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if len > MAX_ADDRESSES {
            return Err(HeaderError::Malformed);
        }
        buf.resize(FIXED + len, 0);
        stream.read_exact(&mut buf[FIXED..]).await?;
        Origin::decode(&buf)
    }

    /// The origin named by the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Origin, HeaderError> {
        let len = match bytes.get(14..FIXED) {
            Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]) as usize,
            _ => return Err(HeaderError::Malformed),
        };
        let whole = bytes.get(..FIXED + len).ok_or(HeaderError::Malformed)?;
        let header = Header::try_from(whole).map_err(|_| HeaderError::Malformed)?;
        match header.addresses {
            Addresses::IPv4(a) => Ok(Origin {
                client: (a.source_address, a.source_port).into(),
                destination: (a.destination_address, a.destination_port).into(),
            }),
            Addresses::IPv6(a) => Ok(Origin {
                client: (a.source_address, a.source_port).into(),
                destination: (a.destination_address, a.destination_port).into(),
            }),
            _ => Err(HeaderError::Malformed),
        }
    }
}

fn v6(ip: std::net::IpAddr) -> std::net::Ipv6Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_round_trip_and_garbage_is_refused() {
        let origin = Origin {
            client: "10.0.0.1:40000".parse().unwrap(),
            destination: "10.0.0.2:22".parse().unwrap(),
        };
        let mut bytes = origin.encode();
        bytes.extend_from_slice(b"SSH-2.0");
        let mut stream = bytes.as_slice();
        assert_eq!(Origin::read(&mut stream).await.unwrap(), origin);
        assert_eq!(stream, b"SSH-2.0", "the payload after the header is left alone");

        let v6 = Origin {
            client: "[2001:db8::1]:1".parse().unwrap(),
            destination: "[2001:db8::2]:2".parse().unwrap(),
        };
        assert_eq!(Origin::read(&mut v6.encode().as_slice()).await.unwrap(), v6);

        let mut garbage = [0x55u8; 64];
        assert!(matches!(
            Origin::read(&mut garbage.as_slice()).await,
            Err(HeaderError::Malformed)
        ));
        garbage[14..16].copy_from_slice(&4000u16.to_be_bytes());
        assert!(matches!(
            Origin::read(&mut garbage.as_slice()).await,
            Err(HeaderError::Malformed)
        ));
        assert!(matches!(Origin::read(&mut &bytes[..10]).await, Err(HeaderError::Io(_))));
    }
}
