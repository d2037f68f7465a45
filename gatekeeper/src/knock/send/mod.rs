//! The client side of knocks: build one from a credential, send it over
//! UDP, ICMP echo or a TCP SYN, and (`connect`) knock-then-connect.
//!
//! - [`raw`]: the raw sockets SYN and echo knocks need.

pub mod raw;

use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket},
    sync::Mutex,
    time::{Duration, Instant},
};

use rand_core::{OsRng, RngCore};
use thiserror::Error;
use x25519_dalek::PublicKey;

use super::{
    Carrier,
    credential::Credential,
    journal::{Journal, target_text},
    keys::{self, KeyError, KeyId, SessionKey},
    payload::Payload,
    wire::{self, NONCE_LEN, WireError},
};
use crate::{
    clock::unix_now,
    spec::{PortRange, Proto},
};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("the credential's keys")]
    Key(#[from] KeyError),
    #[error("the credential names no server: pass --server ADDR")]
    NoServer,
    #[error("the credential holds no secret key: load it with its key file")]
    NoSecret,
    #[error("resolving the gateway's name {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("TLS setup")]
    Tls(#[from] tunnel::tls::TlsError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} needs a raw socket, which needs {needs}; a UDP knock (--via udp) needs neither")]
    NeedsRaw { what: &'static str, needs: &'static str },
    #[error("this system sends no TCP SYN it did not make itself: knock with --via udp (or icmp)")]
    NoRawTcp,
    #[error(
        "a knock inside a TLS ClientHello is not a packet of its own: use `gatekeeper portal` or `connect --portal`"
    )]
    NotAPacket,
}

/// What to ask the gateway for.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub proto: Proto,
    pub ports: PortRange,
    /// Source port to bind (SYN knocks always bind theirs).
    pub source_port: Option<u16>,
}

pub struct Knocker {
    cred: Credential,
    key_id: KeyId,
    key: SessionKey,
    /// The device's and the gateway's public keys, which v2 knocks need.
    public: PublicKey,
    server: PublicKey,
    /// Read once: the portal client seals a knock per connection.
    hostname: String,
    /// The gateway's address as last resolved, and when: a long-running
    /// client resolves its name again after [`RESOLVED_FOR`].
    resolved: Mutex<Option<(Instant, IpAddr)>>,
    /// Where each knock sent is recorded, if anywhere.
    journal: Option<Journal>,
}

/// How long a resolved gateway name is used before it is resolved again.
const RESOLVED_FOR: Duration = Duration::from_secs(30);

/// The source address the kernel picks to reach `server`.
pub fn local_addr_for(server: IpAddr) -> Result<IpAddr, ClientError> {
    let io = |source| ClientError::Io {
        what: format!("finding a route to {server}"),
        source,
    };
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(any).map_err(io)?;
    sock.connect((server, 9)).map_err(io)?;
    Ok(sock.local_addr().map_err(io)?.ip())
}

impl Knocker {
    pub fn new(cred: Credential) -> Result<Knocker, ClientError> {
        let secret = keys::decode_secret(cred.secret_key.as_deref().ok_or(ClientError::NoSecret)?)?;
        let server = keys::decode_public(&cred.server_public_key)?;
        let key_id = keys::key_id(&PublicKey::from(&secret));
        let key = keys::session_key(&secret, &server, &key_id, &server)?;
        Ok(Knocker {
            cred,
            key_id,
            key,
            public: PublicKey::from(&secret),
            server,
            hostname: crate::platform::hostname(),
            resolved: Mutex::new(None),
            journal: None,
        })
    }

    /// Records every knock sent in `journal`.
    pub fn with_journal(mut self, journal: Option<Journal>) -> Knocker {
        self.journal = journal;
        self
    }

    /// Records the knock `packet` sent to `target` asking for `req`, and
    /// what the device saw come of it.
    pub fn record(&self, packet: &[u8], via: Carrier, target: String, req: &Request, outcome: &str) {
        if let Some(j) = &self.journal {
            let request = match req.proto {
                Proto::Icmp => "icmp".to_string(),
                p => format!("{p}/{}", req.ports),
            };
            j.record(packet, &self.cred.name, via, target, request, outcome);
        }
    }

