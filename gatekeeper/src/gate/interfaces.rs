//! The network interfaces of the namespace the daemon runs in, read over
//! rtnetlink: that is namespace-aware, where `/sys/class/net` shows the
//! namespace that mounted sysfs (not the one a daemon entered with
//! `nsenter --net`). The gate uses it to find interfaces that receive
//! traffic for local addresses but are not gated, by which protected ports
//! could be reached around the gate.

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum InterfacesError {
    #[error("listing the network interfaces over rtnetlink")]
    Io(#[from] std::io::Error),
    #[error("listing the network interfaces: a reply rtnetlink could not decode ({0})")]
    Decode(String),
    #[error("listing the network interfaces: the kernel answered error {0}")]
    Kernel(i32),
}

/// One interface, as far as the gate cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// `vxlan`, `wireguard`, `gre`, `veth`...; `None` for plain devices.
    pub kind: Option<String>,
    pub up: bool,
    pub loopback: bool,
    /// A port of a bridge or bond: its traffic is received by that master.
    pub enslaved: bool,
    /// The device hands over bare IP packets, not Ethernet frames.
    pub bare_ip: bool,
    /// How an XDP program runs on it, as the kernel reports it, if one does.
    pub xdp: Option<&'static str>,
}

impl Interface {
    /// Whether traffic for the host's own addresses can arrive here:
    /// an interface that is up, not loopback, and not a port of another.
    pub fn receives_local(&self) -> bool {
        self.up && !self.loopback && !self.enslaved
    }

    fn from_message(msg: &LinkMessage) -> Option<Interface> {
        let mut name = None;
        let mut kind = None;
        let mut enslaved = false;
        let mut xdp = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Controller(_) => enslaved = true,
                LinkAttribute::Xdp(attrs) => {
                    for a in attrs {
                        if let LinkXdp::Attached(how) = a {
                            xdp = match how {
                                XdpAttached::None => None,
                                XdpAttached::Driver => Some("native (driver)"),
                                XdpAttached::SocketBuffer => Some("generic (skb)"),
                                XdpAttached::Hardware => Some("offloaded (hardware)"),
                                _ => Some("several modes"),
                            };
                        }
                    }
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        let flags = msg.header.flags;
        Some(Interface {
            name: name?,
            kind,
            up: flags.contains(LinkFlags::Up),
            loopback: flags.contains(LinkFlags::Loopback),
            enslaved,
            bare_ip: matches!(
                msg.header.link_layer_type,
                LinkLayerType::None
                    | LinkLayerType::Tunnel
                    | LinkLayerType::Tunnel6
                    | LinkLayerType::Sit
                    | LinkLayerType::Ipgre
                    | LinkLayerType::Ip6gre
            ),
            xdp,
        })
    }
}

/// Every interface of the current network namespace, in the kernel's order.
pub fn list() -> Result<Vec<Interface>, InterfacesError> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    request.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut out = Vec::new();
    let mut received = vec![0; 64 * 1024];
    // A dump ends with NLMSG_DONE; a namespace with more interfaces than
    // fit this many replies is beyond what the gate covers anyway.
    for _ in 0..10_000 {
        let size = socket.recv(&mut &mut received[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(&received[offset..size])
                .map_err(|e| InterfacesError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(InterfacesError::Kernel(e.code.map_or(0, |c| c.get())));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    out.extend(Interface::from_message(&link));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_namespace_has_a_loopback_that_receives_nothing_from_outside() {
        let all = super::list().expect("rtnetlink answers");
        let lo = all.iter().find(|i| i.name == "lo").expect("every namespace has lo");
        assert!(lo.loopback && !lo.receives_local());
    }
}
