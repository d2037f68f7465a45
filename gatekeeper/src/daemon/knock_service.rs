//! The daemon's side of knocks: verify each diverted knock (and each knock
//! the portal found in a ClientHello), open what it grants, and audit it.
//! It owns the verifier's registry, rebuilt from the store's records
//! whenever they change, and the index of the replay cache. In a cluster
//! an accepted knock (v1 or fwknop's) waits for its nonce (or replay id)
//! to be claimed in the shared replay cache (one round trip) before it
//! opens anything; grants other nodes published are checked against the
//! same registry and opened here.

use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap, HashMap},
    net::IpAddr,
    time::Duration,
};

use super::cluster::{Claimed, Link, Outage, SharedGrant};

use gatekeeper_common::maps::{FLAG_OPERATOR, KEY_ID_LEN};
use tracing::warn;

use crate::{
    audit::{Audit, Opened},
    clock::{self, unix_now},
    gate::{Gate, GateError},
    knock::{
        ask::{Ask, Verdict},
        keys::{self, ServerKeys},
        verify::{
            Checked, Client, ClientKeys, Format, Grant, Knock, Registry, Rejection, ReplayError, Standing, Verifier,
        },
        wire::NONCE_LEN,
    },
    spec::{PortRange, Proto},
    store::{
        Problem, Snapshot,
        cluster::Question,
        config::{Settings, WhenUnreachable},
    },
};

/// Replay-cache nonces, soonest to be forgotten on top.
type Expiry = BinaryHeap<Reverse<(u64, [u8; NONCE_LEN])>>;

pub struct KnockService {
    /// The knock keys the `derived` keys were derived from.
    server: Option<ServerKeys>,
    /// Keys derived for each enrolled public key, so a change to one record
    /// does not cost an agreement per client.
    derived: HashMap<String, ClientKeys>,
    /// The replay cache's nonces by the time they may be forgotten, so a
    /// sweep touches only what expired; `None` until the first sweep has
    /// read what an earlier daemon recorded.
    expiry: Option<Expiry>,
    verifier: Verifier,
    audit: Audit,
    /// Where authorized portal sessions go unless their client names a place.
    portal_upstream: Option<String>,
    /// The relay's HTTP port, where this node serves relayed hosts.
    relay_port: Option<u16>,
    /// The tunnel listener's port, where every enrolled device may come
    /// to learn the gateway's knock key (see `knock::note`).
    tunnel_port: u16,
    cluster: Option<Cluster>,
}

/// A cluster node's share of the knocks: the link, and the accepted
/// knocks (with their grants) waiting for their nonce to be claimed.
struct Cluster {
    link: Link,
    pending: HashMap<u64, (Knock, Checked, Vec<Grant>)>,
    next_id: u64,
    when_unreachable: WhenUnreachable,
    outage: Outage,
}

/// Records `nonce` in the replay cache and, once the sweep has its index,
/// there too.
fn record(gate: &Gate, expiry: &mut Option<Expiry>, nonce: &[u8; NONCE_LEN], until: u64) -> Result<bool, ReplayError> {
    let fresh = gate.replay_record(nonce, until).map_err(|e| match e {
        GateError::ReplayFull => ReplayError::Full,
        other => ReplayError::Failed(crate::error_chain(&other)),
    })?;
    if let (true, Some(expiry)) = (fresh, expiry.as_mut()) {
        expiry.push(Reverse((until, *nonce)));
    }
    Ok(fresh)
}

impl KnockService {
    pub fn new(settings: &Settings, audit: Audit) -> KnockService {
        KnockService {
            server: None,
            derived: HashMap::new(),
            expiry: None,
            verifier: Verifier::new(
                Registry::default(),
                server_addrs(settings),
                settings.knock_window.as_secs(),
                settings.knock_open_for,
            ),
            audit,
            portal_upstream: settings.portal.as_ref().map(|p| p.upstream.clone()),
            relay_port: settings.relay.as_ref().map(|r| r.listen.port()),
            tunnel_port: settings.tunnel_port,
            cluster: None,
        }
    }

    /// Shares the replay cache and the grants through `link`.
    pub fn join(&mut self, link: Link, when_unreachable: WhenUnreachable) {
        self.cluster = Some(Cluster {
            link,
            pending: HashMap::new(),
            next_id: 0,
            when_unreachable,
            outage: Outage::default(),
        });
    }

