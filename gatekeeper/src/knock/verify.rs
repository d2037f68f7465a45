//! Deciding whether a knock opens the gate. Every check is here, in the
//! order the daemon applies them; the daemon only supplies the knock (from
//! the XDP ring or from the portal, as a neutral [`Knock`]), the clock and
//! the replay cache, and writes what a granted knock opens.
//!
//! The order matters for what a flood costs and for what the audit trail
//! can say: the nonce is recorded right after the tag and the timestamp
//! verify, before anything about the client's standing is checked, so a
//! captured knock replayed any number of times is one `replay` each time,
//! whoever sent it, and never a second line about its client.

use std::{collections::HashMap, fmt, net::IpAddr, time::Duration};

use gatekeeper_common::maps::{ANY_PORT, NONCE_LEN, WhitelistKey};
use x25519_dalek::{PublicKey, StaticSecret};

use super::{
    Carrier,
    fwknop::{self, FwknopError, FwknopKey, Spa},
    keys::{self, KeyError, KeyId, ServerKeys, SessionKey},
    payload::Payload,
    wire::{self, WireError},
};
use crate::spec::{PortRange, PortSet, Proto, map_addr};

/// A knock as it arrived, whatever carried it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Knock {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub carrier: Carrier,
    /// The knock packet (prefix, key id, ciphertext, nonce).
    pub payload: Vec<u8>,
    /// When it arrived ([`crate::clock::precise_ns`]): the gate's stamp,
    /// or when the portal read its ClientHello.
    pub seen_ns: u64,
}

/// Which wire format a knock is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    V1,
    /// No device identity on the wire (`docs/knock-v2.md`).
    V2,
    /// The stock fwknop client's packet.
    Fwknop,
}

impl Format {
    /// The name the audit log records.
    pub const fn name(self) -> &'static str {
        match self {
            Format::V1 => "v1",
            Format::V2 => "v2",
            Format::Fwknop => "fwknop",
        }
    }
}

impl Knock {
    /// The knock's format, by its prefix. A packet knock with neither
    /// prefix is fwknop's (the gate diverts those only while fwknop
    /// clients are enrolled); anything else in a ClientHello is read as v1
    /// and refused as malformed.
    pub fn format(&self) -> Format {
        if self.payload.starts_with(&wire::v2::PREFIX) {
            Format::V2
        } else if self.carrier != Carrier::ClientHello && !self.payload.starts_with(&gatekeeper_common::knock::PREFIX) {
            Format::Fwknop
        } else {
            Format::V1
        }
    }
}

/// One enrolled client, ready to verify: its session keys are derived once.
#[derive(Clone)]
pub struct Client {
    pub name: String,
    pub id: u32,
    keys: ClientKeys,
    pub policy: PortSet,
    pub enabled: bool,
    pub nat: bool,
    pub expires: Option<u64>,
    /// Where the portal relays this client's sessions, instead of its default.
    pub portal_upstream: Option<String>,
    /// Its fwknop keys, if it may knock with the stock fwknop client.
    pub fwknop: Option<FwknopKey>,
    /// How long its knocks open the gate; none: the verifier's default.
    pub open_for: Option<Duration>,
}

/// How a client stands, as its record says.
#[derive(Clone, Debug)]
pub struct Standing {
    pub name: String,
    pub id: u32,
    pub policy: PortSet,
    pub enabled: bool,
    pub nat: bool,
    pub expires: Option<u64>,
    pub portal_upstream: Option<String>,
    pub fwknop: Option<FwknopKey>,
    pub open_for: Option<Duration>,
}

/// A client's key id and the session keys it shares with the gateway's
/// current knock key and, after a rotation, the previous one: an X25519
/// agreement and a HKDF each, so worth keeping across registry rebuilds.
#[derive(Clone)]
pub struct ClientKeys {
    key_id: KeyId,
    current: SessionKey,
    previous: Option<SessionKey>,
}

impl ClientKeys {
    /// Derives what the client key `public` shares with the gateway's keys.
    pub fn derive(server: &ServerKeys, public: &PublicKey) -> Result<ClientKeys, KeyError> {
        let key_id = keys::key_id(public);
        let shared = |secret: &StaticSecret| keys::session_key(secret, public, &key_id, &PublicKey::from(secret));
        Ok(ClientKeys {
            key_id,
            current: shared(&server.current)?,
            previous: server.previous.as_ref().map(|p| shared(&p.secret)).transpose()?,
        })
    }
}

impl Client {
    pub fn new(keys: ClientKeys, standing: Standing) -> Client {
        Client {
            name: standing.name,
            id: standing.id,
            keys,
            policy: standing.policy,
            enabled: standing.enabled,
            nat: standing.nat,
            expires: standing.expires,
            portal_upstream: standing.portal_upstream,
            fwknop: standing.fwknop,
            open_for: standing.open_for,
        }
    }

    pub fn key_id(&self) -> &KeyId {
        &self.keys.key_id
    }
}