    pub fn name(&self) -> &str {
        &self.cred.name
    }

    /// The key id v1 knocks carry in the clear (and v2 knocks hide).
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    pub fn knock_port(&self) -> u16 {
        self.cred.knock_port
    }

    /// The gateway's tunnel listener, where `client refresh` asks for its keys.
    pub fn tunnel_port(&self) -> u16 {
        self.cred.tunnel_port.unwrap_or(crate::tunnels::DEFAULT_TUNNEL_PORT)
    }

    /// `--server` if given, else the credential's first server: an
    /// address, or a name resolved now (or within the last
    /// [`RESOLVED_FOR`]).
    pub fn server(&self, given: Option<IpAddr>) -> Result<IpAddr, ClientError> {
        if let Some(ip) = given {
            return Ok(ip);
        }
        let host = self.cred.servers.first().ok_or(ClientError::NoServer)?;
        if let Ok(ip) = host.parse() {
            return Ok(ip);
        }
        let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, ip)) = *resolved
            && at.elapsed() < RESOLVED_FOR
        {
            return Ok(ip);
        }
        let resolve = |source| ClientError::Resolve {
            host: host.clone(),
            source,
        };
        let ip = (host.as_str(), 0)
            .to_socket_addrs()
            .map_err(resolve)?
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| resolve(std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))?;
        *resolved = Some((Instant::now(), ip));
        Ok(ip)
    }

    /// The payload a knock for `req` to `server` from `local_port` carries.
    pub fn payload(&self, server: IpAddr, req: &Request, local_port: u16) -> Result<Payload, ClientError> {
        let local = SocketAddr::new(local_addr_for(server)?, local_port);
        Ok(self.payload_from(server, req, local))
    }

    /// The payload of a knock sent from `local`, known already (a connected socket).
    pub fn payload_from(&self, server: IpAddr, req: &Request, local: SocketAddr) -> Payload {
        Payload {
            timestamp: unix_now(),
            client_id: self.cred.name.clone(),
            protocol: req.proto.name().to_string(),
            server_ip: server,
            start_port: req.ports.lo,
            end_port: req.ports.hi,
            local_ip: local.ip().to_canonical(),
            local_port: local.port(),
            platform: std::env::consts::OS.to_string(),
            hostname: self.hostname.clone(),
        }
    }

    /// Seals `payload` with a fresh random nonce.
    pub fn seal(&self, payload: &Payload) -> Result<Vec<u8>, ClientError> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        self.seal_with_nonce(payload, &nonce)
    }

    /// Seals `payload` with `nonce`, which must never repeat for this
    /// credential (the portal derives it from a ClientHello): as a v2
    /// knock when the credential says the gateway reads them, else v1.
    pub fn seal_with_nonce(&self, payload: &Payload, nonce: &[u8; NONCE_LEN]) -> Result<Vec<u8>, ClientError> {
        if self.cred.knock_version.unwrap_or(1) >= 2 {
            let ephemeral = keys::generate();
            return Ok(wire::v2::seal(
                &self.public,
                &self.key,
                &self.server,
                &ephemeral,
                nonce,
                payload,
            )?);
        }
        Ok(wire::seal(&self.key_id, &self.key, nonce, payload)?)
    }

    /// The pinned fingerprint of the gateway's certificate, if the
    /// credential carries one.
    pub fn tls_fingerprint(&self) -> Option<&str> {
        self.cred.tls_fingerprint.as_deref()
    }

    /// Seals a knock for `req` to `server`, sent from `local_port`.
    pub fn build(&self, server: IpAddr, req: &Request, local_port: u16) -> Result<Vec<u8>, ClientError> {
        self.seal(&self.payload(server, req, local_port)?)
    }

    /// Sends one knock and records it as `sent`; returns the source port
    /// it left from (0 for echo).
    pub fn send(&self, server: IpAddr, req: &Request, via: Carrier) -> Result<u16, ClientError> {
        let (port, packet, target) = self.transmit(server, req, via)?;
        self.record(&packet, via, target, req, "sent");
        Ok(port)
    }

    /// Sends one knock; the source port it left from (0 for echo), the
    /// packet, and where it went.
    fn transmit(&self, server: IpAddr, req: &Request, via: Carrier) -> Result<(u16, Vec<u8>, String), ClientError> {
        match via {
            Carrier::Udp => {
                let io = |source| ClientError::Io {
                    what: format!("sending a UDP knock to {server}"),
                    source,
                };
                let any: IpAddr = if server.is_ipv4() {
                    "0.0.0.0".parse().expect("literal")
                } else {
                    "::".parse().expect("literal")
                };
                let sock = UdpSocket::bind((any, req.source_port.unwrap_or(0))).map_err(io)?;
                let port = sock.local_addr().map_err(io)?.port();
                let packet = self.build(server, req, req.source_port.unwrap_or(0))?;
                sock.send_to(&packet, (server, self.cred.knock_port)).map_err(io)?;
                Ok((port, packet, target_text(server, Some(self.cred.knock_port))))
            }
            Carrier::Icmp => {
                let packet = self.build(server, req, 0)?;
                raw::send_echo(server, &packet)?;
                Ok((0, packet, target_text(server, None)))
            }
            Carrier::ClientHello => Err(ClientError::NotAPacket),
            Carrier::Syn => {
                let sport = req.source_port.unwrap_or_else(raw::ephemeral_port);
                let packet = self.build(server, req, sport)?;
                raw::send_syn(local_addr_for(server)?, sport, server, req.ports.lo, &packet)?;
                Ok((sport, packet, target_text(server, Some(req.ports.lo))))
            }
        }
    }
}

