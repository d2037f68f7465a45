//! The local-files backend: one gateway's state directory (default
//! `/var/lib/gatekeeper`), all it needs to run alone.
//!
//! ```text
//! server.key              the gateway's knock keys (0600; see `keys::ServerKeys`)
//! gatekeeper.toml         the config (`gatekeeper init` writes a starter)
//! gateway.crt, .key       the TLS identity of the tunnel listener and portal
//! clients/NAME.toml       one enrolled device: public key and policy
//! tunnels/NAME.toml       one published service
//! relays/NAME.toml        one relay agent: public key and host
//! audit.log               the audit trail (see docs/audit.md)
//! control.sock            the running daemon's control socket
//! daemon.lock             held by the daemon serving this directory
//! ```
//!
//! Every file is written whole through [`crate::private_file`], 0600. The
//! gateway keeps only each client's public key.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    io,
    net::IpAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};
use tunnel::tls::Identity;
use x25519_dalek::PublicKey;

use super::{
    ClientRecord, Kind, Loaded, Problem, Put, RelayRecord, Snapshot, Store, StoreError, TunnelRecord, Version,
    config::ConfigFile, valid_name,
};
use crate::{
    knock::keys::{self, ServerKeys},
    private_file,
};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/gatekeeper";
const SERVER_KEY: &str = "server.key";
pub const CONFIG_FILE: &str = "gatekeeper.toml";
const CERT: &str = "gateway.crt";
const KEY: &str = "gateway.key";
/// Where earlier versions kept the same identity; adopted on first use.
const OLD_CERT_AND_KEY: (&str, &str) = ("tunnel.crt", "tunnel.key");
pub const CONTROL_SOCKET: &str = "control.sock";
const DAEMON_LOCK: &str = "daemon.lock";
/// A record file larger than this is refused unread.
const MAX_RECORD: u64 = 64 * 1024;

/// A state directory.
#[derive(Clone, Debug)]
pub struct FileStore {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl FileStore {
    pub fn new(root: &Path) -> FileStore {
        FileStore {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// Where the daemon for this state writes its audit trail: `[audit]
    /// path` in the config, else `audit.log` here.
    pub fn audit_path(&self) -> Result<PathBuf, StoreError> {
        Ok(self.config()?.audit_path(&self.root))
    }

    pub fn control_socket(&self) -> PathBuf {
        self.root.join(CONTROL_SOCKET)
    }

    fn record_path(&self, kind: Kind, name: &str) -> PathBuf {
        self.root.join(kind.plural()).join(format!("{name}.toml"))
    }

    /// Takes the lock only one daemon per state directory may hold; the
    /// kernel releases it however that daemon ends.
    pub fn lock_daemon(&self) -> Result<crate::gate::pins::DaemonLock, crate::gate::pins::PinError> {
        crate::gate::pins::lock_file(&self.root.join(DAEMON_LOCK), &self.root.display().to_string())
    }

    /// Makes the directory (0700) if it is not there: a cluster node keeps
    /// its own config, audit trail and control socket in it.
    pub fn prepare(&self) -> Result<(), StoreError> {
        self.ensure_dir(&self.root)
    }

    fn ensure_dir(&self, dir: &Path) -> Result<(), StoreError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
    }

    /// One record file: read, parsed, checked against its name.
    fn read_record<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
        if !meta.file_type().is_file() {
            return Err("not a regular file (links are not followed)".into());
        }
        if meta.len() > MAX_RECORD {
            return Err(format!("{} bytes, larger than any record", meta.len()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        toml::from_str(&text).map_err(|e| super::toml_error(&text, &e))
    }

    /// Every `*.toml` record in `dir` with its path and file stem; the
    /// unreadable ones as problems. Dot-files (a writer's temporaries) are
    /// not records.
    /// Every record of `kind`, in path order (so which of two clashing
    /// records is skipped does not depend on the directory's order).
    fn read_dir<T: DeserializeOwned>(&self, kind: Kind) -> Result<Loaded<T>, StoreError> {
        let dir = self.root.join(kind.plural());
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
            Err(source) => return Err(StoreError::Io { path: dir, source }),
        };
        let (mut records, mut problems) = (Vec::new(), Vec::new());
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".toml"))
                .filter(|n| !n.starts_with('.'))
            else {
                continue;
            };
            let shown = path.display().to_string();
            match Self::read_record(&path) {
                Ok(rec) => records.push((shown, stem.to_string(), rec)),
                Err(reason) => problems.push(Problem { path: shown, reason }),
            }
        }
        records.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((records, problems))
    }