/// The enrolled clients by key id.
#[derive(Clone, Default)]
pub struct Registry {
    by_key: HashMap<KeyId, Client>,
}

impl Registry {
    pub fn insert(&mut self, client: Client) {
        self.by_key.insert(client.keys.key_id, client);
    }

    /// Whether client `id` may open `ports` of `proto` at `unix_now`: what a
    /// grant another cluster node published must satisfy here too.
    pub fn admits(&self, id: u32, proto: Proto, ports: PortRange, unix_now: u64) -> bool {
        self.by_key
            .values()
            .any(|c| c.id == id && c.enabled && c.expires.is_none_or(|e| unix_now < e) && c.policy.covers(proto, ports))
    }

    pub fn clients(&self) -> impl Iterator<Item = &Client> {
        self.by_key.values()
    }
}

/// Why the replay cache could not record a nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayError {
    /// Every slot holds a nonce still inside its window.
    Full,
    /// Anything else, with what went wrong.
    Failed(String),
}

/// Why a knock was refused. `code()` is what the audit log records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Malformed(WireError),
    UnknownKey,
    BadTag,
    BadPayload(String),
    WrongClientId {
        claimed: String,
    },
    Revoked,
    Expired,
    Stale {
        skew_secs: i64,
    },
    Replay,
    ReplayCacheFull,
    ReplayCacheFailed(String),
    /// A cluster node could not claim the nonce in the shared replay cache,
    /// and is set to refuse rather than decide alone.
    ClusterUnreachable(String),
    WrongServer(IpAddr),
    BadRequest(String),
    OutsidePolicy,
    NatNotAllowed {
        local: IpAddr,
    },
    /// A portal knock not sealed for the ClientHello that carried it.
    Unbound,
    /// A portal knock from a TCP port other than the one it names.
    SourcePortMismatch {
        local_port: u16,
        seen: u16,
    },
    /// Sealed for the gateway's previous knock key after its overlap ended:
    /// the device never learned the new key.
    RetiredServerKey {
        until: u64,
    },
    /// An fwknop packet that is not one, that no enrolled fwknop key
    /// authenticates, or whose content (once authenticated) is refused.
    Fwknop(FwknopError),
}

impl Rejection {
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "malformed",
            Rejection::UnknownKey => "unknown_key",
            Rejection::BadTag => "bad_tag",
            Rejection::BadPayload(_) => "bad_payload",
            Rejection::WrongClientId { .. } => "wrong_client_id",
            Rejection::Revoked => "revoked",
            Rejection::Expired => "client_expired",
            Rejection::Stale { .. } => "stale",
            Rejection::Replay => "replay",
            Rejection::ReplayCacheFull => "replay_cache_full",
            Rejection::ReplayCacheFailed(_) => "replay_cache_failed",
            Rejection::ClusterUnreachable(_) => "cluster_unreachable",
            Rejection::WrongServer(_) => "wrong_server",
            Rejection::BadRequest(_) => "bad_request",
            Rejection::OutsidePolicy => "outside_policy",
            Rejection::NatNotAllowed { .. } => "nat_not_allowed",
            Rejection::Unbound => "unbound",
            Rejection::SourcePortMismatch { .. } => "source_port_mismatch",
            Rejection::RetiredServerKey { .. } => "retired_server_key",
            Rejection::Fwknop(FwknopError::Length(_) | FwknopError::NotBase64) => "malformed",
            Rejection::Fwknop(FwknopError::Unauthenticated) => "unknown_key",
            Rejection::Fwknop(_) => "bad_payload",
        }
    }

    /// Whether the knock proves nothing about who sent it: anyone can send
    /// garbage, guess a key id, or resend a captured knock. Such refusals
    /// are what floods are made of; the audit trail counts them rather than
    /// writing each one.
    pub fn unproven(&self) -> bool {
        matches!(
            self,
            Rejection::Malformed(_)
                | Rejection::UnknownKey
                | Rejection::BadTag
                | Rejection::Stale { .. }
                | Rejection::Replay
                | Rejection::Unbound
                | Rejection::Fwknop(FwknopError::Length(_) | FwknopError::NotBase64 | FwknopError::Unauthenticated)
        )
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Malformed(e) => write!(f, "{e}"),
            Rejection::UnknownKey => f.write_str("no enrolled client has this key id"),
            Rejection::BadTag => f.write_str("the tag does not verify"),
            Rejection::BadPayload(e) => write!(f, "{e}"),
            Rejection::WrongClientId { claimed } => {
                write!(f, "the payload claims client {claimed:?}, not the key's owner")
            }
            Rejection::Revoked => f.write_str("the client is revoked"),
            Rejection::Expired => f.write_str("the client's enrollment has expired"),
            Rejection::Stale { skew_secs } => write!(f, "timestamp {skew_secs}s away from now, outside the window"),
            Rejection::Replay => f.write_str("this knock was seen before"),
            Rejection::ReplayCacheFull => f.write_str("the replay cache is full; refusing until it is swept"),
            Rejection::ReplayCacheFailed(e) => write!(f, "the replay cache could not record the nonce: {e}"),
            Rejection::ClusterUnreachable(e) => write!(f, "the cluster's replay cache did not answer ({e})"),
            Rejection::WrongServer(ip) => write!(f, "addressed to {ip}, not to this gateway"),
            Rejection::BadRequest(e) => write!(f, "{e}"),
            Rejection::OutsidePolicy => f.write_str("the requested ports are outside the client's policy"),
            Rejection::NatNotAllowed { local } => {
                write!(f, "sent from behind NAT ({local}) by a client not allowed to")
            }
            Rejection::Unbound => f.write_str("the knock was sealed for another ClientHello (copied from elsewhere)"),
            Rejection::SourcePortMismatch { local_port, seen } => write!(
                f,
                "sealed for source port {local_port} but arrived from {seen}: behind NAT, and the client is not allowed to be"
            ),
            Rejection::RetiredServerKey { until } => write!(
                f,
                "sealed for the gateway's previous knock key, accepted until {}: the device must learn the new one (`gatekeeper client refresh`)",
                crate::clock::rfc3339(*until)
            ),
            Rejection::Fwknop(e) => write!(f, "{e}"),
        }
    }
}