    /// Rebuilds the registry from `snapshot`, with its knock keys. Every
    /// client may knock for the tunnel listener, to learn the knock key;
    /// a live tunnel lets the clients it names knock for its published
    /// port, a live relay for the relay's HTTP port. Returns every
    /// enrolled key id (for the XDP program's KNOCK_KEYS) and the records
    /// that could not be used.
    pub fn set_clients(&mut self, snapshot: &Snapshot) -> (BTreeSet<[u8; KEY_ID_LEN]>, Vec<Problem>) {
        let now = unix_now();
        let mut registry = Registry::default();
        let mut problems = Vec::new();
        if snapshot.server_keys.is_some() && snapshot.server_keys != self.server {
            self.server = snapshot.server_keys.clone();
            self.derived.clear();
        }
        let Some(server) = &self.server else {
            return (BTreeSet::new(), problems);
        };
        self.verifier.set_server(server);
        self.derived.retain(|public, _| {
            snapshot
                .clients
                .iter()
                .any(|c| &c.public_key == public || c.previous_public_key.as_ref() == Some(public))
        });
        for rec in &snapshot.clients {
            let mut policy = rec.policy();
            let note = PortRange {
                lo: self.tunnel_port,
                hi: self.tunnel_port,
            };
            policy.ranges.push((Proto::Tcp, note));
            for t in snapshot
                .tunnels
                .iter()
                .filter(|t| t.live_at(now) && t.allow.contains(&rec.name))
            {
                policy.ranges.push((
                    Proto::Tcp,
                    PortRange {
                        lo: t.public_port,
                        hi: t.public_port,
                    },
                ));
            }
            if let Some(port) = self.relay_port
                && snapshot
                    .relays
                    .iter()
                    .any(|r| r.live_at(now) && r.allow.contains(&rec.name))
            {
                policy.ranges.push((Proto::Tcp, PortRange { lo: port, hi: port }));
            }
            let standing = Standing {
                name: rec.name.clone(),
                id: rec.id,
                policy,
                enabled: rec.enabled,
                nat: rec.nat,
                expires: rec.expires,
                portal_upstream: rec.portal_upstream.clone(),
                fwknop: None,
                open_for: rec.open_for.map(Duration::from_secs),
            };
            let standing = match rec.fwknop.as_ref().map(|k| k.key()) {
                Some(Ok(key)) => Standing {
                    fwknop: Some(key),
                    ..standing
                },
                Some(Err(e)) => {
                    problems.push(Problem {
                        path: format!("client {}", rec.name),
                        reason: format!("fwknop: {e}"),
                    });
                    standing
                }
                None => standing,
            };
            let mut derive = |public: &str| match self.derived.get(public) {
                Some(keys) => Ok(keys.clone()),
                None => keys::decode_public(public)
                    .and_then(|key| ClientKeys::derive(server, &key))
                    .inspect(|keys| {
                        self.derived.insert(public.to_string(), keys.clone());
                    }),
            };
            // A re-issued agent's old key, until its overlap ends.
            if let (Some((_, until)), Some(previous)) = (rec.previous_public(now), &rec.previous_public_key)
                && let Ok(keys) = derive(previous)
            {
                let standing = Standing {
                    expires: Some(rec.expires.map_or(until, |e| e.min(until))),
                    ..standing.clone()
                };
                registry.insert(Client::new(keys, standing));
            }
            match derive(&rec.public_key) {
                Ok(keys) => registry.insert(Client::new(keys, standing)),
                Err(e) => problems.push(Problem {
                    path: format!("client {}", rec.name),
                    reason: format!("public_key: {e}"),
                }),
            }
        }
        let keys = registry.clients().map(|c| *c.key_id()).collect();
        self.verifier.registry = registry;
        (keys, problems)
    }

    /// Whether some client knocks with fwknop.
    pub fn reads_fwknop(&self) -> bool {
        self.verifier.registry.clients().any(|c| c.fwknop.is_some())
    }

