//! The knock's place in a TLS ClientHello.
//!
//! The client lets rustls write an ordinary ClientHello, then inserts the
//! knock as the first extension, of a private-use type (RFC 8446 §4.2 keeps
//! 0xff00..=0xffff for that). The portal removes that extension from the
//! record before its rustls reads it. Both handshake transcripts therefore
//! hash the ClientHello rustls wrote, byte for byte, and a stock client that
//! sends no knock handshakes exactly as it would with any server. Inserting
//! first, not last, keeps `pre_shared_key` last, as TLS 1.3 requires.
//!
//! A knock carried this way is bound to the ClientHello around it: its
//! nonce is [`binding_nonce`] of the record without the knock. Someone who
//! copies the extension into a ClientHello of their own (with their own key
//! share) presents a knock whose nonce no longer matches, and the portal
//! refuses it before even opening it.
//!
//! Only a ClientHello alone in one record is understood; that is what rustls,
//! browsers and curl send. Anything else is an error here, and the portal
//! treats it as a connection without a knock.

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::knock::wire::NONCE_LEN;

/// The extension type carrying the knock ("0x86" as in the knock prefix).
pub const KNOCK_EXTENSION: u16 = 0xff86;

/// A TLS record header: content type, legacy version, length.
pub const RECORD_HEADER_LEN: usize = 5;
/// The largest record payload a peer may send (RFC 8446 §5.1).
pub const MAX_RECORD_LEN: usize = 1 << 14;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RANDOM_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientHelloError {
    #[error("the first record is of content type {0}, not a handshake (22)")]
    NotHandshake(u8),
    #[error("the first record declares {0} bytes, more than TLS allows ({MAX_RECORD_LEN})")]
    RecordTooLong(usize),
    #[error("the first handshake message is of type {0}, not a ClientHello (1)")]
    NotClientHello(u8),
    #[error("the ClientHello ends inside its {0}")]
    Truncated(&'static str),
    #[error("the ClientHello's {field} declares {declared} bytes where {actual} are present")]
    Length {
        field: &'static str,
        declared: usize,
        actual: usize,
    },
    #[error("the ClientHello carries more than one knock extension")]
    DuplicateKnock,
    #[error("the ClientHello already carries a knock extension")]
    AlreadyKnocked,
    #[error("with a {0}-byte knock the ClientHello no longer fits one record")]
    TooLarge(usize),
}

/// The length of the first record once its header has arrived, so a reader
/// knows how many bytes to wait for before calling [`strip_knock`].
pub fn record_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..RECORD_HEADER_LEN)?;
    Some(RECORD_HEADER_LEN + usize::from(u16::from_be_bytes([header[3], header[4]])))
}

/// The nonce a knock carried in `record` (the ClientHello record as rustls
/// wrote it, knock not yet inserted) must have. The record holds 32 fresh
/// random bytes and the key share, so the nonce stays unique per key, as
/// XChaCha20-Poly1305 needs.
pub fn binding_nonce(record: &[u8]) -> [u8; NONCE_LEN] {
    let digest = Sha256::new()
        .chain_update(b"gatekeeper portal knock v1\0")
        .chain_update(record)
        .finalize();
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&digest[..NONCE_LEN]);
    nonce
}

/// A ClientHello record with the knock extension taken out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stripped {
    /// The knock extension's data, byte-exact; `None` if there was none.
    pub knock: Option<Vec<u8>>,
    /// The record as rustls wrote it, to hand to the portal's rustls.
    pub record: Vec<u8>,
}

/// Removes the knock extension from a record holding one ClientHello.
pub fn strip_knock(record: &[u8]) -> Result<Stripped, ClientHelloError> {
    let layout = Layout::parse(record)?;
    let mut knocks = layout.extensions.iter().filter(|ext| ext.kind == KNOCK_EXTENSION);
    let Some(found) = knocks.next() else {
        return Ok(Stripped {
            knock: None,
            record: record.to_vec(),
        });
    };
    if knocks.next().is_some() {
        return Err(ClientHelloError::DuplicateKnock);
    }
    let knock = record[found.start + 4..found.end].to_vec();
    let mut out = Vec::with_capacity(record.len());
    out.extend_from_slice(&record[..found.start]);
    out.extend_from_slice(&record[found.end..]);
    layout.resize(&mut out, found.end - found.start, Resize::Shrink);
    Ok(Stripped {
        knock: Some(knock),
        record: out,
    })
}

