//! Knocks end to end: real clients in namespaces, the real daemon verifying
//! with the keys `gatekeeper init` and `gatekeeper client add` made, and the
//! audit log saying why each knock was accepted or refused. Needs root.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use gatekeeper::{
    clock::unix_now,
    knock::send::Request,
    spec::{PortRange, Proto},
};
use gatekeeper_tests::lab::{
    ChildGuard, Daemon, Lab, Role, eventually, gatekeeper_bin, gw, output_within, tcp_request,
};

const KNOCK_PORT: u16 = 62201;
const PROTECT: &str = "tcp/22-23,udp/5353,icmp";

fn tcp22() -> Request {
    tcp_request(22)
}

/// Sends raw knock bytes over UDP from a role to the gateway's knock port.
fn send_udp(lab: &Lab, from: Role, bytes: Vec<u8>) -> Result<()> {
    lab.send_udp(from, gw(KNOCK_PORT), bytes)
}

/// Waits (bounded) for the `n`th audit line and returns it.
fn audit_line(lab: &Lab, n: usize) -> Result<serde_json::Value> {
    let arrived = eventually(Duration::from_secs(5), || Ok(lab.audit()?.len() > n))?;
    anyhow::ensure!(arrived, "audit line {n} never came: {:?}", lab.audit()?);
    Ok(lab.audit()?[n].clone())
}

/// One of the gate's counters (`gatekeeper stats`).
fn stat(lab: &Lab, name: &str) -> Result<u64> {
    let stats: serde_json::Value = serde_json::from_str(&lab.cli_ok(&["stats", "--json"])?)?;
    stats[name]
        .as_u64()
        .with_context(|| format!("no counter {name}: {stats}"))
}

/// Waits (bounded) until counter `name` reaches `n`.
fn stat_reaches(lab: &Lab, name: &str, n: u64) -> Result<bool> {
    eventually(Duration::from_secs(3), || Ok(stat(lab, name)? >= n))
}

/// A lab with ssh-like echo on tcp/22, a daemon protecting it, and one
/// enrolled client allowed tcp/22 and icmp.
fn lab_with_client(extra: &[&str]) -> Result<(Lab, Daemon, std::path::PathBuf)> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    lab.serve_tcp_echo(Role::Gateway, 23)?;
    let mut args = vec!["--allow", "tcp/22,icmp"];
    args.extend_from_slice(extra);
    let cred = lab.enroll("laptop", &args)?;
    let daemon = lab.start_daemon(&["--protect", PROTECT])?;
    Ok((lab, daemon, cred))
}

#[test]
fn a_udp_knock_opens_the_clients_address_and_nobody_elses() -> Result<()> {
    let (lab, _daemon, cred) = lab_with_client(&[])?;
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "closed before the knock"
    );
    let packet = lab.with_knocker(Role::Client, &cred, |k, server| Ok(k.build(server, &tcp22(), 0)?))?;
    send_udp(&lab, Role::Client, packet)?;
    let line = audit_line(&lab, 0)?;
    assert_eq!(line["result"], "accepted", "{line}");
    assert_eq!(line["client"], "laptop");
    assert!(
        eventually(Duration::from_secs(3), || lab.tcp_echo_works(
            Role::Client,
            gw(22),
            None
        ))?,
        "the client gets in"
    );
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(23), None)?,
        "only the port it asked for"
    );
    assert!(
        !lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "the intruder still sees nothing"
    );
    let list = lab.cli_ok(&["whitelist", "list", "--json"])?;
    assert!(
        list.contains("\"address\":\"10.77.0.2\"") && list.contains("\"operator\":false"),
        "{list}"
    );
    Ok(())
}

