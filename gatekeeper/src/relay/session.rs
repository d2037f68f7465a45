//! Session keys between a gateway node and an agent: a Noise KK handshake
//! (both static keys known in advance, so each side proves who it is, and
//! fresh ephemeral keys give forward secrecy), then ChaCha20-Poly1305 with
//! explicit nonces, because Redis pub/sub may lose messages and an
//! attacker with access to a channel may replay them.
//!
//! The node starts every handshake: when an agent first says hello, and
//! again to rotate. Each side then holds [`Sessions`]: the newest session,
//! which seals everything sent, and the one before it, which still opens
//! what was sealed under it until its grace window ends.

use std::time::{Duration, Instant};

use snow::{Builder, HandshakeState, StatelessTransportState, params::NoiseParams};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

const PATTERN: &str = "Noise_KK_25519_ChaChaPoly_BLAKE2s";
/// A Noise message is at most this long, tag included.
pub const MAX_MESSAGE: usize = 65_535;
/// The AEAD tag each sealed message carries.
pub const TAG: usize = 16;
/// How many nonces below the highest seen are still accepted once.
const WINDOW: u64 = 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SessionError {
    /// The handshake message did not verify: wrong keys, or garbage.
    #[error("the handshake did not verify")]
    Handshake,
    #[error("the message does not decrypt")]
    Undecryptable,
    #[error("the message was seen before, or is too old")]
    Replayed,
    #[error("no session with that id")]
    UnknownSession,
}

/// The two static keys of one node-agent pair.
#[derive(Clone)]
pub struct Keys {
    pub own: StaticSecret,
    pub peer: PublicKey,
}

impl Keys {
    fn builder(&self) -> Builder<'_> {
        // The pattern is a constant this module was written for.
        let params: NoiseParams = PATTERN.parse().expect("a valid Noise pattern");
        Builder::new(params)
    }

    fn state(&self, initiator: bool) -> Result<HandshakeState, SessionError> {
        let own = self.own.to_bytes();
        let b = self
            .builder()
            .local_private_key(&own)
            .remote_public_key(self.peer.as_bytes());
        if initiator {
            b.build_initiator()
        } else {
            b.build_responder()
        }
        .map_err(|_| SessionError::Handshake)
    }

    /// The node's first message, carrying `payload` (sealed and
    /// authenticated by both static keys).
    pub fn initiate(&self, id: u64, payload: &[u8]) -> Result<(Pending, Vec<u8>), SessionError> {
        let mut state = self.state(true)?;
        let mut msg = vec![0u8; MAX_MESSAGE];
        let n = state
            .write_message(payload, &mut msg)
            .map_err(|_| SessionError::Handshake)?;
        msg.truncate(n);
        Ok((
            Pending {
                id,
                state,
                started: Instant::now(),
            },
            msg,
        ))
    }

    /// The agent's side: reads the node's first message, returns its
    /// payload, the reply and the session it establishes.
    pub fn respond(&self, id: u64, first: &[u8]) -> Result<(Vec<u8>, Vec<u8>, Session), SessionError> {
        let mut state = self.state(false)?;
        let mut payload = vec![0u8; MAX_MESSAGE];
        let n = state
            .read_message(first, &mut payload)
            .map_err(|_| SessionError::Handshake)?;
        payload.truncate(n);
        let mut reply = vec![0u8; MAX_MESSAGE];
        let m = state
            .write_message(&[], &mut reply)
            .map_err(|_| SessionError::Handshake)?;
        reply.truncate(m);
        Ok((payload, reply, Session::new(id, state)?))
    }
}

/// A handshake the node started, waiting for the agent's reply.
pub struct Pending {
    pub id: u64,
    state: HandshakeState,
    pub started: Instant,
}

impl Pending {
    pub fn finish(mut self, reply: &[u8]) -> Result<Session, SessionError> {
        let mut payload = vec![0u8; MAX_MESSAGE];
        self.state
            .read_message(reply, &mut payload)
            .map_err(|_| SessionError::Handshake)?;
        Session::new(self.id, self.state)
    }
}

