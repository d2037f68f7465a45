//! What a knock says, as JSON inside the AEAD: who, when, for which gateway
//! address and which ports, and from where the client thinks it sends.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::spec::{PortRange, Proto};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Unix time in seconds when the client sent the knock.
    pub timestamp: u64,
    /// The client's name as enrolled; must match its key.
    pub client_id: String,
    /// The protocol to open: `tcp`, `udp` or `icmp`.
    pub protocol: String,
    /// The gateway address the client knocked on.
    pub server_ip: IpAddr,
    pub start_port: u16,
    pub end_port: u16,
    /// The client's own address and source port as it sees them (behind
    /// NAT they differ from what the gateway sees). A UDP or ICMP knock
    /// with a non-zero `local_port` asks for its source port to be bound.
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub platform: String,
    pub hostname: String,
}

impl Payload {
    pub fn proto(&self) -> Option<Proto> {
        self.protocol.parse().ok()
    }

    /// The requested destination ports, if they form a valid range.
    pub fn ports(&self) -> Option<PortRange> {
        (self.start_port >= 1 && self.start_port <= self.end_port).then_some(PortRange {
            lo: self.start_port,
            hi: self.end_port,
        })
    }
}
