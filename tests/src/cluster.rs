//! A cluster of gateway nodes in the lab, as the cluster tests and the
//! cluster benchmark start it: every node serving echo on tcp/22 behind
//! its gate, the records in the lab's Redis, one client enrolled.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use gatekeeper::{
    knock::{Carrier, send::Request},
    spec::{PortRange, Proto},
};

use crate::lab::{Daemon, Lab, Role, SHARED_ADDR, round_trip};

/// Initialises the cluster at `url` (`init --cluster` from node 1),
/// enrolls `laptop` for tcp/22 and starts `nodes` daemons on it (`gw-N`,
/// each advertising its own address for tunnel agents).
/// Each node's own config lifts the knock budgets, so thousands of knocks
/// from one client in a few seconds are not rate-limited. Returns the
/// daemons and the client's credential.
pub fn start_nodes(lab: &mut Lab, url: &str, nodes: u8) -> Result<(Vec<Daemon>, PathBuf)> {
    let shared = SHARED_ADDR.to_string();
    lab.state_cli_on(Role::Node(1), &["init", "--public-addr", &shared, "--cluster", url])?;
    let cred = lab.scratch().join("laptop.credential.toml");
    let cred_arg = cred.to_string_lossy().into_owned();
    lab.state_cli_on(
        Role::Node(1),
        &[
            "client",
            "add",
            "laptop",
            "--allow",
            "tcp/22",
            "--out",
            &cred_arg,
            "--cluster",
            url,
        ],
    )?;
    let mut daemons = Vec::new();
    for n in 1..=nodes {
        let node = Role::Node(n);
        lab.serve_tcp_echo(node, 22)?;
        let dir = lab.state_dir_of(node);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("gatekeeper.toml"),
            "[knock]\nrate = 100000\nburst = 100000\nkey_rate = 100000\nkey_burst = 100000\n",
        )?;
        let (name, own) = (format!("gw-{n}"), node.addr().to_string());
        daemons.push(lab.start_daemon_on(
            node,
            &[
                "--protect",
                "tcp/22",
                "--cluster",
                url,
                "--node",
                &name,
                "--advertise",
                &own,
            ],
        )?);
    }
    Ok((daemons, cred))
}

/// The shared address, at `port`.
pub fn shared(port: u16) -> SocketAddr {
    SocketAddr::new(SHARED_ADDR.into(), port)
}

/// Knocks from the client's UDP `sport` (a flow of its own, so the router
/// may hand it to any node) for tcp/`port`, then connects from `sport` to
/// the shared address's `port` (hashed again, to any node) and echoes.
pub fn knock_and_connect(lab: &Lab, cred: &Path, sport: u16, port: u16) -> Result<bool> {
    let req = Request {
        proto: Proto::Tcp,
        ports: PortRange { lo: port, hi: port },
        source_port: Some(sport),
    };
    lab.with_knocker(Role::Client, cred, move |k, _| {
        k.send(SHARED_ADDR.into(), &req, Carrier::Udp)?;
        Ok(())
    })?;
    // What `gatekeeper connect` waits before its connection.
    std::thread::sleep(Duration::from_millis(20));
    let Some(mut s) = lab.tcp_connect(Role::Client, shared(port), Some(sport), Duration::from_secs(3))? else {
        return Ok(false);
    };
    Ok(round_trip(&mut s, b"ping").unwrap_or(false))
}