/// What an accepted knock opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub key: WhitelistKey,
    pub ports: PortRange,
    pub client_id: u32,
    /// How long the entry stays open (connections made in that time stay
    /// up while they are active).
    pub open_for: Duration,
}

/// The result of checking one knock, with what is known for the audit log
/// even when it was refused.
#[derive(Debug, Clone)]
pub struct Checked {
    pub knock_id: Option<[u8; NONCE_LEN]>,
    pub client: Option<String>,
    pub payload: Option<Payload>,
    /// What an fwknop packet asked for, once it opened.
    pub fwknop: Option<Spa>,
    /// The knock was sealed for the previous knock key, not the current one.
    pub previous_key: bool,
    pub outcome: Result<Grant, Rejection>,
}

impl Checked {
    /// Before anything is known: no client, refused as an unknown key.
    fn empty() -> Checked {
        Checked {
            knock_id: None,
            client: None,
            payload: None,
            fwknop: None,
            previous_key: false,
            outcome: Err(Rejection::UnknownKey),
        }
    }
}

/// A knock whose sender is known: the client its key names, its nonce,
/// and its payload as that client's key opened it (or why not).
struct Unsealed<'a> {
    client: &'a Client,
    nonce: [u8; NONCE_LEN],
    payload: Result<Payload, WireError>,
}

pub struct Verifier {
    pub registry: Registry,
    /// Addresses clients may name as `server_ip`; empty: the knock's own
    /// destination address.
    pub server_addrs: Vec<IpAddr>,
    pub window_secs: u64,
    /// How long an accepted knock opens the gate, unless its client's
    /// record says otherwise.
    pub open_for: Duration,
    /// Until when (unix seconds) knocks sealed for the previous knock key
    /// are accepted; none: no rotation has happened.
    previous_until: Option<u64>,
    /// The gateway's knock keys as v2 opens knocks with them: the current
    /// one, then the previous one after a rotation.
    gateway_keys: Vec<wire::v2::GatewayKey>,
}

impl Verifier {
    /// A verifier for `registry`'s clients, knocking on `server_addrs`
    /// (none: whatever address a knock was sent to) within `window_secs`,
    /// opening for `open_for` by default; it knows no knock key until
    /// [`Verifier::set_server`].
    pub fn new(registry: Registry, server_addrs: Vec<IpAddr>, window_secs: u64, open_for: Duration) -> Verifier {
        Verifier {
            registry,
            server_addrs,
            window_secs,
            open_for,
            previous_until: None,
            gateway_keys: Vec::new(),
        }
    }

    /// The gateway's knock keys: v2 knocks are opened with them, and
    /// knocks sealed for the previous one are accepted until its overlap
    /// ends.
    pub fn set_server(&mut self, server: &ServerKeys) {
        self.previous_until = server.previous.as_ref().map(|p| p.accepted_until);
        let previous = server.previous.as_ref().map(|p| &p.secret);
        self.gateway_keys = [Some(&server.current), previous]
            .into_iter()
            .flatten()
            .map(wire::v2::GatewayKey::new)
            .collect();
    }

    /// Checks `knock` at `unix_now`. `record` stores a nonce until the given
    /// unix time and says whether it was new (`Ok(false)`: seen before).
    pub fn check(
        &self,
        knock: &Knock,
        unix_now: u64,
        record: impl FnOnce(&[u8; NONCE_LEN], u64) -> Result<bool, ReplayError>,
    ) -> Checked {
        self.check_for_client(knock, unix_now, record).0
    }

    /// [`Verifier::check`], and the client whose knock was accepted.
    fn check_for_client(
        &self,
        knock: &Knock,
        unix_now: u64,
        record: impl FnOnce(&[u8; NONCE_LEN], u64) -> Result<bool, ReplayError>,
    ) -> (Checked, Option<&Client>) {
        let mut checked = Checked::empty();
        let (outcome, client) = match self.run(knock, unix_now, record, &mut checked) {
            Ok((grant, client)) => (Ok(grant), Some(client)),
            Err(rejection) => (Err(rejection), None),
        };
        checked.outcome = outcome;
        (checked, client)
    }

