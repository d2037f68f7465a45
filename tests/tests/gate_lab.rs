//! End to end, in a lab of network namespaces: the real daemon and CLI, the
//! real XDP program on a veth, real sockets and nmap. Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use gatekeeper_tests::{
    lab::{GW_IFACE, Lab, Role, eventually, round_trip},
    nmap,
};

fn gw(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Role::Gateway.addr()), port)
}

fn gw6(port: u16) -> SocketAddr {
    SocketAddr::new("fd77::1".parse().expect("literal"), port)
}

fn stat(lab: &Lab, name: &str) -> Result<u64> {
    let json: serde_json::Value = serde_json::from_str(&lab.cli_ok(&["stats", "--json"])?)?;
    Ok(json[name].as_u64().unwrap_or(0))
}

fn entries(lab: &Lab) -> Result<Vec<serde_json::Value>> {
    let json: serde_json::Value = serde_json::from_str(&lab.cli_ok(&["whitelist", "list", "--json"])?)?;
    Ok(json.as_array().cloned().unwrap_or_default())
}

fn xdp_attached(lab: &Lab) -> Result<bool> {
    let out = lab.exec(Role::Gateway, &["ip", "link", "show", GW_IFACE])?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("prog/xdp"))
}

#[test]
fn scans_see_nothing_until_an_operator_lets_the_client_in() -> Result<()> {
    let mut lab = Lab::new()?;
    for port in [22, 8000, 9090] {
        lab.serve_tcp_echo(Role::Gateway, port)?;
    }
    lab.serve_udp_echo(Role::Gateway, 5353)?;
    let target = Role::Gateway.addr().to_string();

    // Without the gate the scan finds the services, so its silence later means something.
    let before = nmap::scan(&lab, Role::Intruder, "-sS", "22,8000,9090,9", &target)?;
    assert_eq!(before.open, vec![22, 8000, 9090], "{before:?}");
    assert_eq!(before.closed, vec![9], "{before:?}");

    let _daemon = lab.start_daemon(&["--protect", "tcp/22,tcp/8000-8100,udp/5353"])?;
    let tcp = nmap::scan(&lab, Role::Intruder, "-sS", "1-65535", &target)?;
    assert!(tcp.answered_in(22, 22).is_empty(), "port 22 answered: {tcp:?}");
    assert!(tcp.answered_in(8000, 8100).is_empty(), "8000-8100 answered: {tcp:?}");
    assert!(
        tcp.open.contains(&9090),
        "the unprotected service stays reachable: {tcp:?}"
    );
    let udp = nmap::scan(&lab, Role::Intruder, "-sU", "5353", &target)?;
    assert!(
        udp.open.is_empty() && udp.closed.is_empty(),
        "udp/5353 answered: {udp:?}"
    );
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "the client is not let in yet"
    );
    assert!(!lab.udp_echo_works(Role::Client, gw(5353))?);

    lab.cli_ok(&["whitelist", "add", "10.77.0.2/tcp", "--ports", "22", "--ttl", "5m"])?;
    lab.cli_ok(&["whitelist", "add", "fd77::2/udp", "--ports", "5353", "--ttl", "5m"])?;
    assert!(
        lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "whitelisted client connects"
    );
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(8000), None)?,
        "but only to the ports of its entry"
    );
    assert!(lab.udp_echo_works(Role::Client, gw6(5353))?, "IPv6 entry lets UDP in");
    let after = nmap::scan(&lab, Role::Intruder, "-sS", "22,8000-8100", &target)?;
    assert!(
        after.open.is_empty() && after.closed.is_empty(),
        "intruder still sees nothing: {after:?}"
    );
    assert!(!lab.tcp_echo_works(Role::Intruder, gw(22), None)?);

    assert!(
        stat(&lab, "drop_not_allowed")? >= 102,
        "every probe of a protected port was dropped and counted"
    );
    assert!(stat(&lab, "pass_whitelisted")? > 0);
    let list = lab.cli_ok(&["whitelist", "list"])?;
    assert!(list.contains("10.77.0.2") && list.contains("fd77::2"), "{list}");
    Ok(())
}

#[test]
fn exact_tuples_admit_only_their_source_port() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    lab.cli_ok(&[
        "whitelist",
        "add",
        "10.77.0.2:41000/tcp",
        "--ports",
        "22",
        "--ttl",
        "5m",
    ])?;
    assert!(lab.tcp_echo_works(Role::Client, gw(22), Some(41000))?);
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), Some(41001))?,
        "another source port stays out"
    );
    lab.cli_ok(&["whitelist", "del", "10.77.0.2:41000/tcp"])?;
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), Some(41000))?,
        "deleted entry no longer admits"
    );
    Ok(())
}

#[test]
fn live_flows_outlast_their_ttl_and_idle_entries_are_swept() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22", "--idle-timeout", "1s"])?;
    lab.cli_ok(&["whitelist", "add", "10.77.0.2/tcp", "--ports", "22", "--ttl", "2s"])?;
    let mut flow = lab
        .tcp_connect(Role::Client, gw(22), None, Duration::from_secs(2))?
        .expect("connects inside the TTL");

    // Keep the flow busy until the entry's TTL has passed.
    let expired = eventually(Duration::from_secs(10), || {
        assert!(round_trip(&mut flow, b"tick")?, "the flow must keep working");
        std::thread::sleep(Duration::from_millis(150));
        Ok(entries(&lab)?.first().is_some_and(|e| e["expired"] == true))
    })?;
    assert!(expired, "the entry should pass its TTL while the flow runs");
    for _ in 0..5 {
        assert!(
            round_trip(&mut flow, b"tock")?,
            "past its TTL, the active flow still passes"
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "no new connection after the TTL"
    );

    // Go quiet: the sweeper removes the entry once it has been idle for 1s.
    let swept = eventually(Duration::from_secs(10), || Ok(entries(&lab)?.is_empty()))?;
    assert!(swept, "idle expired entry must be swept: {:?}", entries(&lab)?);
    flow.set_read_timeout(Some(Duration::from_millis(800)))?;
    assert!(
        !round_trip(&mut flow, b"late").unwrap_or(false),
        "the flow is cut once its entry is gone"
    );
    Ok(())
}