/// One session's keys and counters.
pub struct Session {
    pub id: u64,
    transport: StatelessTransportState,
    next_nonce: u64,
    replay: ReplayWindow,
    pub created: Instant,
    /// Messages and plaintext bytes sealed and opened under this session.
    pub messages: u64,
    pub bytes: u64,
}

impl Session {
    fn new(id: u64, state: HandshakeState) -> Result<Session, SessionError> {
        Ok(Session {
            id,
            transport: state
                .into_stateless_transport_mode()
                .map_err(|_| SessionError::Handshake)?,
            next_nonce: 0,
            replay: ReplayWindow::default(),
            created: Instant::now(),
            messages: 0,
            bytes: 0,
        })
    }

    /// Seals `plaintext` (at most [`MAX_MESSAGE`] - [`TAG`] bytes) into
    /// `out`, returning the nonce used.
    fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> u64 {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.messages += 1;
        self.bytes += plaintext.len() as u64;
        let start = out.len();
        out.resize(start + plaintext.len() + TAG, 0);
        // Fails only for a plaintext longer than a Noise message, which
        // callers never pass (chunks are smaller).
        let n = self
            .transport
            .write_message(nonce, plaintext, &mut out[start..])
            .unwrap_or(0);
        out.truncate(start + n);
        nonce
    }

    fn open(&mut self, nonce: u64, sealed: &[u8]) -> Result<Vec<u8>, SessionError> {
        if !self.replay.fresh(nonce) {
            return Err(SessionError::Replayed);
        }
        let mut plain = vec![0u8; sealed.len()];
        let n = self
            .transport
            .read_message(nonce, sealed, &mut plain)
            .map_err(|_| SessionError::Undecryptable)?;
        plain.truncate(n);
        // Only a message that verified moves the window.
        self.replay.mark(nonce);
        self.messages += 1;
        self.bytes += n as u64;
        Ok(plain)
    }
}

/// Which nonces were seen: the highest, and a bitmap of the [`WINDOW`]
/// below it.
#[derive(Default)]
struct ReplayWindow {
    /// One more than the highest nonce seen; 0: none yet.
    top: u64,
    seen: [u64; (WINDOW / 64) as usize],
}

impl ReplayWindow {
    fn fresh(&self, nonce: u64) -> bool {
        if nonce >= self.top {
            return true;
        }
        if self.top - nonce > WINDOW {
            return false;
        }
        let bit = nonce % WINDOW;
        self.seen[(bit / 64) as usize] & (1 << (bit % 64)) == 0
    }

    fn mark(&mut self, nonce: u64) {
        if nonce >= self.top {
            // Clear the slots the window slides past.
            let slide = (nonce + 1 - self.top).min(WINDOW);
            for n in self.top..self.top + slide {
                let bit = n % WINDOW;
                self.seen[(bit / 64) as usize] &= !(1 << (bit % 64));
            }
            self.top = nonce + 1;
        }
        let bit = nonce % WINDOW;
        self.seen[(bit / 64) as usize] |= 1 << (bit % 64);
    }
}

/// The newest session and the one it replaced, until its grace ends.
pub struct Sessions {
    current: Session,
    previous: Option<(Session, Instant)>,
}

impl Sessions {
    pub fn new(first: Session) -> Sessions {
        Sessions {
            current: first,
            previous: None,
        }
    }

    pub fn current(&self) -> &Session {
        &self.current
    }

    /// Makes `next` the sealing session; the current one keeps opening
    /// for `grace`.
    pub fn rotate(&mut self, next: Session, grace: Duration) {
        let old = std::mem::replace(&mut self.current, next);
        self.previous = Some((old, Instant::now() + grace));
    }