#[test]
fn the_knock_cli_and_connect_work_from_the_client() -> Result<()> {
    let (lab, _daemon, cred) = lab_with_client(&[])?;
    let cred = cred.to_str().context("utf-8")?.to_string();
    // `connect` knocks with a SYN, connects from the same port, and relays stdio.
    let mut child = lab.spawn_gatekeeper(Role::Client, &["connect", "--credential", &cred, "10.77.0.1:22"])?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"hello through the gate\n")?;
    let out = output_within(child, Duration::from_secs(30))?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through the gate\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = audit_line(&lab, 0)?;
    assert_eq!(
        (line["result"].as_str(), line["carrier"].as_str()),
        (Some("accepted"), Some("tcp")),
        "{line}"
    );
    assert!(
        line["opened"]["src_port"].is_u64(),
        "a SYN knock opens exactly its source port: {line}"
    );

    // The knock command prints what it asked for.
    let ping = || lab.exec(Role::Client, &["ping", "-c", "1", "-W", "1", "10.77.0.1"]);
    assert!(ping().is_err(), "echo is gated before the knock");
    let out = lab.exec(
        Role::Client,
        &[
            gatekeeper_bin()?.to_str().context("utf-8")?,
            "knock",
            "--credential",
            &cred,
            "--proto",
            "icmp",
            "--via",
            "icmp",
        ],
    )?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("icmp echo") && said.contains("laptop"), "{said}");
    assert_eq!(audit_line(&lab, 1)?["result"], "accepted");
    assert!(
        eventually(Duration::from_secs(3), || Ok(ping().is_ok()))?,
        "the ICMP knock opened echo"
    );
    Ok(())
}

#[test]
fn v2_knocks_name_no_device_and_older_credentials_still_knock_v1() -> Result<()> {
    let (lab, _daemon, cred) = lab_with_client(&[])?;
    let text = std::fs::read_to_string(&cred)?;
    assert!(text.contains("knock_version = 2"), "the gateway announces v2: {text}");
    let (key_id, a, b) = lab.with_knocker(Role::Client, &cred, |k, server| {
        Ok((k.key_id(), k.build(server, &tcp22(), 0)?, k.build(server, &tcp22(), 0)?))
    })?;
    for packet in [&a, &b] {
        assert!(packet.starts_with(&gatekeeper_common::knock::PREFIX_V2));
        assert!(
            !packet.windows(16).any(|w| w == key_id),
            "the key id is not on the wire"
        );
    }
    let alike = a.iter().zip(&b).skip(3).filter(|(x, y)| x == y).count();
    assert!(alike < a.len() / 32, "two knocks of one device share {alike} bytes");
    send_udp(&lab, Role::Client, a)?;
    let line = audit_line(&lab, 0)?;
    assert_eq!(
        (&line["result"], &line["format"], &line["client"]),
        (&"accepted".into(), &"v2".into(), &"laptop".into()),
        "{line}"
    );
    assert!(
        eventually(Duration::from_secs(3), || lab.tcp_echo_works(
            Role::Client,
            gw(22),
            None
        ))?,
        "the v2 knock opened tcp/22"
    );
    // A credential from before v2 (no knock_version) knocks v1, accepted.
    let old = lab.scratch().join("old.credential.toml");
    gatekeeper::private_file::write(&old, &text.replace("knock_version = 2\n", ""))?;
    let v1 = lab.with_knocker(Role::Client, &old, |k, server| Ok(k.build(server, &tcp22(), 0)?))?;
    assert!(v1.starts_with(&gatekeeper_common::knock::PREFIX) && v1.windows(16).any(|w| w == key_id));
    send_udp(&lab, Role::Client, v1)?;
    let line = audit_line(&lab, 1)?;
    assert_eq!(
        (&line["result"], &line["format"]),
        (&"accepted".into(), &"v1".into()),
        "{line}"
    );
    Ok(())
}