#[test]
fn bulk_transfers_pass_whole_in_native_and_generic_mode() -> Result<()> {
    for mode in ["driver", "skb"] {
        let mut lab = Lab::new()?;
        lab.serve_tcp_echo(Role::Gateway, 22)?;
        let _daemon = lab.start_daemon(&["--protect", "tcp/22", "--xdp-mode", mode])?;
        lab.cli_ok(&["whitelist", "add", "10.77.0.2/tcp", "--ports", "22", "--ttl", "5m"])?;
        // Generic XDP sees whole GSO packets of up to 64 KiB here.
        assert!(
            lab.tcp_bulk_echo_works(Role::Client, gw(22), 8 << 20)?,
            "8 MiB echo through the gate ({mode} mode)"
        );
        assert_eq!(stat(&lab, "drop_malformed")?, 0, "{mode} mode");
    }
    Ok(())
}

#[test]
fn flush_closes_the_gate() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    lab.cli_ok(&["whitelist", "add", "10.77.0.2/tcp", "--ports", "22", "--ttl", "5m"])?;
    lab.cli_ok(&["whitelist", "add", "10.77.0.3:5000/tcp", "--ports", "22", "--ttl", "5m"])?;
    assert!(lab.tcp_echo_works(Role::Client, gw(22), None)?);
    let out = lab.cli_ok(&["whitelist", "flush"])?;
    assert!(out.contains("removed 2"), "{out}");
    assert!(entries(&lab)?.is_empty());
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "flushed: the client is out again"
    );
    Ok(())
}

#[test]
fn a_killed_daemon_leaves_the_gate_closed_and_a_new_one_adopts_it() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let mut daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    lab.cli_ok(&["whitelist", "add", "10.77.0.2/tcp", "--ports", "22", "--ttl", "5m"])?;
    daemon.kill9()?;

    assert!(xdp_attached(&lab)?, "the program stays attached after SIGKILL");
    assert!(
        !lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "the gate stays closed"
    );
    assert!(
        lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "authorizations survive"
    );
    assert_eq!(entries(&lab)?.len(), 1, "the CLI works with the daemon down");

    let mut again = lab.start_daemon(&["--protect", "tcp/22"])?;
    again.wait_for("adopted pinned link", Duration::from_secs(5))?;
    let second = lab.start_daemon(&["--protect", "tcp/22"]);
    let refused = second.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        refused.contains("another gatekeeper daemon"),
        "a second daemon on one gate is refused: {refused}"
    );
    assert_eq!(entries(&lab)?.len(), 1, "the restarted daemon keeps the entries");
    assert!(lab.tcp_echo_works(Role::Client, gw(22), None)?);
    assert!(!lab.tcp_echo_works(Role::Intruder, gw(22), None)?);

    // A clean stop also leaves the gate in place.
    assert!(again.stop()?.success());
    assert!(xdp_attached(&lab)?);
    assert!(!lab.tcp_echo_works(Role::Intruder, gw(22), None)?);
    Ok(())
}

#[test]
fn audit_mode_passes_counts_and_samples() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let config = lab.scratch().join("audit.toml");
    std::fs::write(
        &config,
        "protect = \"tcp/22\"\nmode = \"audit\"\n[audit]\nsample_every = 1\n",
    )?;
    let mut daemon = lab.start_daemon(&["--config", config.to_str().expect("utf-8 path")])?;
    assert!(
        lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "audit mode lets the intruder through"
    );
    assert!(stat(&lab, "audit_would_drop")? > 0);
    assert_eq!(stat(&lab, "drop_not_allowed")?, 0, "nothing was dropped");
    daemon.wait_for("audit_would_drop", Duration::from_secs(5))?;
    assert!(daemon.log().contains("10.77.0.3"), "the sampled source is reported");
    Ok(())
}

#[test]
fn knocks_are_diverted_to_the_daemon_and_never_answered() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_udp_echo(Role::Gateway, 62201)?;
    let mut daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    let mut knock = gatekeeper_common::knock::PREFIX.to_vec();
    knock.resize(80, 0xab);
    let answered = lab.in_ns(Role::Intruder, move || -> Result<bool> {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        sock.send_to(&knock, gw(62201))?;
        Ok(sock.recv_from(&mut [0u8; 128]).is_ok())
    })??;
    assert!(
        !answered,
        "a knock gets no answer, not even from a service on the knock port"
    );
    daemon.wait_for("knock received", Duration::from_secs(5))?;
    assert!(daemon.log().contains("len=80"), "{}", daemon.log());
    assert_eq!(stat(&lab, "knock_diverted")?, 1);
    Ok(())
}

#[test]
fn detach_removes_the_gate_and_the_daemon_exits() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let mut daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    assert!(!lab.tcp_echo_works(Role::Intruder, gw(22), None)?);
    lab.cli_ok(&["detach"])?;
    let status = daemon.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "daemon exits cleanly on detach: {status}");
    assert!(!xdp_attached(&lab)?, "no program left on the interface");
    assert!(
        lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "the port is open to all again"
    );
    assert!(!lab.pin_dir().exists(), "pins removed");
    Ok(())
}
