//! The gateway's state under an operator's hands: broken files in the
//! state directory are named and skipped, never block anyone else's
//! revocation or enrollment, and revocations are confirmed by the running
//! daemon. Real daemon, real XDP, namespaces; needs root.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use gatekeeper_tests::lab::{Lab, Role, eventually, gw, tcp_request};

const KNOCK_PORT: u16 = 62201;

/// Seals a fresh knock for tcp/22 with `cred` in `role`'s namespace and
/// sends it over UDP.
fn knock(lab: &Lab, role: Role, cred: &Path) -> Result<()> {
    let packet = lab.with_knocker(role, cred, |k, server| Ok(k.build(server, &tcp_request(22), 0)?))?;
    lab.send_udp(role, gw(KNOCK_PORT), packet)
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

#[test]
fn what_the_daemon_cannot_serve_stops_it_at_start_naming_the_cause() -> Result<()> {
    let lab = Lab::new()?;
    lab.enroll("bob", &["--allow", "tcp/22"])?;
    // Something else holds the tunnel port.
    let squatter = lab.in_ns(Role::Gateway, || std::net::TcpListener::bind("[::]:7443"))??;
    let e = lab
        .start_daemon(&["--protect", "tcp/22"])
        .err()
        .context("the daemon must not start")?;
    assert!(e.to_string().contains("tunnel port 7443"), "{e}");
    drop(squatter);
    // A second config that contradicts what credentials carry.
    let extra = lab.scratch().join("extra.toml");
    std::fs::write(&extra, "public_addrs = [\"192.0.2.99\"]\n")?;
    let e = lab
        .start_daemon(&["--protect", "tcp/22", "--config", extra.to_str().context("utf-8 path")?])
        .err()
        .context("the daemon must not start")?;
    assert!(
        e.to_string().contains("`public_addrs`") && e.to_string().contains("gatekeeper.toml"),
        "{e}"
    );
    // Nothing was left behind: the gate was never attached.
    assert!(!gatekeeper::gate::pins::has_links(lab.pin_dir()));
    let mut daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    assert!(daemon.running(), "with the port free, it starts");
    Ok(())
}

#[test]
fn status_reports_the_daemon_and_revocations_say_when_none_runs() -> Result<()> {
    let lab = Lab::new()?;
    lab.enroll("alice", &["--allow", "tcp/22"])?;
    lab.enroll("bob", &["--allow", "tcp/22"])?;
    let mut daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    let status: serde_json::Value = serde_json::from_str(&lab.state_cli(&["status", "--json"])?)?;
    assert_eq!(status["pid"].as_u64(), daemon.pid().map(u64::from), "{status}");
    assert_eq!(status["clients"]["enrolled"], 2);
    assert_eq!(status["clients"]["allowed"], 2);
    assert_eq!(status["knocks"], true);
    assert_eq!(status["tunnel_port"], 7443);
    assert!(status["counters"]["knock_diverted"].is_u64());
    let text = lab.state_cli(&["status"])?;
    assert!(text.contains("2 enrolled") && text.contains("gw0"), "{text}");

    let json: serde_json::Value = serde_json::from_str(&lab.state_cli(&["client", "revoke", "alice", "--json"])?)?;
    assert_eq!(
        (json["applied"].as_bool(), json["entries_closed"].as_u64()),
        (Some(true), Some(0)),
        "{json}"
    );

    daemon.stop()?;
    let said = lab.state_cli(&["client", "revoke", "bob"])?;
    assert!(said.contains("No daemon is running"), "{said}");
    let out = std::process::Command::new(gatekeeper_tests::lab::gatekeeper_bin()?)
        .args(["status", "--state-dir"])
        .arg(lab.state_dir())
        .output()?;
    assert_eq!(out.status.code(), Some(3), "status tells scripts no daemon runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no daemon is running"));
    Ok(())
}