/// Inserts `knock` as the first extension of a record holding one
/// ClientHello.
pub fn insert_knock(record: &[u8], knock: &[u8]) -> Result<Vec<u8>, ClientHelloError> {
    let layout = Layout::parse(record)?;
    if layout.extensions.iter().any(|ext| ext.kind == KNOCK_EXTENSION) {
        return Err(ClientHelloError::AlreadyKnocked);
    }
    let added = 4 + knock.len();
    let data_len = u16::try_from(knock.len()).map_err(|_| ClientHelloError::TooLarge(knock.len()))?;
    if record.len() - RECORD_HEADER_LEN + added > MAX_RECORD_LEN {
        return Err(ClientHelloError::TooLarge(knock.len()));
    }
    let mut out = Vec::with_capacity(record.len() + added);
    out.extend_from_slice(&record[..layout.extensions_start]);
    out.extend_from_slice(&KNOCK_EXTENSION.to_be_bytes());
    out.extend_from_slice(&data_len.to_be_bytes());
    out.extend_from_slice(knock);
    out.extend_from_slice(&record[layout.extensions_start..]);
    layout.resize(&mut out, added, Resize::Grow);
    Ok(out)
}

/// Where the length fields and extensions of one ClientHello record are.
struct Layout {
    /// Offset of the two-byte extensions length.
    extensions_len_at: usize,
    /// Offset of the first extension.
    extensions_start: usize,
    extensions: Vec<Extension>,
}

/// One extension's span in the record, its four-byte header included.
struct Extension {
    kind: u16,
    start: usize,
    end: usize,
}

enum Resize {
    Grow,
    Shrink,
}

impl Layout {
    fn parse(record: &[u8]) -> Result<Layout, ClientHelloError> {
        let mut r = Reader { buf: record, pos: 0 };
        let content = r.u8("record header")?;
        if content != CONTENT_HANDSHAKE {
            return Err(ClientHelloError::NotHandshake(content));
        }
        r.take(2, "record header")?;
        let record_len = usize::from(r.u16("record header")?);
        if record_len > MAX_RECORD_LEN {
            return Err(ClientHelloError::RecordTooLong(record_len));
        }
        exact("record", record_len, r.remaining())?;

        let kind = r.u8("handshake header")?;
        if kind != HANDSHAKE_CLIENT_HELLO {
            return Err(ClientHelloError::NotClientHello(kind));
        }
        let body_len = r.u24("handshake header")?;
        exact("handshake message", body_len, r.remaining())?;

        r.take(2 + RANDOM_LEN, "version and random")?;
        let session_id = usize::from(r.u8("session id")?);
        r.take(session_id, "session id")?;
        let suites = usize::from(r.u16("cipher suites")?);
        r.take(suites, "cipher suites")?;
        let compression = usize::from(r.u8("compression methods")?);
        r.take(compression, "compression methods")?;

        let extensions_len_at = r.pos;
        let extensions_len = usize::from(r.u16("extensions")?);
        exact("extensions block", extensions_len, r.remaining())?;
        let extensions_start = r.pos;
        let mut extensions = Vec::new();
        while r.remaining() > 0 {
            let start = r.pos;
            let kind = r.u16("extension header")?;
            let len = usize::from(r.u16("extension header")?);
            r.take(len, "extension data")?;
            extensions.push(Extension {
                kind,
                start,
                end: r.pos,
            });
        }
        Ok(Layout {
            extensions_len_at,
            extensions_start,
            extensions,
        })
    }