    /// Checks a knock the portal found in a ClientHello. `conn` describes
    /// the TCP connection (its payload is the knock) and `binding` is what
    /// the knock's nonce must be for that ClientHello. On top of
    /// [`Verifier::check`]: the knock must be bound, ask for the portal's
    /// port and, unless the client may be behind NAT, come from the source
    /// port it names. Also gives the accepted client's own upstream, if it
    /// has one.
    pub fn check_portal(
        &self,
        conn: &Knock,
        binding: &[u8; NONCE_LEN],
        unix_now: u64,
        record: impl FnOnce(&[u8; NONCE_LEN], u64) -> Result<bool, ReplayError>,
    ) -> (Checked, Option<String>) {
        // Before the replay cache: a copied extension must not use up the
        // owner's knock.
        if let Ok(nonce) = wire::nonce_of(&conn.payload)
            && nonce != *binding
        {
            let unbound = Checked {
                knock_id: Some(nonce),
                client: None,
                payload: None,
                fwknop: None,
                previous_key: false,
                outcome: Err(Rejection::Unbound),
            };
            return (unbound, None);
        }
        let (mut checked, client) = self.check_for_client(conn, unix_now, record);
        let Some(client) = client else {
            return (checked, None);
        };
        if let (Ok(grant), Some(payload)) = (&checked.outcome, &checked.payload) {
            if !(grant.ports.lo..=grant.ports.hi).contains(&conn.dport) {
                checked.outcome = Err(Rejection::BadRequest(format!(
                    "asks for tcp/{}, not the portal's port {}",
                    grant.ports, conn.dport
                )));
            } else if !client.nat && payload.local_port != conn.sport {
                checked.outcome = Err(Rejection::SourcePortMismatch {
                    local_port: payload.local_port,
                    seen: conn.sport,
                });
            }
        }
        let upstream = checked
            .outcome
            .is_ok()
            .then(|| client.portal_upstream.clone())
            .flatten();
        (checked, upstream)
    }