    /// Verifies one knock (v1, or fwknop's when it lacks v1's prefix);
    /// opens what it grants, then audits what happened. In a cluster, an
    /// accepted knock is first claimed (see [`Self::claimed`]).
    pub fn handle(&mut self, gate: &Gate, knock: &Knock) {
        let expiry = &mut self.expiry;
        let mut recorded = None;
        let record = |nonce: &[u8; NONCE_LEN], until| {
            let fresh = record(gate, expiry, nonce, until);
            if matches!(fresh, Ok(true)) {
                recorded = Some((*nonce, until));
            }
            fresh
        };
        let (checked, grants) = if knock.format() == Format::Fwknop {
            self.verifier.check_fwknop(knock, unix_now(), record)
        } else {
            let checked = self.verifier.check(knock, unix_now(), record);
            let grants = checked.outcome.as_ref().ok().cloned().into_iter().collect();
            (checked, grants)
        };
        if let (true, Some(c), Some((nonce, until))) = (checked.outcome.is_ok(), self.cluster.as_mut(), recorded) {
            let now_ms = crate::clock::unix_now_ms();
            let shared: Vec<SharedGrant> = grants
                .iter()
                .map(|g| {
                    let expires_ms = now_ms.saturating_add(g.open_for.as_millis().min(u64::MAX as u128) as u64);
                    SharedGrant::new(c.link.node(), &g.key, g.ports, expires_ms, g.client_id)
                })
                .collect();
            let id = c.next_id;
            c.next_id += 1;
            c.link.claim(id, &nonce, until, &shared);
            c.pending.insert(id, (knock.clone(), checked, grants));
            return;
        }
        self.open_grants(gate, knock, checked, &grants, false);
    }

