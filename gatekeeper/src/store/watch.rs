//! Following the state so that every revocation takes effect. The daemon
//! asks the [`Watcher`] every 250 ms (and at once when the CLI says it
//! changed something); the watcher reloads when the store's version moved,
//! keeps retrying after a failed read, and compares who was allowed before
//! with who is allowed now. Comparing allowed sets, not reloads, is what
//! makes it exact: a client revoked once is closed once; a client whose
//! enrollment runs out is closed when it does, with no file touched; a
//! client whose file turns unreadable is closed (fail closed) and named.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use super::{Problem, Snapshot, Store, StoreError};

/// A client or tunnel that was allowed and is not any more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub name: String,
    /// The whitelist owner id, for clients.
    pub id: Option<u32>,
    /// `revoked`, `expired`, `unreadable` or `removed`.
    pub why: &'static str,
}

/// What one look at the store found.
#[derive(Debug, Default)]
pub struct Change {
    /// The records, when they were read anew.
    pub reloaded: Option<Arc<Snapshot>>,
    pub closed_clients: Vec<Closed>,
    pub closed_tunnels: Vec<Closed>,
    /// Problems that appeared, and ones that went away, since the last look.
    pub new_problems: Vec<Problem>,
    pub fixed_problems: Vec<Problem>,
    /// Reading the store failed, for the first time since it last worked:
    /// the previous records stay in force and the watcher retries.
    pub failed: Option<String>,
    /// Reading works again after failing.
    pub recovered: bool,
}

pub struct Watcher {
    store: Arc<dyn Store>,
    version: Option<super::Version>,
    snapshot: Arc<Snapshot>,
    /// Clients allowed at the last look, by whitelist owner id.
    clients: BTreeMap<u32, String>,
    /// Tunnels live at the last look.
    tunnels: BTreeSet<String>,
    problems: BTreeSet<Problem>,
    failing: bool,
}