/// Connects from `sport`; `None` when it does not come up in time.
fn connect_from(target: SocketAddr, sport: u16, timeout: Duration) -> Result<Option<std::net::TcpStream>, ClientError> {
    let io = |what: String| move |source| ClientError::Io { what, source };
    let domain = if target.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(io("opening a socket".into()))?;
    sock.set_reuse_address(true)
        .map_err(io("setting SO_REUSEADDR".into()))?;
    let any: IpAddr = if target.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    sock.bind(&SocketAddr::new(any, sport).into())
        .map_err(io(format!("binding source port {sport}")))?;
    match sock.connect_timeout(&target.into(), timeout) {
        Ok(()) => Ok(Some(sock.into())),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => Ok(None),
        Err(e) => Err(ClientError::Io {
            what: format!("connecting to {target}"),
            source: e,
        }),
    }
}

impl Knocker {
    /// Knocks for `target`'s TCP port (with a SYN, or a UDP knock that
    /// binds the source port: no raw socket needed), then connects from
    /// the same source port; knocks once more if the connection does not
    /// come up within `timeout`.
    pub fn knock_and_connect(
        &self,
        target: SocketAddr,
        timeout: Duration,
        via: Carrier,
    ) -> Result<Option<std::net::TcpStream>, ClientError> {
        for _attempt in 0..2 {
            let sport = raw::ephemeral_port();
            let req = Request {
                proto: Proto::Tcp,
                ports: PortRange {
                    lo: target.port(),
                    hi: target.port(),
                },
                source_port: Some(sport),
            };
            let (_, packet, sent_to) = self.transmit(target.ip(), &req, via)?;
            // The gateway opens within a few milliseconds of the knock.
            std::thread::sleep(Duration::from_millis(20));
            let connected = connect_from(target, sport, timeout);
            let outcome = match &connected {
                Ok(Some(_)) => "connected",
                Ok(None) => "no_answer",
                Err(_) => "failed",
            };
            self.record(&packet, via, sent_to, &req, outcome);
            if let Some(s) = connected? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }
}