#[test]
fn replays_forgeries_and_wrong_requests_are_refused_and_audited() -> Result<()> {
    let (lab, _daemon, cred) = lab_with_client(&[])?;
    let (good, crafted) = lab.with_knocker(Role::Client, &cred, |k, server| {
        let good = k.build(server, &tcp22(), 0)?;
        let mut flipped = k.build(server, &tcp22(), 0)?;
        // Inside the sealed payload, whatever the knock's version.
        let n = flipped.len();
        flipped[n - 30] ^= 0x40;
        let mut stale = k.payload(server, &tcp22(), 0)?;
        stale.timestamp = unix_now() - 600;
        let mut elsewhere = k.payload(server, &tcp22(), 0)?;
        elsewhere.server_ip = "192.0.2.99".parse()?;
        let port23 = Request {
            ports: PortRange { lo: 23, hi: 23 },
            ..tcp22()
        };
        Ok((
            good,
            vec![
                ("bad_tag", Role::Client, flipped),
                ("stale", Role::Client, k.seal(&stale)?),
                ("wrong_server", Role::Client, k.seal(&elsewhere)?),
                ("outside_policy", Role::Client, k.build(server, &port23, 0)?),
                // Built by the client for itself, sent by the intruder: its local_ip gives it away.
                ("nat_not_allowed", Role::Intruder, k.build(server, &tcp22(), 0)?),
            ],
        ))
    })?;
    send_udp(&lab, Role::Client, good.clone())?;
    assert_eq!(audit_line(&lab, 0)?["result"], "accepted");

    // Replays and unknown key ids die in the kernel: counted, never handed
    // to the daemon, whoever sends them.
    send_udp(&lab, Role::Client, good.clone())?;
    send_udp(&lab, Role::Intruder, good.clone())?;
    assert!(stat_reaches(&lab, "knock_replayed", 2)?, "both replays dropped in XDP");
    let mut unknown = good.clone();
    unknown[5] ^= 0xff;
    send_udp(&lab, Role::Intruder, unknown)?;
    assert!(stat_reaches(&lab, "knock_unknown_key", 1)?);

    for (i, (reason, from, bytes)) in crafted.into_iter().enumerate() {
        send_udp(&lab, from, bytes)?;
        let line = audit_line(&lab, i + 1)?;
        assert_eq!(
            (line["result"].as_str(), line["reason"].as_str()),
            (Some("rejected"), Some(reason)),
            "case {i}: {line}"
        );
    }
    assert!(
        !lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "no refused knock opened anything for the intruder"
    );
    assert!(!lab.tcp_echo_works(Role::Client, gw(23), None)?);
    Ok(())
}

#[test]
fn garbage_with_the_prefix_is_dropped_counted_and_opens_nothing() -> Result<()> {
    let (lab, _daemon, _cred) = lab_with_client(&[])?;
    let mut short = gatekeeper_common::knock::PREFIX.to_vec();
    short.extend_from_slice(&[7; 20]);
    send_udp(&lab, Role::Intruder, short)?;
    let mut random = gatekeeper_common::knock::PREFIX.to_vec();
    random.extend((0..200).map(|i| (i * 37 % 251) as u8));
    send_udp(&lab, Role::Intruder, random)?;
    assert!(
        stat_reaches(&lab, "knock_unknown_key", 1)?,
        "a key id nobody enrolled is dropped in the kernel"
    );
    assert_eq!(
        stat(&lab, "knock_bad_length")?,
        1,
        "the short one never reached the daemon"
    );
    assert_eq!(stat(&lab, "knock_diverted")?, 0);
    assert!(lab.audit()?.is_empty(), "neither costs the daemon anything");
    assert!(lab.cli_ok(&["whitelist", "list", "--json"])?.trim() == "[]");
    Ok(())
}

#[test]
fn revoking_a_client_closes_its_entries_within_a_second() -> Result<()> {
    let (lab, _daemon, cred) = lab_with_client(&[])?;
    let knocks = lab.with_knocker(Role::Client, &cred, |k, server| {
        Ok([k.build(server, &tcp22(), 0)?, k.build(server, &tcp22(), 0)?])
    })?;
    let [first, second] = knocks;
    send_udp(&lab, Role::Client, first)?;
    assert_eq!(audit_line(&lab, 0)?["result"], "accepted");
    assert!(eventually(Duration::from_secs(3), || lab.tcp_echo_works(
        Role::Client,
        gw(22),
        None
    ))?);
    lab.state_cli(&["client", "revoke", "laptop"])?;
    let closed = eventually(Duration::from_secs(1), || {
        Ok(lab.cli_ok(&["whitelist", "list", "--json"])?.trim() == "[]")
    })?;
    assert!(closed, "entries of a revoked client close within a second");
    let line = audit_line(&lab, 1)?;
    assert_eq!(
        (
            line["event"].as_str(),
            line["why"].as_str(),
            line["entries_closed"].as_u64()
        ),
        (Some("client_closed"), Some("revoked"), Some(1)),
        "{line}"
    );
    send_udp(&lab, Role::Client, second)?;
    assert_eq!(audit_line(&lab, 2)?["reason"], "revoked");
    assert!(!lab.tcp_echo_works(Role::Client, gw(22), None)?);
    Ok(())
}