    /// Seals under the current session: appends its id, the nonce and the
    /// sealed bytes to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&self.current.id.to_be_bytes());
        let at = out.len();
        out.extend_from_slice(&[0; 8]);
        let nonce = self.current.seal(plaintext, out);
        out[at..at + 8].copy_from_slice(&nonce.to_be_bytes());
    }

    /// Opens `id, nonce, sealed` (as [`Sessions::seal`] wrote them).
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, SessionError> {
        let (id, rest) = sealed.split_at_checked(8).ok_or(SessionError::Undecryptable)?;
        let (nonce, body) = rest.split_at_checked(8).ok_or(SessionError::Undecryptable)?;
        let id = u64::from_be_bytes(id.try_into().map_err(|_| SessionError::Undecryptable)?);
        let nonce = u64::from_be_bytes(nonce.try_into().map_err(|_| SessionError::Undecryptable)?);
        if id == self.current.id {
            return self.current.open(nonce, body);
        }
        match &mut self.previous {
            Some((old, until)) if old.id == id && Instant::now() < *until => old.open(nonce, body),
            _ => Err(SessionError::UnknownSession),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(node: &Keys, agent: &Keys, id: u64) -> (Session, Session) {
        let (pending, first) = node.initiate(id, b"hello").unwrap();
        let (payload, reply, agent_side) = agent.respond(id, &first).unwrap();
        assert_eq!(payload, b"hello");
        (pending.finish(&reply).unwrap(), agent_side)
    }

    fn keys() -> (Keys, Keys) {
        let (node, agent) = (StaticSecret::random(), StaticSecret::random());
        (
            Keys {
                peer: PublicKey::from(&agent),
                own: node.clone(),
            },
            Keys {
                peer: PublicKey::from(&node),
                own: agent,
            },
        )
    }

    #[test]
    fn sealed_messages_open_once_and_only_with_the_right_keys() {
        let (node, agent) = keys();
        let (n, a) = handshake(&node, &agent, 1);
        let (mut n, mut a) = (Sessions::new(n), Sessions::new(a));
        let mut out = Vec::new();
        n.seal(b"GET /", &mut out);
        assert_eq!(a.open(&out).unwrap(), b"GET /");
        assert_eq!(a.open(&out), Err(SessionError::Replayed));
        let mut flipped = out.clone();
        *flipped.last_mut().unwrap() ^= 1;
        flipped[15] = 9;
        assert_eq!(a.open(&flipped), Err(SessionError::Undecryptable));
        assert_eq!(a.open(b"short"), Err(SessionError::Undecryptable));
    }

    #[test]
    fn a_stranger_cannot_complete_a_handshake() {
        let (node, agent) = keys();
        let stranger = Keys {
            own: StaticSecret::random(),
            peer: PublicKey::from(&node.own),
        };
        let (_, first) = node.initiate(1, b"").unwrap();
        assert_eq!(stranger.respond(1, &first).err(), Some(SessionError::Handshake));
        let (_, reply, _) = agent.respond(1, &first).unwrap();
        let (pending, _) = node.initiate(2, b"").unwrap();
        assert!(pending.finish(&reply).is_err(), "a reply to another handshake");
    }

    #[test]
    fn the_previous_session_opens_until_its_grace_ends() {
        let (node, agent) = keys();
        let (n1, a1) = handshake(&node, &agent, 1);
        let (n2, a2) = handshake(&node, &agent, 2);
        let (mut n, mut a) = (Sessions::new(n1), Sessions::new(a1));
        let mut old = Vec::new();
        n.seal(b"in flight", &mut old);
        n.rotate(n2, Duration::from_secs(30));
        a.rotate(a2, Duration::ZERO);
        let mut new = Vec::new();
        n.seal(b"after", &mut new);
        assert_eq!(a.open(&new).unwrap(), b"after");
        assert_eq!(a.open(&old), Err(SessionError::UnknownSession), "grace over");
    }

    #[test]
    fn the_window_accepts_late_messages_once_and_refuses_old_ones() {
        let mut w = ReplayWindow::default();
        for n in [5, 3, 4, 0, 2000, 1500] {
            assert!(w.fresh(n), "{n}");
            w.mark(n);
            assert!(!w.fresh(n), "{n} again");
        }
        assert!(!w.fresh(5), "more than the window below the top");
        assert!(w.fresh(1999));
    }
}
