//! What travels on the relay's channels.
//!
//! ```text
//! gatekeeper:relay:AGENT:hello       agent -> nodes  'H', instance (u64): here, once a second
//! gatekeeper:relay:AGENT:down        nodes -> agent  envelopes from any node
//! gatekeeper:relay:AGENT:up:NODE     agent -> node   envelopes for one node
//! ```
//!
//! An envelope is a kind, the node's name (length-prefixed), and either a
//! handshake message (`'K'`: session id, Noise message) or a sealed one
//! (`'S'`: session id, nonce, ciphertext). Sealed, each holds one
//! [`Message`]: a kind, the request id, and the kind's fields. All
//! integers are big-endian; every length is checked before it is used, so
//! a short or garbled message is an error, never a panic.

use bytes::{Buf, BufMut, Bytes};
use thiserror::Error;

use super::session::{MAX_MESSAGE, Sessions, TAG};

/// Session id and nonce in front of each sealed message.
const SEALED_HEADER: usize = 16;
/// The most body bytes one [`Message::Data`] carries: what fits in one
/// Noise message beside the headers.
pub const CHUNK: usize = MAX_MESSAGE - TAG - SEALED_HEADER - 64;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("a malformed relay message: {0}")]
pub struct Malformed(&'static str);

/// The channel an agent says hello on.
pub fn hello_channel(agent: &str) -> String {
    format!("gatekeeper:relay:{agent}:hello")
}

/// The channel nodes send an agent everything on.
pub fn down_channel(agent: &str) -> String {
    format!("gatekeeper:relay:{agent}:down")
}

/// The channel an agent answers one node on.
pub fn up_channel(agent: &str, node: &str) -> String {
    format!("gatekeeper:relay:{agent}:up:{node}")
}

/// What a node subscribes to: every agent's hello and every agent's
/// answers to it.
pub fn node_patterns(node: &str) -> [String; 2] {
    [hello_channel("*"), up_channel("*", node)]
}

/// Which agent a channel a node receives on belongs to, and whether it is
/// a hello (else an answer): `None` for any other channel.
pub fn agent_of<'a>(channel: &'a str, node: &str) -> Option<(&'a str, bool)> {
    let rest = channel.strip_prefix("gatekeeper:relay:")?;
    if let Some(agent) = rest.strip_suffix(":hello") {
        return Some((agent, true));
    }
    let agent = rest.strip_suffix(node)?.strip_suffix(":up:")?;
    Some((agent, false))
}

/// A hello: the agent's instance, new at each start, so a node knows to
/// forget the sessions of the one before.
pub fn hello(instance: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.put_u8(b'H');
    out.put_u64(instance);
    out
}

pub fn parse_hello(mut msg: &[u8]) -> Result<u64, Malformed> {
    if msg.len() != 9 || msg.get_u8() != b'H' {
        return Err(Malformed("not a hello"));
    }
    Ok(msg.get_u64())
}

/// An envelope, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Envelope<'a> {
    Handshake {
        node: &'a str,
        id: u64,
        noise: &'a [u8],
    },
    /// As [`super::session::Sessions::open`] takes it.
    Sealed {
        node: &'a str,
        sealed: &'a [u8],
    },
}

/// Starts an envelope: its kind and the node's name.
fn envelope(kind: u8, node: &str, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + node.len() + capacity);
    out.put_u8(kind);
    // Node names are at most 64 bytes (checked where they are set).
    out.put_u8(node.len() as u8);
    out.put_slice(node.as_bytes());
    out
}

pub fn handshake(node: &str, id: u64, noise: &[u8]) -> Vec<u8> {
    let mut out = envelope(b'K', node, 8 + noise.len());
    out.put_u64(id);
    out.put_slice(noise);
    out
}

/// `msg` sealed under the current session of `sessions`, in an envelope
/// naming `node`; `None` if it would not fit in one message.
pub fn seal(node: &str, sessions: &mut Sessions, msg: &Message) -> Option<Vec<u8>> {
    let plain = msg.encode()?;
    let mut out = envelope(b'S', node, SEALED_HEADER + plain.len() + TAG);
    sessions.seal(&plain, &mut out);
    Some(out)
}

pub fn parse_envelope(mut msg: &[u8]) -> Result<Envelope<'_>, Malformed> {
    if msg.len() < 2 {
        return Err(Malformed("too short"));
    }
    let kind = msg.get_u8();
    let len = usize::from(msg.get_u8());
    if msg.len() < len {
        return Err(Malformed("the node's name runs past the end"));
    }
    let node = std::str::from_utf8(&msg[..len]).map_err(|_| Malformed("the node's name is not UTF-8"))?;
    let rest = &msg[len..];
    match kind {
        b'K' => {
            let (id, noise) = rest.split_at_checked(8).ok_or(Malformed("no session id"))?;
            let id = u64::from_be_bytes(id.try_into().map_err(|_| Malformed("no session id"))?);
            Ok(Envelope::Handshake { node, id, noise })
        }
        b'S' => Ok(Envelope::Sealed { node, sealed: rest }),
        _ => Err(Malformed("unknown envelope kind")),
    }
}