#[test]
fn a_restarted_daemon_keeps_entries_and_replay_protection() -> Result<()> {
    let (lab, mut daemon, cred) = lab_with_client(&[])?;
    let knock = lab.with_knocker(Role::Client, &cred, |k, server| Ok(k.build(server, &tcp22(), 0)?))?;
    send_udp(&lab, Role::Client, knock.clone())?;
    assert_eq!(audit_line(&lab, 0)?["result"], "accepted");
    daemon.kill9()?;
    let _again = lab.start_daemon(&["--protect", PROTECT])?;
    assert!(
        lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "the opened entry survived"
    );
    send_udp(&lab, Role::Intruder, knock)?;
    assert!(
        stat_reaches(&lab, "knock_replayed", 1)?,
        "the pinned replay cache outlives the daemon: the replay dies in the kernel"
    );
    // (A daemon killed between handling a ring record and releasing it sees
    // that record again after a restart, as a replay: only the intruder's
    // copy is the kernel's to drop.)
    let intruder = Role::Intruder.addr().to_string();
    assert!(
        !lab.audit()?.iter().any(|l| l["src"] == intruder.as_str()),
        "{:?}",
        lab.audit()?
    );
    Ok(())
}

#[test]
fn the_replay_cache_forgets_nonces_once_their_window_has_passed() -> Result<()> {
    let (lab, mut daemon, cred) = lab_with_client(&[])?;
    let config = lab.scratch().join("short-window.toml");
    // Long enough that the first nonce outlives a slow restart of the
    // daemon on a loaded machine, short enough to wait out.
    std::fs::write(&config, "[knock]\nwindow = \"10s\"\n")?;
    let config = config.to_str().context("utf-8 path")?.to_string();
    daemon.kill9()?;
    let mut first = lab.start_daemon(&["--protect", PROTECT, "--config", &config])?;
    let knock = || lab.with_knocker(Role::Client, &cred, |k, server| Ok(k.build(server, &tcp22(), 0)?));
    send_udp(&lab, Role::Client, knock()?)?;
    assert_eq!(audit_line(&lab, 0)?["result"], "accepted");
    // A nonce recorded by a daemon that died is swept by the next one.
    first.kill9()?;
    let _second = lab.start_daemon(&["--protect", PROTECT, "--config", &config])?;
    send_udp(&lab, Role::Client, knock()?)?;
    assert_eq!(audit_line(&lab, 1)?["result"], "accepted");
    let gate = gatekeeper::gate::Gate::open(lab.pin_dir())?;
    assert_eq!(gate.replay_entries()?.len(), 2, "both nonces are remembered at first");
    assert!(
        eventually(Duration::from_secs(25), || Ok(gate.replay_entries()?.is_empty()))?,
        "both nonces are forgotten once their window (10 s) has passed: {:?}",
        gate.replay_entries()?
    );
    Ok(())
}

#[test]
fn behind_one_nat_only_the_client_that_knocked_gets_in() -> Result<()> {
    let mut lab = Lab::with_nat()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let cred = lab.enroll("alice", &["--allow", "tcp/22", "--nat"])?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    let cred = cred.to_str().context("utf-8")?.to_string();
    // Alice connects through the gate from behind the NAT, as an ssh ProxyCommand would.
    let mut child = lab.spawn_gatekeeper(Role::NatA, &["connect", "--credential", &cred, "10.77.0.1:22"])?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(b"alice\n")?;
    // Keep Alice's connection open while her neighbour tries the same service.
    let bob_gets_in = lab.tcp_echo_works(Role::NatB, gw(22), None)?;
    drop(stdin);
    let out = output_within(child, Duration::from_secs(30))?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "alice\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!bob_gets_in, "Bob shares Alice's public address but not her tuple");
    let line = audit_line(&lab, 0)?;
    assert_eq!(line["src"], "10.77.0.4", "the gateway saw the NAT's address: {line}");
    assert_eq!(line["request"]["local_ip"], "192.168.77.2", "{line}");
    Ok(())
}

#[test]
fn udp_and_icmp_knocks_open_their_protocols() -> Result<()> {
    let (mut lab, _daemon, _cred) = lab_with_client(&[])?;
    lab.serve_udp_echo(Role::Gateway, 5353)?;
    let cred = lab.enroll("phone", &["--allow", "udp/5353"])?;
    assert!(
        !lab.udp_echo_works(Role::Client, gw(5353))?,
        "udp/5353 unprotected? it must be gated for this test"
    );
    let packet = lab.with_knocker(Role::Client, &cred, |k, server| {
        Ok(k.build(
            server,
            &Request {
                proto: Proto::Udp,
                ports: PortRange { lo: 5353, hi: 5353 },
                source_port: None,
            },
            0,
        )?)
    })?;
    send_udp(&lab, Role::Client, packet)?;
    assert_eq!(audit_line(&lab, 0)?["result"], "accepted");
    assert!(
        eventually(Duration::from_secs(3), || lab.udp_echo_works(Role::Client, gw(5353)))?,
        "any source port of the client"
    );
    assert!(!lab.udp_echo_works(Role::Intruder, gw(5353))?);
    Ok(())
}

