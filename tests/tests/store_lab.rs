//! The gateway's state under an operator's hands: broken files in the
//! state directory are named and skipped, never block anyone else's
//! revocation or enrollment, and revocations are confirmed by the running
//! daemon. Real daemon, real XDP, namespaces; needs root.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use gatekeeper::{
    knock::send::Request,
    spec::{PortRange, Proto},
};
use gatekeeper_tests::lab::{Lab, Role, eventually};

const KNOCK_PORT: u16 = 62201;

fn gw(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Role::Gateway.addr()), port)
}

fn tcp22() -> Request {
    Request {
        proto: Proto::Tcp,
        ports: PortRange { lo: 22, hi: 22 },
        source_port: None,
    }
}

/// Seals a fresh knock for tcp/22 with `cred` in `role`'s namespace and
/// sends it over UDP.
fn knock(lab: &Lab, role: Role, cred: &Path) -> Result<()> {
    let packet = lab.with_knocker(role, cred, |k, server| Ok(k.build(server, &tcp22(), 0)?))?;
    lab.in_ns(role, move || -> Result<()> {
        UdpSocket::bind("0.0.0.0:0")?.send_to(&packet, gw(KNOCK_PORT))?;
        Ok(())
    })?
}

/// The last audit line about `client`'s knocks, once there are `n` of them.
fn nth_knock_of(lab: &Lab, client: &str, n: usize) -> Result<serde_json::Value> {
    let lines = || -> Result<Vec<serde_json::Value>> {
        Ok(lab
            .audit()?
            .into_iter()
            .filter(|l| l["event"] == "knock" && l["client"] == client)
            .collect())
    };
    let arrived = eventually(Duration::from_secs(5), || Ok(lines()?.len() >= n))?;
    anyhow::ensure!(arrived, "knock {n} of {client} never audited: {:?}", lab.audit()?);
    Ok(lines()?[n - 1].clone())
}

/// Writes the two kinds of broken client file an operator makes: a syntax
/// error, and valid TOML without a public key.
fn break_two_files(lab: &Lab) -> Result<()> {
    let clients = lab.state_dir().join("clients");
    std::fs::write(clients.join("typo.toml"), "name = \"typo\"\nid = 7\nallow = tcp/22\n")?;
    std::fs::write(
        clients.join("nokey.toml"),
        "name = \"nokey\"\nid = 8\nallow = \"tcp/22\"\nenabled = true\ncreated = 0\n",
    )?;
    Ok(())
}

#[test]
fn broken_client_files_are_named_and_never_block_a_revocation() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let alice = lab.enroll("alice", &["--allow", "tcp/22"])?;
    let bob = lab.enroll("bob", &["--allow", "tcp/22"])?;
    let daemon = lab.start_daemon(&["--protect", "tcp/22"])?;

    knock(&lab, Role::Client, &alice)?;
    assert_eq!(nth_knock_of(&lab, "alice", 1)?["result"], "accepted");
    assert!(eventually(Duration::from_secs(3), || lab.tcp_echo_works(
        Role::Client,
        gw(22),
        None
    ))?);

    break_two_files(&lab)?;
    let listed = lab.state_cli(&["client", "list"])?;
    assert!(
        listed.contains("alice") && listed.contains("typo.toml") && listed.contains("nokey.toml"),
        "client list shows the good clients and names each bad file:\n{listed}"
    );
    let started = Instant::now();
    let said = lab.state_cli(&["client", "revoke", "alice"])?;
    assert!(
        said.contains("applied"),
        "the running daemon confirms the revocation: {said}"
    );
    let closed = eventually(Duration::from_secs(1), || {
        Ok(!lab.cli_ok(&["whitelist", "list", "--json"])?.contains("10.77.0.2"))
    })?;
    assert!(
        closed,
        "alice's entry is gone within a second of the revocation ({:?})",
        started.elapsed()
    );
    knock(&lab, Role::Client, &alice)?;
    assert_eq!(nth_knock_of(&lab, "alice", 2)?["reason"], "revoked");
    assert!(!lab.tcp_echo_works(Role::Client, gw(22), None)?);

    // Enrollment goes on too, and the new device gets in.
    let carol = lab.enroll("carol", &["--allow", "tcp/22"])?;
    knock(&lab, Role::Intruder, &carol)?;
    assert_eq!(nth_knock_of(&lab, "carol", 1)?["result"], "accepted");
    knock(&lab, Role::Client, &bob)?;
    assert_eq!(
        nth_knock_of(&lab, "bob", 1)?["result"],
        "accepted",
        "bob, untouched, still gets in"
    );
    assert!(eventually(Duration::from_secs(3), || lab.tcp_echo_works(
        Role::Client,
        gw(22),
        None
    ))?);

    let log = daemon.log();
    assert!(
        log.contains("typo.toml") && log.contains("nokey.toml"),
        "the daemon's log names both files:\n{log}"
    );
    let audit = lab.audit()?;
    for file in ["typo.toml", "nokey.toml"] {
        assert!(
            audit
                .iter()
                .any(|l| l["event"] == "state_problem" && l["path"].as_str().is_some_and(|p| p.ends_with(file))),
            "the audit names {file}: {audit:?}"
        );
    }
    Ok(())
}

#[test]
fn a_daemon_starts_with_a_broken_client_file_and_a_portal() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 8080)?;
    let bob = lab.enroll("bob", &["--allow", "tcp/22,tcp/443"])?;
    break_two_files(&lab)?;
    let mut daemon = lab.start_daemon(&[
        "--protect",
        "tcp/22",
        "--portal",
        "0.0.0.0:443",
        "--portal-upstream",
        "127.0.0.1:8080",
    ])?;
    assert!(daemon.running());
    let log = daemon.log();
    assert!(log.contains("typo.toml") && log.contains("nokey.toml"), "{log}");
    knock(&lab, Role::Client, &bob)?;
    assert_eq!(
        nth_knock_of(&lab, "bob", 1)?["result"],
        "accepted",
        "knocks are verified"
    );
    let status = lab.state_cli(&["status", "--json"])?;
    let status: serde_json::Value = serde_json::from_str(&status).context("status --json")?;
    assert_eq!(
        status["clients"]["problems"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    Ok(())
}