/// What a node puts in its first handshake message: the time (so an old
/// one replayed is refused) and whether the agent may serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub unix_ms: u64,
    pub standing: Standing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    Serving,
    Revoked,
    Expired,
}

impl Standing {
    /// As logs, the audit trail and the agent's last words say it.
    pub fn name(self) -> &'static str {
        match self {
            Standing::Serving => "serving",
            Standing::Revoked => "revoked",
            Standing::Expired => "expired",
        }
    }
}

impl Greeting {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        out.put_u64(self.unix_ms);
        out.put_u8(match self.standing {
            Standing::Serving => 0,
            Standing::Revoked => 1,
            Standing::Expired => 2,
        });
        out
    }

    pub fn decode(mut b: &[u8]) -> Result<Greeting, Malformed> {
        if b.len() != 9 {
            return Err(Malformed("a greeting is 9 bytes"));
        }
        let unix_ms = b.get_u64();
        let standing = match b.get_u8() {
            0 => Standing::Serving,
            1 => Standing::Revoked,
            2 => Standing::Expired,
            _ => return Err(Malformed("unknown standing")),
        };
        Ok(Greeting { unix_ms, standing })
    }
}

/// A request's or a response's first line and headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// A request's method and target; empty in a response.
    pub method: String,
    pub target: String,
    /// A response's status; 0 in a request.
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// One message inside a session, about request `id` (numbered by the node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Node to agent: a request; the agent may send `window` bytes of the
    /// response body before it hears more, and a body follows if `body`.
    Request {
        id: u64,
        head: Head,
        body: bool,
        window: u32,
    },
    /// Agent to node.
    Response { id: u64, head: Head },
    /// Body bytes, either way (at most [`CHUNK`]), from `offset` on: a
    /// receiver that finds a gap fails the request rather than pass on a
    /// body with a hole in it.
    Data { id: u64, offset: u64, bytes: Bytes },
    /// The body in this direction is complete: `length` bytes.
    End { id: u64, length: u64 },
    /// The receiver took `bytes` more: the sender may send that many more.
    Credit { id: u64, bytes: u32 },
    /// Either way: this request is over, unfinished.
    Reset { id: u64, reason: String },
}

impl Message {
    pub fn id(&self) -> u64 {
        match self {
            Message::Request { id, .. }
            | Message::Response { id, .. }
            | Message::Data { id, .. }
            | Message::End { id, .. }
            | Message::Credit { id, .. }
            | Message::Reset { id, .. } => *id,
        }
    }