#[test]
fn ssh_through_connect_as_proxy_command() -> Result<()> {
    let lab = Lab::new()?;
    let cred = lab.enroll("laptop", &["--allow", "tcp/22"])?;
    let dir = lab.scratch();
    let path = |name: &str| dir.join(name).to_str().map(str::to_string).context("utf-8 path");
    for key in ["host_key", "client_key"] {
        gatekeeper_tests::lab::sh(&["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", &path(key)?])?;
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "ListenAddress 10.77.0.1\nPort 22\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n",
            path("host_key")?,
            path("authorized_keys")?,
            path("sshd.pid")?
        ),
    )?;
    std::fs::create_dir_all("/run/sshd")?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    let sshd = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(Role::Gateway),
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            &path("sshd_config")?,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let _sshd = ChildGuard::new(sshd);
    std::thread::sleep(Duration::from_millis(500));
    let ssh = |role: Role, proxy: bool| -> Result<std::process::Output> {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &lab.ns(role),
            "ssh",
            "-i",
            &path("client_key")?,
            "-o",
            "BatchMode=yes",
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=3",
        ]);
        if proxy {
            let bin = gatekeeper_bin()?;
            cmd.arg("-o").arg(format!(
                "ProxyCommand={} connect --credential {} %h:%p",
                bin.display(),
                cred.display()
            ));
        }
        let child = cmd
            .args(["root@10.77.0.1", "echo", "through-the-gate"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        output_within(child, Duration::from_secs(30))
    };
    let direct = ssh(Role::Intruder, false)?;
    assert!(
        !direct.status.success(),
        "plain ssh from the intruder must not get through"
    );
    let out = ssh(Role::Client, true)?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "through-the-gate",
        "ssh stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn knocks_work_over_ipv6() -> Result<()> {
    let (lab, _daemon, cred) = lab_with_client(&[])?;
    let gw6: IpAddr = Role::Gateway.addr6().into();
    let packet = lab.with_knocker(Role::Client, &cred, move |k, _| Ok(k.build(gw6, &tcp22(), 0)?))?;
    lab.in_ns(Role::Client, move || -> Result<()> {
        UdpSocket::bind("[::]:0")?.send_to(&packet, SocketAddr::new(gw6, KNOCK_PORT))?;
        Ok(())
    })??;
    let line = audit_line(&lab, 0)?;
    assert_eq!(
        (line["result"].as_str(), line["src"].as_str()),
        (Some("accepted"), Some("fd77::2")),
        "{line}"
    );
    let to = SocketAddr::new(gw6, 22);
    assert!(
        eventually(Duration::from_secs(3), || lab.tcp_echo_works(Role::Client, to, None))?,
        "in over IPv6"
    );
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "the IPv6 entry does not open IPv4"
    );
    Ok(())
}

#[test]
fn knocks_for_two_ports_keep_both_open() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    lab.serve_tcp_echo(Role::Gateway, 23)?;
    let cred = lab.enroll("multi", &["--allow", "tcp/22-23"])?;
    let _daemon = lab.start_daemon(&["--protect", PROTECT])?;
    for port in [22, 23] {
        let req = Request {
            ports: PortRange { lo: port, hi: port },
            ..tcp22()
        };
        let packet = lab.with_knocker(Role::Client, &cred, move |k, server| Ok(k.build(server, &req, 0)?))?;
        send_udp(&lab, Role::Client, packet)?;
    }
    assert!(eventually(Duration::from_secs(3), || Ok(lab.audit()?.len() == 2))?);
    let audit = lab.audit()?;
    assert!(audit.iter().all(|l| l["result"] == "accepted"), "{audit:?}");
    let list = lab.cli_ok(&["whitelist", "list", "--json"])?;
    assert!(list.contains("\"ports\":[\"22\",\"23\"]"), "{list}");
    assert!(
        lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "the first knock's port stays open"
    );
    assert!(lab.tcp_echo_works(Role::Client, gw(23), None)?, "and the second's");
    Ok(())
}