    fn get<T: DeserializeOwned>(&self, kind: Kind, name: &str) -> Result<T, StoreError> {
        let path = self.record_path(kind, name);
        if !valid_name(name) || !path.exists() {
            return Err(kind.missing(name));
        }
        Self::read_record(&path).map_err(|reason| StoreError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Writes `rec` as TOML to `KINDS/NAME.toml`; refused if it is there
    /// already and `put` says create.
    fn put(&self, kind: Kind, name: &str, rec: &impl Serialize, put: Put) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::Name {
                kind: kind.noun(),
                name: name.to_string(),
            });
        }
        let path = self.record_path(kind, name);
        let text = toml::to_string(rec).map_err(|e| StoreError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        self.ensure_dir(&self.root.join(kind.plural()))?;
        let written = match put {
            Put::Create => private_file::create(&path, &text),
            Put::Replace => private_file::write(&path, &text),
        };
        match written {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(kind.duplicate(name)),
            other => other.map_err(io_err(&path)),
        }
    }
}

fn hash_meta(h: &mut DefaultHasher, path: &Path) {
    path.hash(h);
    if let Ok(m) = std::fs::symlink_metadata(path) {
        (m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime_nsec()).hash(h);
    }
}

impl Store for FileStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn initialised(&self) -> bool {
        self.root.join(SERVER_KEY).exists()
    }

    fn init(&self, public_addrs: &[IpAddr], force: bool) -> Result<PublicKey, StoreError> {
        let key_path = self.root.join(SERVER_KEY);
        if key_path.exists() && !force {
            return Err(StoreError::Exists(key_path.display().to_string()));
        }
        self.ensure_dir(&self.root)?;
        for kind in Kind::ALL {
            self.ensure_dir(&self.root.join(kind.plural()))?;
        }
        let keys = ServerKeys::new(keys::generate());
        self.put_server_keys(&keys)?;
        let config = self.config_path();
        if !config.exists() || force {
            private_file::write(
                &config,
                &ConfigFile::starter(
                    public_addrs,
                    &format!("gatekeeper run --state-dir {}", self.root.display()),
                ),
            )
            .map_err(io_err(&config))?;
        }
        Ok(keys.public())
    }

    fn server_keys(&self) -> Result<ServerKeys, StoreError> {
        let path = self.root.join(SERVER_KEY);
        if !path.exists() {
            return Err(StoreError::NotInitialised(self.location()));
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        ServerKeys::parse(&text).map_err(|e| StoreError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    fn put_server_keys(&self, keys: &ServerKeys) -> Result<(), StoreError> {
        let path = self.root.join(SERVER_KEY);
        private_file::write(&path, &keys.to_text()).map_err(io_err(&path))
    }

    fn identity(&self) -> Result<Identity, StoreError> {
        let (crt, key) = (self.root.join(CERT), self.root.join(KEY));
        let (old_crt, old_key) = (self.root.join(OLD_CERT_AND_KEY.0), self.root.join(OLD_CERT_AND_KEY.1));
        if !crt.exists() && !key.exists() && old_crt.exists() && old_key.exists() {
            std::fs::rename(&old_key, &key).map_err(io_err(&key))?;
            std::fs::rename(&old_crt, &crt).map_err(io_err(&crt))?;
        }
        match (crt.exists(), key.exists()) {
            (true, true) => {
                let read = |p: &Path| std::fs::read_to_string(p).map_err(io_err(p));
                Identity::from_pem(&read(&crt)?, &read(&key)?).map_err(StoreError::Tls)
            }
            (false, false) => {
                let id = Identity::generate(&self.config()?.certificate_names()).map_err(StoreError::Tls)?;
                let (c, k) = id.to_pem();
                self.ensure_dir(&self.root)?;
                private_file::write(&key, k).map_err(io_err(&key))?;
                private_file::write(&crt, c).map_err(io_err(&crt))?;
                Ok(id)
            }
            (present, _) => {
                let (here, gone) = if present { (&crt, &key) } else { (&key, &crt) };
                Err(StoreError::Invalid {
                    path: here.display().to_string(),
                    reason: format!(
                        "{} is missing; remove both files to have a new pair made",
                        gone.display()
                    ),
                })
            }
        }
    }

    fn put_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let (crt, key) = (self.root.join(CERT), self.root.join(KEY));
        let (c, k) = identity.to_pem();
        // The key first: a renewal keeps it, so a crash between the two
        // leaves the old certificate with its own key.
        private_file::write(&key, k).map_err(io_err(&key))?;
        private_file::write(&crt, c).map_err(io_err(&crt))
    }

    fn config(&self) -> Result<ConfigFile, StoreError> {
        let path = self.config_path();
        if !path.exists() {
            return Ok(ConfigFile::default());
        }
        Ok(ConfigFile::load(&path)?)
    }

    fn version(&self) -> Result<Version, StoreError> {
        let mut h = DefaultHasher::new();
        for file in [SERVER_KEY, CONFIG_FILE, CERT] {
            hash_meta(&mut h, &self.root.join(file));
        }
        for kind in Kind::ALL {
            let dir = self.root.join(kind.plural());
            let mut names: Vec<PathBuf> = match std::fs::read_dir(&dir) {
                Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(source) => return Err(StoreError::Io { path: dir, source }),
            };
            names.sort();
            for path in &names {
                hash_meta(&mut h, path);
            }
        }
        Ok(Version(h.finish()))
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let (clients, mut problems) = self.read_dir::<ClientRecord>(Kind::Client)?;
        let (tunnels, more) = self.read_dir::<TunnelRecord>(Kind::Tunnel)?;
        problems.extend(more);
        let (relays, more) = self.read_dir::<RelayRecord>(Kind::Relay)?;
        problems.extend(more);
        let mut snap = Snapshot {
            problems,
            server_keys: self.initialised().then(|| self.server_keys()).transpose()?,
            ..Snapshot::default()
        };
        snap.admit(clients, tunnels, relays);
        Ok(snap)
    }

    fn client(&self, name: &str) -> Result<ClientRecord, StoreError> {
        let rec: ClientRecord = self.get(Kind::Client, name)?;
        rec.check(name).map_err(|reason| StoreError::Invalid {
            path: self.record_path(Kind::Client, name).display().to_string(),
            reason,
        })?;
        Ok(rec)
    }

    fn put_client(&self, rec: &ClientRecord, put: Put) -> Result<(), StoreError> {
        self.put(Kind::Client, &rec.name, rec, put)
    }

    fn tunnel(&self, name: &str) -> Result<TunnelRecord, StoreError> {
        self.get(Kind::Tunnel, name)
    }

    fn put_tunnel(&self, rec: &TunnelRecord, put: Put) -> Result<(), StoreError> {
        self.put(Kind::Tunnel, &rec.name, rec, put)
    }

    fn relay(&self, name: &str) -> Result<RelayRecord, StoreError> {
        self.get(Kind::Relay, name)
    }

    fn put_relay(&self, rec: &RelayRecord, put: Put) -> Result<(), StoreError> {
        self.put(Kind::Relay, &rec.name, rec, put)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewClient;

    pub(crate) fn fresh(tag: &str) -> (FileStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("gk-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = FileStore::new(&dir);
        store.init(&["192.0.2.1".parse().unwrap()], false).unwrap();
        (store, dir)
    }

    fn new(name: &str) -> NewClient {
        NewClient {
            name: name.into(),
            allow: "tcp/22".parse().unwrap(),
            expires_in: None,
            nat: false,
            portal_upstream: None,
            public_key: None,
            gateway: None,
            fwknop: None,
            open_for: None,
        }
    }

    #[test]
    fn bad_files_are_problems_and_block_nobody() {
        let (s, dir) = fresh("bad");
        s.add_client(&new("alice")).unwrap();
        let clients = dir.join(Kind::Client.plural());
        std::fs::write(clients.join("typo.toml"), "name = \"typo\"\nallow = tcp/22\n").unwrap();
        std::fs::write(
            clients.join("nokey.toml"),
            "name = \"nokey\"\nid = 9\nallow = \"tcp/22\"\nenabled = true\ncreated = 0\n",
        )
        .unwrap();
        std::fs::write(
            clients.join("other.toml"),
            std::fs::read_to_string(clients.join("alice.toml")).unwrap(),
        )
        .unwrap();
        std::fs::write(clients.join(".alice.toml.0123.tmp"), "half a write").unwrap();

        let snap = s.snapshot().unwrap();
        let names: Vec<&str> = snap.clients.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["alice"]);
        let problems: Vec<String> = snap.problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].contains("nokey.toml") && problems[0].contains("public_key"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("other.toml") && problems[1].contains("named after"),
            "{problems:?}"
        );
        assert!(
            problems[2].contains("typo.toml") && problems[2].contains("line 2"),
            "{problems:?}"
        );

        // Revocation and enrollment go on.
        assert!(!s.set_client_enabled("alice", false).unwrap().enabled);
        let (bob, _) = s.add_client(&new("bob")).unwrap();
        assert_eq!(bob.id, 2);
        assert!(matches!(s.add_client(&new("bob")), Err(StoreError::DuplicateClient(_))));
        assert!(matches!(s.client("../server"), Err(StoreError::NoSuchClient(_))));
        assert!(matches!(s.client("typo"), Err(StoreError::Invalid { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_version_moves_with_every_record() {
        let (s, dir) = fresh("version");
        let v0 = s.version().unwrap();
        assert_eq!(v0, s.version().unwrap());
        s.add_client(&new("alice")).unwrap();
        let v1 = s.version().unwrap();
        assert_ne!(v0, v1);
        s.set_client_enabled("alice", false).unwrap();
        assert_ne!(v1, s.version().unwrap(), "a rewrite in place counts");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn credentials_carry_the_shared_config_and_the_identity_pin() {
        let (s, dir) = fresh("cred");
        let (_, cred) = s.add_client(&new("alice")).unwrap();
        assert_eq!(cred.servers, ["192.0.2.1"]);
        assert_eq!(cred.knock_port, crate::store::config::DEFAULT_KNOCK_UDP_PORT);
        assert_eq!(
            cred.tls_fingerprint,
            Some(s.identity().unwrap().pin().to_string()),
            "the identity is made once and pinned"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