    /// The cluster's answer to the claim on knock `id`'s nonce: a fresh
    /// nonce opens, a taken one is a replay, and without an answer the
    /// node decides alone or refuses, as configured.
    pub fn claimed(&mut self, gate: &Gate, id: u64, claimed: Claimed) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let Some((knock, mut checked, grants)) = c.pending.remove(&id) else {
            return;
        };
        let mut alone = false;
        match claimed {
            Claimed::Fresh => c.outage.recovered(),
            Claimed::Taken => {
                c.outage.recovered();
                checked.outcome = Err(Rejection::Replay);
            }
            Claimed::Unreachable(why) => {
                c.outage.failed(&why);
                match c.when_unreachable {
                    WhenUnreachable::Refuse => checked.outcome = Err(Rejection::ClusterUnreachable(why)),
                    WhenUnreachable::Local => alone = true,
                }
            }
        }
        self.open_grants(gate, &knock, checked, &grants, alone);
    }

    /// Opens, in this node's gate, a grant another node published, if the
    /// client it names may open it here too and it has not run out.
    pub fn shared_grant(&self, gate: &Gate, grant: &SharedGrant) {
        let Some(proto) = Proto::from_number(grant.proto) else {
            return;
        };
        let now_ms = crate::clock::unix_now_ms();
        if grant.expires_ms <= now_ms
            || !self
                .verifier
                .registry
                .admits(grant.owner, proto, grant.ports(), unix_now())
        {
            return;
        }
        let expires = clock::now_ns().saturating_add((grant.expires_ms - now_ms).saturating_mul(1_000_000));
        if let Err(e) = gate.whitelist_grant(&grant.key(), grant.ports(), expires, 0, grant.owner) {
            warn!(error = %crate::error_chain(&e), node = %grant.node, "could not open a grant another node published");
        }
    }

    /// In a cluster, answers a question every node was asked.
    pub fn answer(&self, question: &Question, answer: serde_json::Value) {
        if let Some(c) = &self.cluster {
            c.link.answer(question, answer);
        }
    }

    /// In a cluster, opens every grant the other nodes hold live: what a
    /// node starting (or restarted) does before it gates.
    pub async fn load_grants(&self, gate: &Gate) {
        let Some(c) = &self.cluster else {
            return;
        };
        match c.link.live_grants().await {
            Ok(all) => {
                for grant in &all {
                    self.shared_grant(gate, grant);
                }
                tracing::info!(grants = all.len(), "opened the cluster's live grants");
            }
            Err(e) => warn!(error = %e, "reading the cluster's live grants failed; they arrive once it answers"),
        }
    }

    /// Writes this node's replay cache and live grants back into the
    /// cluster (see [`Link::republish`]).
    pub fn republish(&self, gate: &Gate) {
        let Some(c) = &self.cluster else {
            return;
        };
        let nonces = match gate.replay_entries() {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "reading the replay cache to write it back failed");
                Vec::new()
            }
        };
        let (now_ns, now_ms) = (clock::now_ns(), crate::clock::unix_now_ms());
        let grants = gate
            .whitelist()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.value.owner != 0 && e.value.flags & FLAG_OPERATOR == 0 && e.value.expires_ns > now_ns)
            .flat_map(|e| {
                let expires_ms = now_ms + (e.value.expires_ns - now_ns) / 1_000_000;
                e.value
                    .used_spans()
                    .map(|s| {
                        let ports = PortRange { lo: s.lo, hi: s.hi };
                        SharedGrant::new(c.link.node(), &e.key, ports, expires_ms, e.value.owner)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        c.link.republish(nonces, grants);
    }

    /// Opens `grants`, all of an accepted knock's, then audits it.
    fn open_grants(&mut self, gate: &Gate, knock: &Knock, checked: Checked, grants: &[Grant], alone: bool) {
        let opened = checked.outcome.is_ok().then(|| {
            // A fresh knock for a live entry extends it and adds its ports.
            let now = clock::now_ns();
            let open_for = grants.first().map_or(Duration::ZERO, |g| g.open_for);
            let written = grants.iter().try_for_each(|grant| {
                let expires = now.saturating_add(grant.open_for.as_nanos().min(u64::MAX as u128) as u64);
                gate.whitelist_grant(&grant.key, grant.ports, expires, 0, grant.client_id)
                    .map(drop)
            });
            match written {
                Ok(()) => Opened::Entry {
                    src_port: grants
                        .first()
                        .and_then(|g| (g.key.src_port != 0).then_some(g.key.src_port)),
                    ports: grants
                        .iter()
                        .map(|g| format!("{}-{}", g.ports.lo, g.ports.hi))
                        .collect::<Vec<_>>()
                        .join(","),
                    for_secs: open_for.as_secs(),
                    alone,
                },
                Err(e) => {
                    let why = crate::error_chain(&e);
                    warn!(error = %why, "could not open the gate for an accepted knock");
                    Opened::Failed(why)
                }
            }
        });
        self.audit.knock(knock, &checked, opened);
    }

    /// Decides what a portal connection may reach, and audits it. A portal
    /// knock opens nothing in the gate: it authorizes its own TLS session.
    pub fn handle_portal(&mut self, gate: &Gate, ask: Ask) {
        let expiry = &mut self.expiry;
        let (checked, own) = match ask.binding {
            Some(binding) => {
                let (checked, own) = self
                    .verifier
                    .check_portal(&ask.knock, &binding, unix_now(), |nonce, until| {
                        record(gate, expiry, nonce, until)
                    });
                (Some(checked), own)
            }
            None => (None, None),
        };
        let client = checked
            .as_ref()
            .and_then(|c| c.outcome.as_ref().ok())
            .map(|g| g.client_id);
        let upstream = client.and(own.or_else(|| self.portal_upstream.clone()));
        self.audit.portal(&ask.knock, checked.as_ref(), upstream.as_deref());
        let verdict = match (upstream, client) {
            (Some(addr), Some(client)) => Verdict::Upstream { addr, client },
            _ => Verdict::Guidance,
        };
        // The portal gave up on this connection if nobody is listening.
        let _ = ask.reply.send(verdict);
    }

    /// Forgets replay-cache nonces whose window has passed.
    pub fn sweep(&mut self, gate: &Gate) {
        let expiry = match &mut self.expiry {
            Some(expiry) => expiry,
            slot @ None => match gate.replay_entries() {
                Ok(entries) => slot.insert(
                    entries
                        .into_iter()
                        .map(|(nonce, until)| Reverse((until, nonce)))
                        .collect(),
                ),
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), "reading the replay cache failed; retrying next sweep");
                    return;
                }
            },
        };
        let now = unix_now();
        while let Some(Reverse((until, nonce))) = expiry.peek().copied() {
            if until > now {
                break;
            }
            if let Err(e) = gate.replay_forget(&nonce) {
                warn!(error = %crate::error_chain(&e), "sweeping the replay cache failed; retrying next sweep");
                return;
            }
            expiry.pop();
        }
    }
}

/// The addresses a knock may name: the public ones and, in a cluster, this
/// node's own (agents knock each node there). None at all: any.
fn server_addrs(settings: &Settings) -> Vec<IpAddr> {
    let mut addrs = settings.public_addrs.clone();
    if !addrs.is_empty()
        && let Some(own) = settings.cluster.as_ref().and_then(|c| c.advertise)
        && !addrs.contains(&own)
    {
        addrs.push(own);
    }
    addrs
}