    /// Rewrites the record, handshake and extensions lengths in `out` after
    /// `by` bytes were added to or removed from the extensions block. The
    /// three fields sit before the change, so their offsets still hold.
    fn resize(&self, out: &mut [u8], by: usize, how: Resize) {
        let adjust = |len: usize| match how {
            Resize::Grow => len + by,
            Resize::Shrink => len - by,
        };
        let record_len = adjust(usize::from(u16::from_be_bytes([out[3], out[4]])));
        out[3..5].copy_from_slice(&(record_len as u16).to_be_bytes());
        let body_at = RECORD_HEADER_LEN + 1;
        let body_len = adjust(u32::from_be_bytes([0, out[body_at], out[body_at + 1], out[body_at + 2]]) as usize);
        out[body_at..body_at + 3].copy_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        let at = self.extensions_len_at;
        let extensions_len = adjust(usize::from(u16::from_be_bytes([out[at], out[at + 1]])));
        out[at..at + 2].copy_from_slice(&(extensions_len as u16).to_be_bytes());
    }
}

fn exact(field: &'static str, declared: usize, actual: usize) -> Result<(), ClientHelloError> {
    if declared == actual {
        Ok(())
    } else {
        Err(ClientHelloError::Length {
            field,
            declared,
            actual,
        })
    }
}