    /// The window, then the replay cache: `id` is remembered for as long
    /// as `timestamp` stays acceptable.
    fn fresh(
        &self,
        id: &[u8; NONCE_LEN],
        timestamp: u64,
        unix_now: u64,
        record: impl FnOnce(&[u8; NONCE_LEN], u64) -> Result<bool, ReplayError>,
    ) -> Result<(), Rejection> {
        let skew = timestamp as i64 - unix_now as i64;
        if skew.unsigned_abs() > self.window_secs {
            return Err(Rejection::Stale { skew_secs: skew });
        }
        match record(id, timestamp + self.window_secs + 1) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Rejection::Replay),
            Err(ReplayError::Full) => Err(Rejection::ReplayCacheFull),
            Err(ReplayError::Failed(e)) => Err(Rejection::ReplayCacheFailed(e)),
        }
    }

    /// Checks a packet from the stock fwknop client at `unix_now`; its
    /// grants, one per port it asks for. `record` keeps the packet's
    /// replay id as [`Verifier::check`] keeps a nonce. The checks follow
    /// v1's order: the key (found by HMAC), the content, the window, the
    /// replay cache, then the client's standing, the address, the policy.
    pub fn check_fwknop(
        &self,
        knock: &Knock,
        unix_now: u64,
        record: impl FnOnce(&[u8; NONCE_LEN], u64) -> Result<bool, ReplayError>,
    ) -> (Checked, Vec<Grant>) {
        let mut checked = Checked::empty();
        match self.run_fwknop(knock, unix_now, record, &mut checked) {
            Ok(grants) => {
                checked.outcome = grants.first().cloned().ok_or(Rejection::OutsidePolicy);
                (checked, grants)
            }
            Err(rejection) => {
                checked.outcome = Err(rejection);
                (checked, Vec::new())
            }
        }
    }

    fn run_fwknop(
        &self,
        knock: &Knock,
        unix_now: u64,
        record: impl FnOnce(&[u8; NONCE_LEN], u64) -> Result<bool, ReplayError>,
        seen: &mut Checked,
    ) -> Result<Vec<Grant>, Rejection> {
        let packet = fwknop::Packet::split(&knock.payload).map_err(Rejection::Fwknop)?;
        let id = packet.replay_id();
        seen.knock_id = Some(id);
        let (client, key) = self
            .registry
            .clients()
            .find_map(|c| c.fwknop.as_ref().filter(|k| packet.authenticated_by(k)).map(|k| (c, k)))
            .ok_or(Rejection::Fwknop(FwknopError::Unauthenticated))?;
        seen.client = Some(client.name.clone());
        let spa = packet.open(key).map_err(Rejection::Fwknop)?;
        seen.fwknop = Some(spa.clone());
        self.fresh(&id, spa.timestamp, unix_now, record)?;
        if !client.enabled {
            return Err(Rejection::Revoked);
        }
        if client.expires.is_some_and(|e| unix_now >= e) {
            return Err(Rejection::Expired);
        }
        // `-s` sends 0.0.0.0: "wherever this packet comes from".
        let named = spa.allow_ip.to_canonical();
        if !named.is_unspecified() && named != knock.src.to_canonical() && !client.nat {
            return Err(Rejection::NatNotAllowed { local: named });
        }
        if spa
            .access
            .iter()
            .any(|(proto, ports)| !client.policy.covers(*proto, *ports))
        {
            return Err(Rejection::OutsidePolicy);
        }
        // fwknop's `-f SECONDS` may shorten what the client's policy
        // opens, never lengthen it.
        let open_for = match spa.client_timeout {
            Some(asked) if asked > 0 => self.open_for(client).min(Duration::from_secs(asked.into())),
            _ => self.open_for(client),
        };
        Ok(spa
            .access
            .iter()
            .map(|(proto, ports)| Grant {
                key: WhitelistKey::new(map_addr(knock.src), ANY_PORT, proto.number()),
                ports: *ports,
                client_id: client.id,
                open_for,
            })
            .collect())
    }

    /// A v1 knock's client (named by its key id), nonce, and payload as
    /// its session key opened it (the previous key's, after a rotation).
    fn open_v1<'a>(&'a self, packet: &[u8], seen: &mut Checked) -> Result<Unsealed<'a>, Rejection> {
        let sealed = wire::split(packet).map_err(Rejection::Malformed)?;
        seen.knock_id = Some(sealed.nonce);
        let client = self.registry.by_key.get(&sealed.key_id).ok_or(Rejection::UnknownKey)?;
        seen.client = Some(client.name.clone());
        let opened = match (sealed.open(&client.keys.current), &client.keys.previous) {
            (Err(WireError::Tag), Some(previous)) => sealed.open(previous).inspect(|_| seen.previous_key = true),
            (outcome, _) => outcome,
        };
        Ok(Unsealed {
            client,
            nonce: sealed.nonce,
            payload: opened,
        })
    }

    /// A v2 knock's client, nonce and payload: the flood tag, then the
    /// sealed identity under the current knock key (the previous one
    /// after a rotation) names the client, whose session key with that
    /// knock key opens the payload.
    fn open_v2<'a>(&'a self, packet: &[u8], seen: &mut Checked) -> Result<Unsealed<'a>, Rejection> {
        let sealed = wire::v2::split(packet).map_err(Rejection::Malformed)?;
        seen.knock_id = Some(sealed.nonce);
        let (opened, which) = self
            .gateway_keys
            .iter()
            .enumerate()
            .find_map(|(i, key)| sealed.identity(key).ok().map(|o| (o, i)))
            .ok_or(Rejection::UnknownKey)?;
        let client = self
            .registry
            .by_key
            .get(&keys::key_id(&opened.client))
            .ok_or(Rejection::UnknownKey)?;
        seen.client = Some(client.name.clone());
        seen.previous_key = which > 0;
        let session = match (seen.previous_key, &client.keys.previous) {
            (false, _) => client.keys.current,
            (true, Some(previous)) => *previous,
            (true, None) => return Err(Rejection::BadTag),
        };
        Ok(Unsealed {
            client,
            nonce: sealed.nonce,
            payload: sealed.open(&opened, &session, &self.gateway_keys[which]),
        })
    }

    fn run(
        &self,
        knock: &Knock,
        unix_now: u64,
        record: impl FnOnce(&[u8; NONCE_LEN], u64) -> Result<bool, ReplayError>,
        seen: &mut Checked,
    ) -> Result<(Grant, &Client), Rejection> {
        let Unsealed { client, nonce, payload } = match knock.format() {
            Format::V2 => self.open_v2(&knock.payload, seen)?,
            Format::V1 | Format::Fwknop => self.open_v1(&knock.payload, seen)?,
        };
        let payload = payload.map_err(|e| match e {
            WireError::Tag => Rejection::BadTag,
            other => Rejection::BadPayload(other.to_string()),
        })?;
        seen.payload = Some(payload.clone());
        if payload.client_id != client.name {
            return Err(Rejection::WrongClientId {
                claimed: payload.client_id,
            });
        }
        self.fresh(&nonce, payload.timestamp, unix_now, record)?;
        if !client.enabled {
            return Err(Rejection::Revoked);
        }
        if let (true, Some(until)) = (seen.previous_key, self.previous_until)
            && unix_now >= until
        {
            return Err(Rejection::RetiredServerKey { until });
        }
        if client.expires.is_some_and(|e| unix_now >= e) {
            return Err(Rejection::Expired);
        }
        let ours = if self.server_addrs.is_empty() {
            payload.server_ip == knock.dst
        } else {
            self.server_addrs.contains(&payload.server_ip)
        };
        if !ours {
            return Err(Rejection::WrongServer(payload.server_ip));
        }
        let proto = payload
            .proto()
            .ok_or_else(|| Rejection::BadRequest(format!("unknown protocol {:?}", payload.protocol)))?;
        let ports = match proto {
            Proto::Icmp => PortRange { lo: 0, hi: u16::MAX },
            _ => payload.ports().ok_or_else(|| {
                Rejection::BadRequest(format!("bad port range {}-{}", payload.start_port, payload.end_port))
            })?,
        };
        if !client.policy.covers(proto, ports) {
            return Err(Rejection::OutsidePolicy);
        }
        if !client.nat && payload.local_ip != knock.src {
            return Err(Rejection::NatNotAllowed {
                local: payload.local_ip,
            });
        }
        let carrier_is_tcp_syn = knock.carrier == Carrier::Syn;
        if carrier_is_tcp_syn && proto != Proto::Tcp {
            return Err(Rejection::BadRequest("a TCP SYN knock can only open TCP".into()));
        }
        // A SYN knock opens exactly the tuple it came from; UDP and echo
        // knocks open any source port unless they ask to be bound.
        let bind = carrier_is_tcp_syn || (payload.local_port != 0 && knock.sport != 0);
        let src_port = if bind { knock.sport } else { ANY_PORT };
        let grant = Grant {
            key: WhitelistKey::new(map_addr(knock.src), src_port, proto.number()),
            ports,
            client_id: client.id,
            open_for: self.open_for(client),
        };
        Ok((grant, client))
    }

    /// How long `client`'s knocks open the gate.
    fn open_for(&self, client: &Client) -> Duration {
        client.open_for.unwrap_or(self.open_for)
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::IpAddr};

    use super::*;
    use crate::{
        clock::unix_now,
        knock::{
            credential::Credential,
            send::{Knocker, Request},
        },
    };

    const GW: &str = "192.0.2.1";

    /// A verifier knowing one client `dev` allowed `allow`, and its knocker.
    fn setup(allow: &str, expires: Option<u64>, nat: bool) -> (Verifier, Knocker) {
        let (v, device, server) = setup_with(&ServerKeys::new(keys::generate()), allow, expires, nat);
        (v, knocker(&device, &server))
    }

    /// The knocker of `device`, which knows `server` as the gateway's key
    /// and sends v1 knocks.
    fn knocker(device: &StaticSecret, server: &StaticSecret) -> Knocker {
        versioned_knocker(device, server, None)
    }

    /// [`knocker`], sending the knock version a credential with
    /// `knock_version` asks for.
    fn versioned_knocker(device: &StaticSecret, server: &StaticSecret, knock_version: Option<u8>) -> Knocker {
        let cred = Credential {
            name: "dev".into(),
            secret_key: Some(keys::encode(&device.to_bytes())),
            key_file: None,
            server_public_key: keys::encode(PublicKey::from(server).as_bytes()),
            servers: vec![GW.into()],
            knock_port: 62201,
            tunnel_port: None,
            tls_fingerprint: None,
            knock_version,
        };
        Knocker::new(cred).unwrap()
    }

    /// A verifier for `server`'s keys knowing one client `dev`; the
    /// device's secret, and the server's current secret.
    fn setup_with(
        server: &ServerKeys,
        allow: &str,
        expires: Option<u64>,
        nat: bool,
    ) -> (Verifier, StaticSecret, StaticSecret) {
        let device = keys::generate();
        let standing = Standing {
            name: "dev".into(),
            id: 1,
            policy: allow.parse().unwrap(),
            enabled: true,
            nat,
            expires,
            portal_upstream: None,
            fwknop: None,
            open_for: None,
        };
        let mut registry = Registry::default();
        registry.insert(Client::new(
            ClientKeys::derive(server, &PublicKey::from(&device)).unwrap(),
            standing,
        ));
        let mut v = Verifier::new(registry, vec![GW.parse().unwrap()], 120, Duration::from_secs(30));
        v.set_server(server);
        (v, device, server.current.clone())
    }

    #[test]
    fn the_previous_key_holds_for_the_overlap_then_is_refused_by_name() {
        for version in [None, Some(2)] {
            let before = ServerKeys::new(keys::generate());
            let now = unix_now();
            let after = before.rotate(now, 60);
            let (mut v, device, current) = setup_with(&after, "tcp/22", None, true);
            let old = versioned_knocker(&device, &before.current, version);
            let new = versioned_knocker(&device, &current, version);
            let gw: IpAddr = GW.parse().unwrap();
            let mut seen = HashSet::new();
            let mut knock_with = |v: &Verifier, k: &Knocker, at: u64| {
                let packet = k.build(gw, &req(Proto::Tcp, 22, 22), 0).unwrap();
                v.check(&knock(packet, "10.0.0.2", 40000, Carrier::Udp), at, |n, _| {
                    Ok(seen.insert(*n))
                })
            };
            let during = knock_with(&v, &old, now);
            assert!(
                during.outcome.is_ok() && during.previous_key,
                "{version:?}: {:?}",
                during.outcome
            );
            let fresh = knock_with(&v, &new, now);
            assert!(fresh.outcome.is_ok() && !fresh.previous_key, "{version:?}");
            let late = knock_with(&v, &old, now + 60);
            assert_eq!(late.outcome, Err(Rejection::RetiredServerKey { until: now + 60 }));
            assert!(
                !late.outcome.unwrap_err().unproven(),
                "audited one by one, with the client named"
            );
            v.set_server(&ServerKeys::new(current));
            assert!(knock_with(&v, &new, now + 60).outcome.is_ok());
        }
    }

    #[test]
    fn a_v2_knock_names_its_client_only_to_the_gateway() {
        let server = ServerKeys::new(keys::generate());
        let (v, device, current) = setup_with(&server, "tcp/22", None, true);
        let gw: IpAddr = GW.parse().unwrap();
        let k = versioned_knocker(&device, &current, Some(2));
        let packet = k.build(gw, &req(Proto::Tcp, 22, 22), 0).unwrap();
        assert!(packet.starts_with(&wire::v2::PREFIX));
        assert!(
            !packet
                .windows(16)
                .any(|w| w == v.registry.clients().next().unwrap().key_id()),
            "no key id in the clear"
        );
        let checked = v.check(&knock(packet, "10.0.0.2", 40000, Carrier::Udp), unix_now(), |_, _| {
            Ok(true)
        });
        assert!(checked.outcome.is_ok(), "{:?}", checked.outcome);
        assert_eq!(checked.client.as_deref(), Some("dev"));

        // Sealed for another gateway: no flood tag of ours, nobody's knock.
        let elsewhere = versioned_knocker(&device, &keys::generate(), Some(2));
        let packet = elsewhere.build(gw, &req(Proto::Tcp, 22, 22), 0).unwrap();
        assert_eq!(
            check(&v, &knock(packet, "10.0.0.2", 1, Carrier::Udp)),
            Err(Rejection::UnknownKey)
        );
        // A device the gateway never enrolled, with its real key.
        let stranger = versioned_knocker(&keys::generate(), &current, Some(2));
        let packet = stranger.build(gw, &req(Proto::Tcp, 22, 22), 0).unwrap();
        assert_eq!(
            check(&v, &knock(packet, "10.0.0.2", 1, Carrier::Udp)),
            Err(Rejection::UnknownKey)
        );
    }

    fn knock(payload: Vec<u8>, src: &str, sport: u16, carrier: Carrier) -> Knock {
        Knock {
            src: src.parse().unwrap(),
            dst: GW.parse().unwrap(),
            sport,
            dport: 62201,
            carrier,
            payload,
            seen_ns: 0,
        }
    }

    fn check(v: &Verifier, k: &Knock) -> Result<Grant, Rejection> {
        let mut seen = HashSet::new();
        v.check(k, unix_now(), |n, _| Ok(seen.insert(*n))).outcome
    }

    fn req(proto: Proto, lo: u16, hi: u16) -> Request {
        Request {
            proto,
            ports: PortRange { lo, hi },
            source_port: None,
        }
    }

    #[test]
    fn what_each_carrier_opens() {
        let (mut v, k) = setup("tcp/22,udp/53,icmp", None, true);
        let gw: IpAddr = GW.parse().unwrap();
        let seal = |r: &Request, local_port| {
            k.seal(&Payload {
                local_ip: "10.0.0.2".parse().unwrap(),
                ..k.payload(gw, r, local_port).unwrap()
            })
            .unwrap()
        };

        let g = check(
            &v,
            &knock(seal(&req(Proto::Tcp, 22, 22), 40000), "10.0.0.2", 40000, Carrier::Syn),
        )
        .unwrap();
        assert_eq!(
            (g.key.src_port, g.key.proto),
            (40000, 6),
            "a SYN knock opens exactly its tuple"
        );
        let g = check(
            &v,
            &knock(seal(&req(Proto::Udp, 53, 53), 0), "10.0.0.2", 5555, Carrier::Udp),
        )
        .unwrap();
        assert_eq!(
            (g.key.src_port, g.key.proto),
            (0, 17),
            "a UDP knock opens any source port"
        );
        let g = check(
            &v,
            &knock(seal(&req(Proto::Udp, 53, 53), 5555), "10.0.0.2", 5555, Carrier::Udp),
        )
        .unwrap();
        assert_eq!(g.key.src_port, 5555, "unless it asks to be bound");
        let g = check(
            &v,
            &knock(seal(&req(Proto::Icmp, 0, 65535), 0), "10.0.0.2", 0, Carrier::Icmp),
        )
        .unwrap();
        assert_eq!((g.key.proto, g.ports.lo, g.ports.hi), (1, 0, 65535));
        assert_eq!(g.open_for, Duration::from_secs(30), "the verifier's default");
        for c in v.registry.by_key.values_mut() {
            c.open_for = Some(Duration::from_secs(90));
        }
        let g = check(
            &v,
            &knock(seal(&req(Proto::Udp, 53, 53), 0), "10.0.0.2", 5555, Carrier::Udp),
        )
        .unwrap();
        assert_eq!(g.open_for, Duration::from_secs(90), "the client's own");
        assert!(matches!(
            check(
                &v,
                &knock(seal(&req(Proto::Udp, 53, 53), 1), "10.0.0.2", 1, Carrier::Syn)
            ),
            Err(Rejection::BadRequest(_))
        ));
        assert_eq!(
            check(
                &v,
                &knock(seal(&req(Proto::Tcp, 22, 23), 0), "10.0.0.2", 1, Carrier::Udp)
            ),
            Err(Rejection::OutsidePolicy)
        );
    }

    #[test]
    fn portal_knocks_are_bound_to_their_client_hello_and_port() {
        let (v, k) = setup("tcp/443", None, false);
        let gw: IpAddr = GW.parse().unwrap();
        let binding = [7u8; NONCE_LEN];
        let sealed = |port: u16, local_port: u16, nonce: &[u8; NONCE_LEN]| {
            let mut p = k.payload(gw, &req(Proto::Tcp, port, port), local_port).unwrap();
            p.local_ip = "10.0.0.2".parse().unwrap();
            let mut conn = knock(
                k.seal_with_nonce(&p, nonce).unwrap(),
                "10.0.0.2",
                40000,
                Carrier::ClientHello,
            );
            conn.dport = 443;
            conn
        };
        let mut seen = HashSet::new();
        let mut portal = |conn: &Knock, binding: &[u8; NONCE_LEN]| {
            v.check_portal(conn, binding, unix_now(), |n, _| Ok(seen.insert(*n)))
                .0
                .outcome
        };
        let good = sealed(443, 40000, &binding);
        // Copied into another ClientHello first: refused, and the owner's
        // knock is not used up by it.
        assert_eq!(portal(&good, &[8u8; NONCE_LEN]), Err(Rejection::Unbound));
        assert!(portal(&good, &binding).is_ok());
        assert_eq!(portal(&good, &binding), Err(Rejection::Replay));
        assert_eq!(
            portal(&sealed(443, 40001, &[9u8; NONCE_LEN]), &[9u8; NONCE_LEN]),
            Err(Rejection::SourcePortMismatch {
                local_port: 40001,
                seen: 40000
            })
        );
        assert!(matches!(
            portal(&sealed(22, 40000, &[10u8; NONCE_LEN]), &[10u8; NONCE_LEN]),
            Err(Rejection::OutsidePolicy)
        ));
    }

    #[test]
    fn identity_and_enrollment_checks() {
        let (v, k) = setup("tcp/22", Some(unix_now() + 1), false);
        let gw: IpAddr = GW.parse().unwrap();
        let mut p = k.payload(gw, &req(Proto::Tcp, 22, 22), 0).unwrap();
        p.local_ip = "10.0.0.2".parse().unwrap();
        p.client_id = "someone-else".into();
        let wrong = knock(k.seal(&p).unwrap(), "10.0.0.2", 1, Carrier::Udp);
        assert!(matches!(check(&v, &wrong), Err(Rejection::WrongClientId { .. })));
        p.client_id = "dev".into();
        let later = v.check(
            &knock(k.seal(&p).unwrap(), "10.0.0.2", 1, Carrier::Udp),
            unix_now() + 5,
            |_, _| Ok(true),
        );
        assert_eq!(later.outcome, Err(Rejection::Expired), "enrollment expired");
        let full = v.check(
            &knock(k.seal(&p).unwrap(), "10.0.0.2", 1, Carrier::Udp),
            unix_now(),
            |_, _| Err(ReplayError::Full),
        );
        assert_eq!(
            full.outcome,
            Err(Rejection::ReplayCacheFull),
            "a full replay cache refuses, never skips the check"
        );
        let broken = v.check(
            &knock(k.seal(&p).unwrap(), "10.0.0.2", 1, Carrier::Udp),
            unix_now(),
            |_, _| Err(ReplayError::Failed("map gone".into())),
        );
        assert_eq!(
            broken.outcome,
            Err(Rejection::ReplayCacheFailed("map gone".into())),
            "and says why"
        );
    }

    #[test]
    fn a_revoked_clients_knock_is_refused_once_then_is_a_replay() {
        let (mut v, k) = setup("tcp/22", None, false);
        for c in v.registry.by_key.values_mut() {
            c.enabled = false;
        }
        let mut p = k.payload(GW.parse().unwrap(), &req(Proto::Tcp, 22, 22), 0).unwrap();
        p.local_ip = "10.0.0.2".parse().unwrap();
        let sent = knock(k.seal(&p).unwrap(), "10.0.0.2", 1, Carrier::Udp);
        let mut seen = HashSet::new();
        let mut check = |k: &Knock| v.check(k, unix_now(), |n, _| Ok(seen.insert(*n))).outcome;
        assert_eq!(check(&sent), Err(Rejection::Revoked));
        assert_eq!(
            check(&sent),
            Err(Rejection::Replay),
            "a captured copy says nothing more about its client"
        );
        assert!(Rejection::Replay.unproven() && !Rejection::Revoked.unproven());
    }
}
