//! Pebble, the ACME test CA Debian ships, on the lab's CA host. Its API
//! speaks HTTPS with a certificate from a CA of the test's own; it
//! validates TLS-ALPN-01 on port 443 of whatever the name resolves to,
//! which the CA host's own /etc/hosts decides; and it issues from a root
//! it makes at start, which its management port hands out.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};

use crate::{
    lab::{ChildGuard, Lab, Role, eventually},
    pki::LabCa,
};

const API_PORT: u16 = 14000;
const MANAGEMENT_PORT: u16 = 15000;

pub struct Pebble {
    /// The root the API's own certificate chains to, PEM file.
    pub api_root: PathBuf,
    _server: ChildGuard,
}

impl Pebble {
    /// Adds the CA host to the lab and starts Pebble there, validating
    /// `names` at `target`'s port 443.
    pub fn start(lab: &mut Lab, names: &[&str], target: Role) -> Result<Pebble> {
        lab.add_host(Role::Ca)?;
        let hosts: String = names.iter().map(|n| format!("{} {n}\n", target.addr())).collect();
        lab.set_hosts(Role::Ca, &format!("127.0.0.1 localhost\n{hosts}"))?;
        let dir = lab.scratch().join("pebble");
        std::fs::create_dir_all(&dir)?;
        let ca = LabCa::new("lab ACME API CA")?;
        let api = ca.issue(
            "lab ACME API",
            vec![rcgen::SanType::IpAddress(Role::Ca.addr().into())],
            Vec::new(),
        )?;
        let (api_root, cert, key, config) = (
            dir.join("api-root.pem"),
            dir.join("api.pem"),
            dir.join("api.key"),
            dir.join("pebble.json"),
        );
        std::fs::write(&api_root, ca.pem())?;
        std::fs::write(&cert, &api.cert)?;
        std::fs::write(&key, &api.key)?;
        let addr = Role::Ca.addr();
        let settings = serde_json::json!({"pebble": {
            "listenAddress": format!("{addr}:{API_PORT}"),
            "managementListenAddress": format!("{addr}:{MANAGEMENT_PORT}"),
            "certificate": cert, "privateKey": key,
            "httpPort": 80, "tlsPort": 443,
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        std::fs::write(&config, settings.to_string())?;
        let server = ChildGuard::new(
            Command::new("ip")
                .args(["netns", "exec", &lab.ns(Role::Ca), "pebble", "-config"])
                .arg(&config)
                // Validate at once, accept every good nonce, and validate
                // every order afresh.
                .envs([
                    ("PEBBLE_VA_NOSLEEP", "1"),
                    ("PEBBLE_WFE_NONCEREJECT", "0"),
                    ("PEBBLE_AUTHZREUSE", "0"),
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("pebble.log"))?)
                .spawn()
                .context("starting pebble (Debian package `pebble`)")?,
        );
        let pebble = Pebble {
            api_root,
            _server: server,
        };
        let up = eventually(Duration::from_secs(20), || {
            Ok(pebble
                .get(lab, &pebble.directory())
                .is_ok_and(|d| d.contains("newOrder")))
        })?;
        ensure!(
            up,
            "pebble never answered: {}",
            lab.scratch().join("pebble/pebble.log").display()
        );
        Ok(pebble)
    }

    /// The ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://{}:{API_PORT}/dir", Role::Ca.addr())
    }

    /// The root Pebble issues from, PEM: what a browser trusting it needs.
    pub fn issuing_root(&self, lab: &Lab) -> Result<String> {
        self.get(lab, &format!("https://{}:{MANAGEMENT_PORT}/roots/0", Role::Ca.addr()))
    }

    /// An HTTPS GET from the CA host, checked against the API's root.
    fn get(&self, lab: &Lab, url: &str) -> Result<String> {
        let root = self.api_root.to_str().context("utf-8 path")?;
        let out = lab.exec(Role::Ca, &["curl", "-sf", "--max-time", "5", "--cacert", root, url])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
