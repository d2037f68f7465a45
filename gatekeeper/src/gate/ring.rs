//! Records the XDP program puts in the EVENTS ring: diverted knocks and
//! sampled audit-mode would-drop packets.

use std::net::IpAddr;

use gatekeeper_common::{
    decide::Reason,
    maps::{EVENT_AUDIT_SAMPLE, EVENT_KNOCK, Event},
    parse::TCP_SYN,
    proto,
};

use crate::{
    knock::{Carrier, verify::Knock},
    spec::unmap_addr,
};

/// One decoded ring record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Knock(Knock),
    /// A packet audit mode passed that enforce mode would have dropped.
    AuditSample {
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        proto: u8,
        reason: Option<Reason>,
    },
}

/// Decodes one ring record; `None` for records of an unknown kind or size
/// (a newer or older XDP program), which the caller counts and skips.
pub fn decode(bytes: &[u8]) -> Option<Record> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: the length is checked above and `Event` is plain old data.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Event) };
    let (src, dst) = (unmap_addr(ev.src), unmap_addr(ev.dst));
    match ev.kind {
        EVENT_KNOCK => {
            let carrier = match ev.proto {
                proto::TCP if ev.tcp_flags & TCP_SYN != 0 => Carrier::Syn,
                proto::UDP => Carrier::Udp,
                proto::ICMP | proto::ICMPV6 => Carrier::Icmp,
                _ => return None,
            };
            let len = (ev.payload_len as usize).min(ev.payload.len());
            Some(Record::Knock(Knock {
                src,
                dst,
                sport: ev.sport,
                dport: ev.dport,
                carrier,
                payload: ev.payload[..len].to_vec(),
                seen_ns: ev.ts_ns,
            }))
        }
        EVENT_AUDIT_SAMPLE => Some(Record::AuditSample {
            src,
            sport: ev.sport,
            dst,
            dport: ev.dport,
            proto: ev.proto,
            reason: Reason::from_u8(ev.reason),
        }),
        _ => None,
    }
}