/// A cursor that names the field it ran out in.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let bytes = self
            .buf
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or(ClientHelloError::Truncated(field))?;
        self.pos += n;
        Ok(bytes)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ClientHelloError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ClientHelloError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self, field: &'static str) -> Result<usize, ClientHelloError> {
        let b = self.take(3, field)?;
        Ok(u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rustls::{ClientConnection, ServerConnection, pki_types::ServerName};
    use tunnel::tls::{Identity, client_config};

    use super::*;

    const KNOCK: &[u8] = &[0x80, 0x86, 0x01, 0xaa, 0x00, 0xff, 0x55];

    fn peers() -> (ClientConnection, ServerConnection) {
        let identity = Identity::generate(&["portal.test".to_string()]).unwrap();
        let server = ServerConnection::new(identity.server_config().unwrap()).unwrap();
        let name = ServerName::try_from("portal.test").unwrap();
        let client = ClientConnection::new(client_config(identity.fingerprint()).unwrap(), name).unwrap();
        (client, server)
    }

    fn first_flight(client: &mut ClientConnection) -> Vec<u8> {
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        assert_eq!(
            record_len(&out),
            Some(out.len()),
            "rustls sends the ClientHello in one record"
        );
        out
    }

    /// Moves everything `from` has to send into `to`.
    fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) -> Result<(), rustls::Error> {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// Runs a handshake whose ClientHello goes through `carry` on the way
    /// to the server, then sends one message from client to server.
    fn handshake(carry: impl Fn(Vec<u8>) -> Vec<u8>) -> Result<Vec<u8>, rustls::Error> {
        let (mut client, server) = peers();
        let hello = carry(first_flight(&mut client));
        let (mut client, mut server) = (rustls::Connection::from(client), rustls::Connection::from(server));
        server.read_tls(&mut &hello[..]).unwrap();
        server.process_new_packets()?;
        for _ in 0..4 {
            pump(&mut server, &mut client)?;
            pump(&mut client, &mut server)?;
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        client.writer().write_all(b"to the upstream").unwrap();
        pump(&mut client, &mut server)?;
        let mut got = vec![0; 64];
        let n = server.reader().read(&mut got).unwrap();
        got.truncate(n);
        Ok(got)
    }

    #[test]
    fn rustls_peers_handshake_across_insert_and_strip() {
        let got = handshake(|hello| {
            let stripped = strip_knock(&insert_knock(&hello, KNOCK).unwrap()).unwrap();
            assert_eq!(stripped.knock.as_deref(), Some(KNOCK));
            stripped.record
        });
        assert_eq!(got.unwrap(), b"to the upstream");
    }

    #[test]
    fn a_knock_left_in_the_hello_breaks_the_transcript() {
        // Why the portal must strip: the server would hash bytes the client never did.
        let outcome = handshake(|hello| insert_knock(&hello, KNOCK).unwrap());
        assert!(matches!(outcome, Err(rustls::Error::DecryptError)), "{outcome:?}");
    }

    #[test]
    fn insert_then_strip_gives_back_the_record_and_the_knock() {
        let (mut client, _) = peers();
        let hello = first_flight(&mut client);
        let knocked = insert_knock(&hello, KNOCK).unwrap();
        assert_eq!(knocked.len(), hello.len() + 4 + KNOCK.len());
        let stripped = strip_knock(&knocked).unwrap();
        assert_eq!(stripped.knock.as_deref(), Some(KNOCK));
        assert_eq!(stripped.record, hello);
    }

    #[test]
    fn a_hello_without_a_knock_passes_unchanged() {
        let (mut client, _) = peers();
        let hello = first_flight(&mut client);
        let stripped = strip_knock(&hello).unwrap();
        assert_eq!(stripped.knock, None);
        assert_eq!(stripped.record, hello);
    }
}

#[cfg(test)]
mod malformed {
    use super::*;

    /// A ClientHello with one extension of each given type, built by hand.
    fn hello(extensions: &[(u16, &[u8])]) -> Vec<u8> {
        let mut exts = Vec::new();
        for (kind, data) in extensions {
            exts.extend_from_slice(&kind.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(data);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[9; RANDOM_LEN]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut record = vec![CONTENT_HANDSHAKE, 3, 1];
        record.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
        record.push(HANDSHAKE_CLIENT_HELLO);
        record.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        record.extend_from_slice(&body);
        record
    }

    #[test]
    fn every_truncation_is_an_error() {
        let whole = hello(&[(0, b"name"), (KNOCK_EXTENSION, b"knock"), (41, b"psk")]);
        for cut in 0..whole.len() {
            let mut short = whole[..cut].to_vec();
            assert!(strip_knock(&short).is_err(), "cut at {cut}");
            if cut >= RECORD_HEADER_LEN {
                // A record header that agrees with the cut still leaves the inner lengths lying.
                short[3..5].copy_from_slice(&((cut - RECORD_HEADER_LEN) as u16).to_be_bytes());
                assert!(strip_knock(&short).is_err(), "cut at {cut}, record length fixed");
            }
        }
        assert_eq!(strip_knock(&whole).unwrap().knock.as_deref(), Some(&b"knock"[..]));
    }

    #[test]
    fn an_extension_length_that_lies_is_an_error() {
        let mut record = hello(&[(KNOCK_EXTENSION, b"knock")]);
        let len_at = record.len() - 5 - 2;
        record[len_at + 1] += 1;
        assert_eq!(strip_knock(&record), Err(ClientHelloError::Truncated("extension data")));
    }

    #[test]
    fn two_knocks_are_refused() {
        let record = hello(&[(KNOCK_EXTENSION, b"one"), (KNOCK_EXTENSION, b"two")]);
        assert_eq!(strip_knock(&record), Err(ClientHelloError::DuplicateKnock));
        assert_eq!(
            insert_knock(&hello(&[(KNOCK_EXTENSION, b"one")]), b"two"),
            Err(ClientHelloError::AlreadyKnocked)
        );
    }

    #[test]
    fn other_records_and_messages_are_named() {
        let mut record = hello(&[]);
        record[0] = 23;
        assert_eq!(strip_knock(&record), Err(ClientHelloError::NotHandshake(23)));
        let mut record = hello(&[]);
        record[RECORD_HEADER_LEN] = 2;
        assert_eq!(strip_knock(&record), Err(ClientHelloError::NotClientHello(2)));
        let mut record = hello(&[]);
        record[3..5].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            strip_knock(&record),
            Err(ClientHelloError::RecordTooLong(usize::from(u16::MAX)))
        );
    }

    #[test]
    fn a_knock_that_would_overflow_the_record_is_refused() {
        let record = hello(&[(0, &[1; 16000])]);
        assert_eq!(insert_knock(&record, &[0; 1024]), Err(ClientHelloError::TooLarge(1024)));
        assert!(insert_knock(&record, &[0; 300]).is_ok());
    }
}