impl Watcher {
    /// Reads the store once; failing to read it at all is an error here,
    /// at start, rather than a daemon that runs on nothing.
    pub fn start(store: Arc<dyn Store>, unix_now: u64) -> Result<(Watcher, Change), StoreError> {
        let version = store.version()?;
        let snapshot = store.snapshot()?;
        let mut w = Watcher {
            store,
            version: Some(version),
            snapshot: Arc::new(Snapshot::default()),
            clients: BTreeMap::new(),
            tunnels: BTreeSet::new(),
            problems: BTreeSet::new(),
            failing: false,
        };
        let change = w.take(snapshot, unix_now);
        Ok((w, change))
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// The version of the records in force (none after a failed read).
    pub fn version(&self) -> Option<super::Version> {
        self.version.filter(|_| !self.failing)
    }

    /// Whether `owner` (a whitelist entry's owner id) may keep its entries.
    pub fn allows_owner(&self, owner: u32) -> bool {
        self.clients.contains_key(&owner)
    }

    /// Looks again: reloads when the store changed or the last read
    /// failed, and closes what ran out meanwhile either way.
    pub fn poll(&mut self, unix_now: u64) -> Change {
        match self.store.version() {
            Ok(v) if Some(v) == self.version && !self.failing => self.recheck(unix_now),
            Ok(v) => self.reload_at(Some(v), unix_now),
            Err(e) => self.fail(e),
        }
    }

    /// Reloads now, whatever the version says.
    pub fn reload(&mut self, unix_now: u64) -> Change {
        let version = self.store.version().ok();
        self.reload_at(version, unix_now)
    }

    fn reload_at(&mut self, version: Option<super::Version>, unix_now: u64) -> Change {
        match self.store.snapshot() {
            Ok(snapshot) => {
                let recovered = std::mem::take(&mut self.failing);
                self.version = version;
                let mut change = self.take(snapshot, unix_now);
                change.recovered = recovered;
                change
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: StoreError) -> Change {
        let first = !std::mem::replace(&mut self.failing, true);
        Change {
            failed: first.then(|| crate::error_chain(&e)),
            ..Change::default()
        }
    }

    /// The same records at a later time: only expiries can close anything.
    fn recheck(&mut self, unix_now: u64) -> Change {
        let snapshot = self.snapshot.clone();
        let mut change = Change::default();
        self.diff(&snapshot, unix_now, &mut change);
        change
    }

    fn take(&mut self, snapshot: Snapshot, unix_now: u64) -> Change {
        let snapshot = Arc::new(snapshot);
        let mut change = Change {
            reloaded: Some(snapshot.clone()),
            ..Change::default()
        };
        let problems: BTreeSet<Problem> = snapshot.problems.iter().cloned().collect();
        change.new_problems = problems.difference(&self.problems).cloned().collect();
        change.fixed_problems = self.problems.difference(&problems).cloned().collect();
        self.problems = problems;
        self.diff(&snapshot, unix_now, &mut change);
        self.snapshot = snapshot;
        change
    }

    /// Compares who is allowed now with who was, and remembers now.
    fn diff(&mut self, snapshot: &Snapshot, unix_now: u64, change: &mut Change) {
        let clients: BTreeMap<u32, String> = snapshot
            .clients
            .iter()
            .filter(|c| c.allowed_at(unix_now))
            .map(|c| (c.id, c.name.clone()))
            .collect();
        let tunnels: BTreeSet<String> = snapshot
            .tunnels
            .iter()
            .filter(|t| t.live_at(unix_now))
            .map(|t| t.name.clone())
            .collect();
        for (id, name) in &self.clients {
            if !clients.contains_key(id) {
                let why = match snapshot.clients.iter().find(|c| c.id == *id) {
                    Some(c) if !c.enabled => "revoked",
                    Some(_) => "expired",
                    None => self.gone_why(snapshot, "clients", name),
                };
                change.closed_clients.push(Closed {
                    name: name.clone(),
                    id: Some(*id),
                    why,
                });
            }
        }
        for name in self.tunnels.difference(&tunnels) {
            let why = match snapshot.tunnels.iter().find(|t| &t.name == name) {
                Some(t) if t.revoked => "revoked",
                Some(_) => "expired",
                None => self.gone_why(snapshot, "tunnels", name),
            };
            change.closed_tunnels.push(Closed {
                name: name.clone(),
                id: None,
                why,
            });
        }
        self.clients = clients;
        self.tunnels = tunnels;
    }

    /// Why a record vanished: its file is there but unusable, or it is gone.
    fn gone_why(&self, snapshot: &Snapshot, kind: &str, name: &str) -> &'static str {
        let unreadable = snapshot.problems.iter().any(|p| {
            let path = Path::new(&p.path);
            path.file_stem().is_some_and(|s| s == name)
                && path.parent().and_then(|d| d.file_name()).is_some_and(|d| d == kind)
        });
        if unreadable { "unreadable" } else { "removed" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewClient, files::FileStore};

    fn closed(c: &Change) -> Vec<(&str, &'static str)> {
        c.closed_clients.iter().map(|c| (c.name.as_str(), c.why)).collect()
    }

    fn new(name: &str, expires_in: Option<std::time::Duration>) -> NewClient {
        NewClient {
            name: name.into(),
            allow: "tcp/22".parse().unwrap(),
            expires_in,
            nat: false,
            portal_upstream: None,
            public_key: None,
            gateway: None,
            fwknop: None,
            open_for: None,
        }
    }

    #[test]
    fn each_revocation_closes_once_and_bad_files_are_reported_once() {
        let dir = std::env::temp_dir().join(format!("gk-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = FileStore::new(&dir);
        files.init(&["192.0.2.1".parse().unwrap()], false).unwrap();
        let store: Arc<dyn Store> = Arc::new(files.clone());
        store.add_client(&new("alice", None)).unwrap();
        store.add_client(&new("bob", None)).unwrap();
        store
            .add_client(&new("carol", Some(std::time::Duration::from_secs(100))))
            .unwrap();
        let now = crate::clock::unix_now();
        let (mut w, first) = Watcher::start(store.clone(), now).unwrap();
        assert!(first.closed_clients.is_empty());
        assert!(w.allows_owner(1) && w.allows_owner(3));

        std::fs::write(dir.join("clients/broken.toml"), "name = ").unwrap();
        store.set_client_enabled("alice", false).unwrap();
        let c = w.poll(now);
        assert_eq!(closed(&c), [("alice", "revoked")]);
        assert_eq!(c.new_problems.len(), 1);
        assert!(!w.allows_owner(1));

        // Nothing changed: nothing closes again, nothing is reported again.
        let c = w.poll(now);
        assert!(c.reloaded.is_none() && c.closed_clients.is_empty() && c.new_problems.is_empty());
        let c = w.reload(now);
        assert!(c.reloaded.is_some() && c.closed_clients.is_empty() && c.new_problems.is_empty());

        // Time alone closes carol; a file turned bad closes bob.
        let c = w.poll(now + 200);
        assert_eq!(closed(&c), [("carol", "expired")]);
        std::fs::write(dir.join("clients/bob.toml"), "name = \"bob\"\n").unwrap();
        let c = w.poll(now + 200);
        assert_eq!(closed(&c), [("bob", "unreadable")]);

        // An unreadable directory keeps the last records, says so once, retries.
        std::fs::remove_dir_all(dir.join("clients")).unwrap();
        std::fs::write(dir.join("clients"), "not a directory").unwrap();
        let c = w.poll(now + 200);
        assert!(c.failed.is_some() && c.closed_clients.is_empty());
        assert!(w.poll(now + 200).failed.is_none(), "reported once");
        std::fs::remove_file(dir.join("clients")).unwrap();
        let c = w.poll(now + 200);
        assert!(c.recovered && c.reloaded.is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