    /// The plaintext; `None` if it would not fit in one message (a head
    /// with too many or too long headers).
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match self {
            Message::Request { id, head, body, window } => {
                out.put_u8(1);
                out.put_u64(*id);
                out.put_u32(*window);
                out.put_u8(u8::from(*body));
                put_head(&mut out, head)?;
            }
            Message::Response { id, head } => {
                out.put_u8(2);
                out.put_u64(*id);
                put_head(&mut out, head)?;
            }
            Message::Data { id, offset, bytes } => {
                out.reserve(17 + bytes.len());
                out.put_u8(3);
                out.put_u64(*id);
                out.put_u64(*offset);
                out.put_slice(bytes);
            }
            Message::End { id, length } => {
                out.put_u8(4);
                out.put_u64(*id);
                out.put_u64(*length);
            }
            Message::Credit { id, bytes } => {
                out.put_u8(5);
                out.put_u64(*id);
                out.put_u32(*bytes);
            }
            Message::Reset { id, reason } => {
                out.put_u8(6);
                out.put_u64(*id);
                put_str(&mut out, reason)?;
            }
        }
        (out.len() <= MAX_MESSAGE - TAG - SEALED_HEADER).then_some(out)
    }

    pub fn decode(plain: Vec<u8>) -> Result<Message, Malformed> {
        let mut b = Bytes::from(plain);
        if b.remaining() < 9 {
            return Err(Malformed("too short"));
        }
        let kind = b.get_u8();
        let id = b.get_u64();
        let msg = match kind {
            1 => {
                if b.remaining() < 5 {
                    return Err(Malformed("a request without its window"));
                }
                let window = b.get_u32();
                let body = b.get_u8() != 0;
                Message::Request {
                    id,
                    head: get_head(&mut b)?,
                    body,
                    window,
                }
            }
            2 => Message::Response {
                id,
                head: get_head(&mut b)?,
            },
            3 => {
                if b.remaining() < 8 {
                    return Err(Malformed("data without its offset"));
                }
                let offset = b.get_u64();
                return Ok(Message::Data { id, offset, bytes: b });
            }
            4 => {
                if b.remaining() < 8 {
                    return Err(Malformed("an end without its length"));
                }
                Message::End {
                    id,
                    length: b.get_u64(),
                }
            }
            5 => {
                if b.remaining() < 4 {
                    return Err(Malformed("a credit without its size"));
                }
                Message::Credit { id, bytes: b.get_u32() }
            }
            6 => Message::Reset {
                id,
                reason: get_str(&mut b)?,
            },
            _ => return Err(Malformed("unknown message kind")),
        };
        if b.has_remaining() {
            return Err(Malformed("bytes after the message"));
        }
        Ok(msg)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Option<()> {
    out.put_u16(u16::try_from(b.len()).ok()?);
    out.put_slice(b);
    Some(())
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Option<()> {
    put_bytes(out, s.as_bytes())
}

fn put_head(out: &mut Vec<u8>, head: &Head) -> Option<()> {
    put_str(out, &head.method)?;
    put_str(out, &head.target)?;
    out.put_u16(head.status);
    out.put_u16(u16::try_from(head.headers.len()).ok()?);
    for (name, value) in &head.headers {
        put_str(out, name)?;
        put_bytes(out, value)?;
    }
    Some(())
}

fn get_bytes(b: &mut Bytes) -> Result<Bytes, Malformed> {
    if b.remaining() < 2 {
        return Err(Malformed("a length runs past the end"));
    }
    let len = usize::from(b.get_u16());
    if b.remaining() < len {
        return Err(Malformed("a field runs past the end"));
    }
    Ok(b.split_to(len))
}

fn get_str(b: &mut Bytes) -> Result<String, Malformed> {
    String::from_utf8(get_bytes(b)?.to_vec()).map_err(|_| Malformed("text that is not UTF-8"))
}

fn get_head(b: &mut Bytes) -> Result<Head, Malformed> {
    let method = get_str(b)?;
    let target = get_str(b)?;
    if b.remaining() < 4 {
        return Err(Malformed("a head without its status"));
    }
    let status = b.get_u16();
    let count = b.get_u16();
    let mut headers = Vec::with_capacity(usize::from(count).min(256));
    for _ in 0..count {
        headers.push((get_str(b)?, get_bytes(b)?.to_vec()));
    }
    Ok(Head {
        method,
        target,
        status,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        let head = Head {
            method: "POST".into(),
            target: "/upload?x=1".into(),
            status: 0,
            headers: vec![
                ("host".into(), b"app.example".to_vec()),
                ("x-bin".into(), vec![0xff, 0]),
            ],
        };
        vec![
            Message::Request {
                id: 7,
                head,
                body: true,
                window: 1 << 20,
            },
            Message::Response {
                id: 7,
                head: Head {
                    status: 201,
                    ..Head::default()
                },
            },
            Message::Data {
                id: 7,
                offset: 1 << 33,
                bytes: Bytes::from(vec![1u8; CHUNK]),
            },
            Message::End { id: 7, length: 1 << 34 },
            Message::Credit { id: 7, bytes: 65_536 },
            Message::Reset {
                id: 7,
                reason: "gone".into(),
            },
        ]
    }

    #[test]
    fn every_message_survives_encoding() {
        for m in samples() {
            let plain = m.encode().expect("fits");
            assert_eq!(Message::decode(plain).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_an_error_not_a_panic() {
        for m in samples() {
            let plain = m.encode().unwrap();
            for cut in 0..plain.len().min(200) {
                let r = Message::decode(plain[..cut].to_vec());
                // A cut Data message is shorter data, which only the End
                // and the credits account for; every other kind must fail.
                if !matches!(m, Message::Data { .. }) || cut < 17 {
                    assert!(r.is_err(), "{m:?} cut at {cut}");
                }
            }
            let mut longer = plain.clone();
            longer.push(0);
            if !matches!(m, Message::Data { .. }) {
                assert!(Message::decode(longer).is_err());
            }
        }
    }

    #[test]
    fn heads_too_large_for_one_message_are_refused() {
        let head = Head {
            headers: vec![("x".into(), vec![b'a'; 60_000]), ("y".into(), vec![b'b'; 10_000])],
            ..Head::default()
        };
        assert!(Message::Response { id: 1, head }.encode().is_none());
    }

    #[test]
    fn channels_name_their_agent() {
        assert_eq!(agent_of(&hello_channel("cam-1"), "n1"), Some(("cam-1", true)));
        assert_eq!(agent_of(&up_channel("cam-1", "n1"), "n1"), Some(("cam-1", false)));
        assert_eq!(agent_of(&up_channel("cam-1", "n2"), "n1"), None);
        assert_eq!(agent_of("gatekeeper:grants", "n1"), None);
    }

    #[test]
    fn envelopes_parse_and_garbage_does_not() {
        let k = handshake("n1", 9, b"noise");
        assert_eq!(
            parse_envelope(&k).unwrap(),
            Envelope::Handshake {
                node: "n1",
                id: 9,
                noise: b"noise"
            }
        );
        for bad in [&b""[..], b"K", b"K\x09n1", b"Z\x00", b"K\x02n1abc"] {
            assert!(parse_envelope(bad).is_err(), "{bad:?}");
        }
    }
}
