//! Records the XDP program puts in the EVENTS ring: diverted knocks and
//! sampled audit-mode would-drop packets.

use std::net::IpAddr;

use gatekeeper_common::{
    decide::Reason,
    maps::{EVENT_AUDIT_SAMPLE, EVENT_KNOCK, Event},
};

use crate::spec::unmap_addr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Knock,
    AuditSample(Option<Reason>),
}

/// One decoded ring record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diverted {
    pub kind: Kind,
    pub ifindex: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// The L4 payload for knocks; empty for audit samples.
    pub payload: Vec<u8>,
}

/// Decodes one ring record; `None` for records of an unknown kind or size
/// (a newer or older XDP program), which the caller counts and skips.
pub fn decode(bytes: &[u8]) -> Option<Diverted> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: the length is checked above and `Event` is plain old data.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Event) };
    let kind = match ev.kind {
        EVENT_KNOCK => Kind::Knock,
        EVENT_AUDIT_SAMPLE => Kind::AuditSample(Reason::from_u8(ev.reason)),
        _ => return None,
    };
    let len = (ev.payload_len as usize).min(ev.payload.len());
    Some(Diverted {
        kind,
        ifindex: ev.ifindex,
        src: unmap_addr(ev.src),
        dst: unmap_addr(ev.dst),
        sport: ev.sport,
        dport: ev.dport,
        proto: ev.proto,
        tcp_flags: ev.tcp_flags,
        payload: ev.payload[..len].to_vec(),
    })
}
