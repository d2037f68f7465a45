//! The daemon's side of knocks: verify each diverted knock (and each knock
//! the portal found in a ClientHello), open what it grants, audit it, and
//! follow the client registry on disk, so that revoking a client takes
//! effect within a second and closes its entries.

use std::{cmp::Reverse, collections::BinaryHeap, time::SystemTime};

use serde_json::json;
use tracing::{info, warn};

use crate::{
    audit::Audit,
    clock,
    config::Settings,
    events::Diverted,
    gate::{Gate, GateError},
    knock::{
        verify::{Registry, Verifier},
        wire::NONCE_LEN,
    },
    portal::server::{Ask, Decision},
    state::{StateDir, StateError, unix_now},
};

/// Replay-cache nonces, soonest to be forgotten on top.
type Expiry = BinaryHeap<Reverse<(u64, [u8; NONCE_LEN])>>;

pub struct KnockService {
    state: StateDir,
    /// The replay cache's nonces by the time they may be forgotten, so a
    /// sweep touches only what expired; `None` until the first sweep has
    /// read what an earlier daemon recorded.
    expiry: Option<Expiry>,
    verifier: Verifier,
    audit: Audit,
    open_for_ns: u64,
    /// Where authorized portal sessions go unless their client names a place.
    portal_upstream: Option<String>,
    /// What the clients directory looked like at the last load.
    seen: Vec<(String, Option<SystemTime>)>,
}

/// Records `nonce` in the replay cache and, once the sweep has its index,
/// there too.
fn record(gate: &Gate, expiry: &mut Option<Expiry>, nonce: &[u8; NONCE_LEN], until: u64) -> Result<bool, GateError> {
    let fresh = gate.replay_record(nonce, until)?;
    if let (true, Some(expiry)) = (fresh, expiry.as_mut()) {
        expiry.push(Reverse((until, *nonce)));
    }
    Ok(fresh)
}

/// Names and modification times of the client and tunnel records: a
/// change means the registry must be reloaded.
fn snapshot(state: &StateDir) -> Vec<(String, Option<SystemTime>)> {
    let mut out: Vec<_> = [state.clients_dir(), state.root().join("tunnels")]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .map(|e| {
            (
                e.path().to_string_lossy().into_owned(),
                e.metadata().and_then(|m| m.modified()).ok(),
            )
        })
        .collect();
    out.sort();
    out
}

impl KnockService {
    /// Loads the server key and the clients from the state directory.
    pub fn start(settings: &Settings) -> Result<KnockService, StateError> {
        let state = StateDir::new(&settings.state_dir);
        let (registry, problems) = Registry::load(&state)?;
        for p in problems {
            warn!(problem = %p, "client left out");
        }
        let audit_path = state.audit_path();
        let audit = Audit::open(&audit_path).map_err(|source| StateError::Io {
            path: audit_path,
            source,
        })?;
        let seen = snapshot(&state);
        info!(clients = registry.clients().count(), state_dir = %settings.state_dir.display(), "knock verification on");
        Ok(KnockService {
            state,
            expiry: None,
            verifier: Verifier {
                registry,
                server_addrs: settings.public_addrs.clone(),
                window_secs: settings.knock_window.as_secs(),
            },
            audit,
            open_for_ns: settings.knock_open_for.as_nanos().min(u64::MAX as u128) as u64,
            portal_upstream: settings.portal.as_ref().map(|p| p.upstream.clone()),
            seen,
        })
    }

    /// Verifies one knock; opens and audits.
    pub fn handle(&mut self, gate: &Gate, knock: &Diverted) {
        let expiry = &mut self.expiry;
        let checked = self
            .verifier
            .check(knock, unix_now(), |nonce, until| record(gate, expiry, nonce, until));
        if let Ok(grant) = &checked.outcome {
            // A fresh knock for a live entry extends it and adds its ports.
            let expires = clock::now_ns().saturating_add(self.open_for_ns);
            if let Err(e) = gate.whitelist_grant(&grant.key, grant.ports, expires, 0, grant.client_id) {
                warn!(error = %e, "could not open the gate for an accepted knock");
            }
        }
        self.audit.knock(knock, &checked, self.open_for_ns / 1_000_000_000);
    }

    /// Decides what a portal connection may reach, and audits it. A portal
    /// knock opens nothing in the gate: it authorizes its own TLS session.
    pub fn handle_portal(&mut self, gate: &Gate, ask: Ask) {
        let expiry = &mut self.expiry;
        let (checked, own) = match ask.binding {
            Some(binding) => {
                let (checked, own) = self
                    .verifier
                    .check_portal(&ask.conn, &binding, unix_now(), |nonce, until| {
                        record(gate, expiry, nonce, until)
                    });
                (Some(checked), own)
            }
            None => (None, None),
        };
        let accepted = checked.as_ref().is_some_and(|c| c.outcome.is_ok());
        let upstream = accepted.then(|| own.or_else(|| self.portal_upstream.clone())).flatten();
        self.audit.portal(&ask.conn, checked.as_ref(), upstream.as_deref());
        let decision = upstream.map_or(Decision::Guidance, Decision::Upstream);
        // The portal gave up on this connection if nobody is listening.
        let _ = ask.reply.send(decision);
    }

    /// Writes out the audit lines of the batch just handled.
    pub fn flush(&mut self) {
        self.audit.flush();
    }

    /// Reloads the registry if the clients directory changed, and closes
    /// the entries of clients that are no longer allowed.
    pub fn follow_registry(&mut self, gate: &Gate) {
        let now_seen = snapshot(&self.state);
        if now_seen == self.seen {
            return;
        }
        self.seen = now_seen;
        let (registry, problems) = match Registry::load(&self.state) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "reloading clients failed; keeping the previous registry");
                return;
            }
        };
        for p in problems {
            warn!(problem = %p, "client left out");
        }
        let now = unix_now();
        let allowed: Vec<u32> = registry
            .clients()
            .filter(|c| c.enabled && c.expires.is_none_or(|e| now < e))
            .map(|c| c.id)
            .collect();
        let gone: Vec<(u32, String)> = self
            .verifier
            .registry
            .clients()
            .filter(|c| !allowed.contains(&c.id))
            .map(|c| (c.id, c.name.clone()))
            .collect();
        self.verifier.registry = registry;
        for (id, name) in gone {
            match gate.whitelist_remove_owner(id) {
                Ok(closed) => self
                    .audit
                    .event("client_revoked", json!({"client": name, "entries_closed": closed})),
                Err(e) => warn!(client = %name, error = %e, "closing a revoked client's entries failed"),
            }
        }
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
                    warn!(error = %e, "reading the replay cache failed; retrying next sweep");
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
                warn!(error = %e, "sweeping the replay cache failed; retrying next sweep");
                return;
            }
            expiry.pop();
        }
    }
}
