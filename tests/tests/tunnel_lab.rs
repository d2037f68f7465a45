//! The reverse tunnel end to end: an agent in a private network behind a
//! NAT (no route from the client to it) publishes a private service through
//! the gateway; the gateway's tunnel port and published port sit behind the
//! gate. Real daemon, real agent process, real TLS. Needs root.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use gatekeeper_tests::{
    lab::{ChildGuard, Daemon, Lab, Role, eventually, output_within},
    nmap,
};

const PRIVATE_PORT: u16 = 8080;
const PUBLIC_PORT: u16 = 20000;

fn public() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Role::Gateway.addr()), PUBLIC_PORT)
}

fn tunnels(lab: &Lab) -> Result<Vec<serde_json::Value>> {
    let json: serde_json::Value = serde_json::from_str(&lab.state_cli(&["tunnel", "list", "--json"])?)?;
    Ok(json.as_array().cloned().unwrap_or_default())
}

fn connected(lab: &Lab) -> Result<bool> {
    Ok(tunnels(lab)?.first().is_some_and(|t| t["connected"] == true))
}

/// A NAT lab with an echo service in the private network, a gateway with a
/// tunnel `web` whose published port the client may knock for, and the
/// token written to a file.
fn setup() -> Result<(Lab, Daemon, std::path::PathBuf, std::path::PathBuf)> {
    setup_with("")
}

/// [`setup`], with `tunnel` added to the daemon's `[tunnel]` section.
fn setup_with(tunnel: &str) -> Result<(Lab, Daemon, std::path::PathBuf, std::path::PathBuf)> {
    let mut lab = Lab::with_nat()?;
    lab.serve_tcp_echo(Role::NatA, PRIVATE_PORT)?;
    let cred = lab.enroll("laptop", &["--allow", "tcp/22"])?;
    let token = lab.state_cli(&["tunnel", "issue", "web", "--owner", "ops", "--allow", "laptop"])?;
    let token_file = lab.scratch().join("web.token");
    gatekeeper::private_file::write(&token_file, token.trim())?;
    let daemon = lab.start_daemon(&["--protect", "tcp/22", "--config", &config(&lab, tunnel)?])?;
    Ok((lab, daemon, cred, token_file))
}

/// The state's own config plus a short heartbeat, so dead agents show
/// fast, and `tunnel` in the same section.
fn config(lab: &Lab, tunnel: &str) -> Result<String> {
    let path = lab.scratch().join("gateway.toml");
    std::fs::write(&path, format!("[tunnel]\nheartbeat = \"3s\"\n{tunnel}"))?;
    Ok(path.to_str().context("utf-8 path")?.to_string())
}

fn start_agent(lab: &Lab, token_file: &std::path::Path) -> Result<ChildGuard> {
    let forward = format!("127.0.0.1:{PRIVATE_PORT}");
    let token = token_file.to_str().context("utf-8 path")?;
    let agent =
        ChildGuard::new(lab.spawn_gatekeeper(Role::NatA, &["agent", "--token-file", token, "--forward", &forward])?);
    anyhow::ensure!(
        eventually(Duration::from_secs(20), || connected(lab))?,
        "the agent never connected: {:?}",
        tunnels(lab)?
    );
    Ok(agent)
}

/// Knocks by UDP from `role` for TCP `port` on the gateway; fails if the knock CLI does.
fn udp_knock(lab: &Lab, role: Role, cred: &Path, port: u16) -> Result<()> {
    let out = lab.udp_knock(role, cred, port, None, &[])?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// `gatekeeper connect` from the client to the published port, echoing `msg`.
fn connect_echo(lab: &Lab, cred: &std::path::Path, msg: &[u8]) -> Result<Vec<u8>> {
    let cred = cred.to_str().context("utf-8 path")?;
    let target = public().to_string();
    let mut child = lab.spawn_gatekeeper(Role::Client, &["connect", "--credential", cred, &target])?;
    child.stdin.take().context("stdin")?.write_all(msg)?;
    Ok(output_within(child, Duration::from_secs(30))?.stdout)
}

#[test]
fn a_private_service_is_reachable_only_through_the_tunnel_and_only_after_a_knock() -> Result<()> {
    let (lab, _daemon, cred, token) = setup()?;
    let private = SocketAddr::new(IpAddr::V4(Role::NatA.addr()), PRIVATE_PORT);
    assert!(
        !lab.tcp_echo_works(Role::Client, private, None)?,
        "the client has no route into the private network"
    );
    let _agent = start_agent(&lab, &token)?;
    assert!(
        !lab.tcp_echo_works(Role::Client, public(), None)?,
        "published, but closed until the client knocks"
    );
    assert_eq!(connect_echo(&lab, &cred, b"hello private\n")?, b"hello private\n");

    let scan = nmap::scan(&lab, Role::Intruder, "-sS", "7443,20000-20010", "10.77.0.1")?;
    assert!(
        scan.open.is_empty() && scan.closed.is_empty(),
        "the intruder sees neither the tunnel port nor the published one: {scan:?}"
    );
    assert!(!lab.tcp_echo_works(Role::Intruder, public(), None)?);

    let audit = lab.audit()?;
    let conn = eventually(Duration::from_secs(5), || {
        Ok(lab.audit()?.iter().any(|l| l["event"] == "tunnel_connection"))
    })?;
    assert!(conn, "each public connection is audited: {audit:?}");
    let line = lab
        .audit()?
        .into_iter()
        .find(|l| l["event"] == "tunnel_connection")
        .context("audit line")?;
    assert_eq!(
        (
            line["tunnel"].as_str(),
            line["owner"].as_str(),
            line["bytes_in"].as_u64()
        ),
        (Some("web"), Some("ops"), Some(14)),
        "{line}"
    );
    Ok(())
}

#[test]
fn two_hundred_concurrent_megabytes_arrive_intact() -> Result<()> {
    let (lab, _daemon, cred, token) = setup()?;
    let _agent = start_agent(&lab, &token)?;
    // One UDP knock opens the published port to any source port of the client.
    udp_knock(&lab, Role::Client, &cred, PUBLIC_PORT)?;
    assert!(answers_soon(&lab)?);
    let ok = std::thread::scope(|s| {
        let workers: Vec<_> = (0..200)
            .map(|_| s.spawn(|| lab.tcp_bulk_echo_works(Role::Client, public(), 1 << 20)))
            .collect();
        workers
            .into_iter()
            .filter_map(|w| w.join().ok())
            .filter(|r| matches!(r, Ok(true)))
            .count()
    });
    assert_eq!(ok, 200, "every connection's megabyte comes back byte for byte");
    Ok(())
}

#[test]
fn revocation_cuts_live_connections_stops_the_agent_and_frees_the_port() -> Result<()> {
    let (lab, _daemon, cred, token) = setup()?;
    let agent = start_agent(&lab, &token)?;
    let cred = cred.to_str().context("utf-8 path")?;
    let target = public().to_string();
    // A live connection, held open.
    let mut live = lab.spawn_gatekeeper(Role::Client, &["connect", "--credential", cred, &target])?;
    let mut stdin = live.stdin.take().context("stdin")?;
    stdin.write_all(b"first\n")?;
    assert!(eventually(Duration::from_secs(10), || Ok(tunnels(&lab)?
        .first()
        .is_some_and(|t| t["connections"].as_u64() == Some(0))))?);
    let said = lab.state_cli(&["tunnel", "revoke", "web"])?;
    assert!(
        said.contains("applied by the running daemon") && said.contains("told its agent to stop"),
        "{said}"
    );
    let cut = eventually(Duration::from_secs(1), || Ok(live.try_wait()?.is_some()))?;
    assert!(cut, "the live connection is cut within a second of the revocation");
    drop(stdin);
    let said = String::from_utf8_lossy(&agent.output_within(Duration::from_secs(10))?.stderr).into_owned();
    assert!(said.contains("revoked"), "the agent stops and says why: {said}");
    let freed = lab.exec(Role::Gateway, &["ss", "-Htln", "sport = :20000"])?;
    assert!(
        String::from_utf8_lossy(&freed.stdout).trim().is_empty(),
        "the published port is freed"
    );
    assert!(
        lab.audit()?
            .iter()
            .any(|l| l["event"] == "tunnel_closed" && l["why"] == "revoked")
    );
    Ok(())
}

#[test]
fn a_restarted_agent_gets_its_port_back_and_reconnects_after_a_gateway_restart() -> Result<()> {
    let (lab, mut daemon, cred, token) = setup()?;
    let agent = start_agent(&lab, &token)?;
    drop(agent);
    assert!(
        eventually(Duration::from_secs(10), || Ok(!connected(&lab)?))?,
        "a dead agent is noticed within the heartbeat"
    );
    let agent = start_agent(&lab, &token)?;
    assert_eq!(tunnels(&lab)?[0]["port"], PUBLIC_PORT, "same port for the same token");
    assert_eq!(connect_echo(&lab, &cred, b"again\n")?, b"again\n");

    daemon.kill9()?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22", "--config", &config(&lab, "")?])?;
    assert!(
        eventually(Duration::from_secs(60), || connected(&lab))?,
        "the agent reconnects by itself"
    );
    assert_eq!(connect_echo(&lab, &cred, b"after restart\n")?, b"after restart\n");
    drop(agent);
    Ok(())
}

#[test]
fn wrong_tokens_and_wrong_fingerprints_are_refused_clearly() -> Result<()> {
    let (lab, _daemon, _cred, token_file) = setup()?;
    let good = gatekeeper::tunnels::Token::decode(&std::fs::read_to_string(&token_file)?)?;
    let forward = format!("127.0.0.1:{PRIVATE_PORT}");
    for (what, token, needle) in [
        (
            "wrong secret",
            gatekeeper::tunnels::Token {
                secret: "00".repeat(32),
                ..good.clone()
            },
            "wrong secret",
        ),
        (
            "wrong fingerprint",
            gatekeeper::tunnels::Token {
                fingerprint: "11".repeat(32),
                ..good.clone()
            },
            "public key pin",
        ),
    ] {
        let file = lab.scratch().join("bad.token");
        gatekeeper::private_file::write(&file, &token.encode())?;
        let agent = ChildGuard::new(lab.spawn_gatekeeper(
            Role::NatA,
            &[
                "agent",
                "--token-file",
                file.to_str().context("utf-8")?,
                "--forward",
                &forward,
            ],
        )?);
        let said = String::from_utf8_lossy(&agent.output_within(Duration::from_secs(30))?.stderr).into_owned();
        assert!(said.contains(needle), "{what}: the agent says {said}");
    }
    let garbage = lab.spawn_gatekeeper(Role::NatA, &["agent", "--token", "not-a-token", "--forward", &forward])?;
    let out = output_within(garbage, Duration::from_secs(10))?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gkt1."),
        "a malformed token is named"
    );
    Ok(())
}

#[test]
fn a_private_web_page_is_served_through_the_tunnel_to_curl() -> Result<()> {
    let (lab, _daemon, cred, _token) = setup()?;
    // A second tunnel, for a real HTTP server in the private network.
    let www = lab.scratch().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "<h1>private page</h1>\n")?;
    let _http = ChildGuard::new(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(Role::NatA),
                "python3",
                "-m",
                "http.server",
                "8081",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let token = lab.state_cli(&["tunnel", "issue", "site", "--owner", "web-team", "--allow", "laptop"])?;
    let token_file = lab.scratch().join("site.token");
    gatekeeper::private_file::write(&token_file, token.trim())?;
    let site = tunnels(&lab)?
        .into_iter()
        .find(|t| t["name"] == "site")
        .context("issued")?;
    let port = u16::try_from(site["port"].as_u64().context("port")?)?;
    let token_arg = token_file.to_str().context("utf-8")?;
    let _agent = ChildGuard::new(lab.spawn_gatekeeper(
        Role::NatA,
        &["agent", "--token-file", token_arg, "--forward", "127.0.0.1:8081"],
    )?);
    let up = eventually(Duration::from_secs(20), || {
        Ok(tunnels(&lab)?
            .iter()
            .any(|t| t["name"] == "site" && t["connected"] == true))
    })?;
    assert!(up, "the site's agent connects");
    let url = format!("http://10.77.0.1:{port}/");
    let curl = |role: Role| lab.exec(role, &["curl", "-sS", "--max-time", "3", &url]);
    assert!(curl(Role::Client).is_err(), "closed before the client knocks");
    udp_knock(&lab, Role::Client, &cred, port)?;
    let page = eventually(Duration::from_secs(10), || {
        Ok(curl(Role::Client).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("private page")))
    })?;
    assert!(page, "curl gets the private page through the gateway");
    assert!(curl(Role::Intruder).is_err(), "the intruder gets nothing");
    Ok(())
}

#[test]
fn garbage_and_truncated_tls_on_the_tunnel_port_harm_no_tunnel() -> Result<()> {
    let (lab, mut daemon, cred, token) = setup()?;
    let _agent = start_agent(&lab, &token)?;
    // Someone holding the agent's knock credential, on another private host.
    let t = gatekeeper::tunnels::Token::decode(&std::fs::read_to_string(&token)?)?;
    let agent_cred = lab.scratch().join("agent.credential.toml");
    gatekeeper::private_file::write(&agent_cred, &toml::to_string(&t.credential)?)?;
    udp_knock(&lab, Role::NatB, &agent_cred, 7443)?;
    let tunnel_port = SocketAddr::new(IpAddr::V4(Role::Gateway.addr()), 7443);
    let sent = lab.in_ns(Role::NatB, move || -> Result<usize> {
        let payloads: [&[u8]; 3] = [
            b"GET / HTTP/1.0\r\n\r\n",
            // A TLS record header promising 512 bytes of ClientHello, then two.
            &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00],
            b"",
        ];
        let mut sent = 0;
        for p in payloads {
            let mut s = std::net::TcpStream::connect_timeout(&tunnel_port, Duration::from_secs(3))?;
            s.write_all(p)?;
            sent += 1;
        }
        Ok(sent)
    })??;
    assert_eq!(sent, 3, "the knocked tunnel port took the connections");
    let rejected = eventually(Duration::from_secs(15), || {
        Ok(lab
            .audit()?
            .iter()
            .filter(|l| l["event"] == "agent_session" && l["result"] == "rejected")
            .count()
            >= 3)
    })?;
    assert!(
        rejected,
        "each bad connection is refused and audited: {:?}",
        lab.audit()?
    );
    assert_eq!(
        connect_echo(&lab, &cred, b"still here\n")?,
        b"still here\n",
        "the live tunnel is unharmed"
    );
    assert!(daemon.running(), "the daemon is still up");
    Ok(())
}

#[test]
fn the_portal_can_front_a_published_tunnel() -> Result<()> {
    let mut lab = Lab::with_nat()?;
    lab.serve_tcp_echo(Role::NatA, PRIVATE_PORT)?;
    let cred = lab.enroll("laptop", &["--allow", "tcp/443"])?;
    let token = lab.state_cli(&["tunnel", "issue", "web", "--owner", "ops", "--allow", "laptop"])?;
    let token_file = lab.scratch().join("web.token");
    gatekeeper::private_file::write(&token_file, token.trim())?;
    let upstream = format!("127.0.0.1:{PUBLIC_PORT}");
    let _daemon = lab.start_daemon(&[
        "--protect",
        "tcp/22",
        "--config",
        &config(&lab, "")?,
        "--portal",
        "10.77.0.1:443",
        "--portal-upstream",
        &upstream,
    ])?;
    let _agent = start_agent(&lab, &token_file)?;
    let cred = cred.to_str().context("utf-8 path")?;
    let out = lab.gatekeeper_with_input(
        Role::Client,
        &["connect", "--portal", "--credential", cred, "10.77.0.1:443"],
        b"through portal and tunnel\n",
        Duration::from_secs(30),
    )?;
    assert_eq!(
        out.stdout,
        b"through portal and tunnel\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !lab.tcp_echo_works(Role::Client, public(), None)?,
        "the published port itself stays closed to a client that did not knock for it"
    );
    Ok(())
}

/// The newest audit line of `event` for tunnel `web` that `pick` accepts (bounded wait).
fn audited(lab: &Lab, event: &str, pick: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value> {
    let mut found = None;
    eventually(Duration::from_secs(8), || {
        found = lab.audit()?.into_iter().rfind(|l| l["event"] == event && pick(l));
        Ok(found.is_some())
    })?;
    found.with_context(|| format!("no {event} line: {:?}", lab.audit()))
}

/// A connection from the client to the published port that echoes.
fn live_connection(lab: &Lab) -> Result<std::net::TcpStream> {
    let mut s = lab
        .tcp_connect(Role::Client, public(), None, Duration::from_secs(3))?
        .context("the published port did not answer")?;
    anyhow::ensure!(gatekeeper_tests::lab::round_trip(&mut s, b"before\n")?);
    Ok(s)
}

/// Whether the published port answers the client within a few seconds.
fn answers_soon(lab: &Lab) -> Result<bool> {
    eventually(Duration::from_secs(5), || {
        lab.tcp_echo_works(Role::Client, public(), None)
    })
}

/// Whether a live connection still echoes (a cut one errs or closes).
fn still_echoes(s: &mut std::net::TcpStream) -> bool {
    gatekeeper_tests::lab::round_trip(s, b"still?\n").unwrap_or(false)
}

#[test]
fn pause_resume_update_and_reissue_act_on_live_sessions() -> Result<()> {
    let (lab, _daemon, cred, token) = setup()?;
    let agent = start_agent(&lab, &token)?;
    udp_knock(&lab, Role::Client, &cred, PUBLIC_PORT)?;
    let mut before = live_connection(&lab)?;

    // Pause: the live connection is cut, the port closed, the agent stays and is told.
    lab.state_cli(&["tunnel", "pause", "web"])?;
    audited(&lab, "tunnel_paused", |l| l["tunnel"] == "web")?;
    anyhow::ensure!(
        eventually(Duration::from_secs(5), || Ok(!still_echoes(&mut before)))?,
        "a paused tunnel's live connection is cut"
    );
    anyhow::ensure!(!lab.tcp_echo_works(Role::Client, public(), None)?, "its port is closed");
    let listed = tunnels(&lab)?;
    anyhow::ensure!(
        listed[0]["paused"] == true && listed[0]["connected"] == true,
        "the agent stays connected: {listed:?}"
    );

    // Resume: the port opens again for the same agent session.
    lab.state_cli(&["tunnel", "resume", "web"])?;
    audited(&lab, "tunnel_resumed", |l| l["tunnel"] == "web")?;
    anyhow::ensure!(answers_soon(&lab)?, "resumed, the port answers again");
    let sessions = lab
        .audit()?
        .iter()
        .filter(|l| l["event"] == "agent_session" && l["result"] == "connected")
        .count();
    anyhow::ensure!(sessions == 1, "one agent session all along, not {sessions}");

    // Update, live: a transfer in progress goes on; the new owner is audited;
    // the client no longer allowed is refused a new knock.
    let mut during = live_connection(&lab)?;
    lab.enroll("phone", &["--allow", "tcp/22"])?;
    lab.state_cli(&["tunnel", "update", "web", "--allow", "phone", "--owner", "web-team"])?;
    let updated = audited(&lab, "tunnel_updated", |l| l["tunnel"] == "web")?;
    anyhow::ensure!(
        updated["owner"] == "web-team" && updated["was"]["owner"] == "ops",
        "{updated}"
    );
    anyhow::ensure!(still_echoes(&mut during), "an update does not cut live connections");
    drop(during);
    audited(&lab, "tunnel_connection", |l| l["owner"] == "web-team")?;
    udp_knock(&lab, Role::Client, &cred, PUBLIC_PORT)?;
    let refused = audited(&lab, "knock", |l| l["client"] == "laptop" && l["result"] == "rejected")?;
    anyhow::ensure!(refused["reason"] == "outside_policy", "{refused}");

    // Reissue with no overlap: the old token's session ends, and its agent
    // stops, saying so; the new token publishes again.
    let mut cut = live_connection(&lab)?;
    let new_token = lab.state_cli(&["tunnel", "reissue", "web"])?;
    audited(&lab, "tunnel_reissued", |l| l["tunnel"] == "web")?;
    let ended = agent.output_within(Duration::from_secs(15))?;
    let said = String::from_utf8_lossy(&ended.stderr);
    anyhow::ensure!(
        !ended.status.success() && said.contains("re-issued"),
        "the old agent stops and says why: {said}"
    );
    anyhow::ensure!(!still_echoes(&mut cut), "the old session's connections are cut");
    let new_file = lab.scratch().join("web-2.token");
    gatekeeper::private_file::write(&new_file, new_token.trim())?;
    let _agent = start_agent(&lab, &new_file)?;
    anyhow::ensure!(answers_soon(&lab)?, "the new token publishes the same port");
    Ok(())
}

/// `gatekeeper cert show --json`.
fn cert_show(lab: &Lab) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&lab.state_cli(&["cert", "show", "--json"])?)?)
}

#[test]
fn the_tunnel_certificate_is_renewed_under_live_sessions_and_agents_keep_connecting() -> Result<()> {
    let (lab, _daemon, cred, token_file) = setup()?;
    let before = cert_show(&lab)?;
    anyhow::ensure!(
        before["subject"] == "CN=10.77.0.1" && before["issuer"] == before["subject"],
        "named after the gateway's address, like any server: {before}"
    );
    let lifetime =
        before["not_after"].as_u64().context("not_after")? - before["not_before"].as_u64().context("not_before")?;
    anyhow::ensure!(
        (364 * 86_400..=366 * 86_400).contains(&lifetime),
        "valid for about a year: {before}"
    );

    // A token from before key pins pins the whole certificate: it works
    // until the certificate is renewed.
    let good = gatekeeper::tunnels::Token::decode(&std::fs::read_to_string(&token_file)?)?;
    anyhow::ensure!(good.fingerprint == before["pin"], "new tokens pin the key: {before}");
    let old_style = lab.scratch().join("old-style.token");
    let whole = before["certificate_sha256"].as_str().context("certificate_sha256")?;
    gatekeeper::private_file::write(
        &old_style,
        &gatekeeper::tunnels::Token {
            fingerprint: whole.to_string(),
            ..good.clone()
        }
        .encode(),
    )?;
    let agent = start_agent(&lab, &old_style)?;
    udp_knock(&lab, Role::Client, &cred, PUBLIC_PORT)?;
    let mut during = live_connection(&lab)?;

    let renewed: serde_json::Value = serde_json::from_str(&lab.state_cli(&["cert", "renew", "--json"])?)?;
    anyhow::ensure!(
        renewed["pin"] == before["pin"]
            && renewed["certificate_sha256"] != before["certificate_sha256"]
            && renewed["serial"] != before["serial"],
        "the same key, a new certificate: {before} / {renewed}"
    );
    let replaced = audited(&lab, "certificate_replaced", |l| l["serial"] == renewed["serial"])?;
    anyhow::ensure!(replaced["serves"] == serde_json::json!(["tunnel"]), "{replaced}");
    anyhow::ensure!(still_echoes(&mut during), "a session up before the renewal carries on");
    let status: serde_json::Value = serde_json::from_str(&lab.state_cli(&["status", "--json"])?)?;
    let served = &status["certificates"][0];
    anyhow::ensure!(
        served["subject"] == "CN=10.77.0.1"
            && served["pin"] == before["pin"]
            && served["problem"].is_null()
            && served["renews_at"].as_u64() > Some(renewed["not_before"].as_u64().unwrap_or(0) + 200 * 86_400),
        "status shows the served certificate: {served}"
    );

    // The agent's next session meets the new certificate: the old-style
    // pin is refused by name, the token's key pin connects.
    drop(during);
    drop(agent);
    anyhow::ensure!(
        eventually(Duration::from_secs(10), || Ok(!connected(&lab)?))?,
        "the agent is gone"
    );
    let forward = format!("127.0.0.1:{PRIVATE_PORT}");
    let stale = ChildGuard::new(lab.spawn_gatekeeper(
        Role::NatA,
        &[
            "agent",
            "--token-file",
            old_style.to_str().context("utf-8")?,
            "--forward",
            &forward,
        ],
    )?);
    let said = String::from_utf8_lossy(&stale.output_within(Duration::from_secs(30))?.stderr).into_owned();
    anyhow::ensure!(said.contains("public key pin"), "the stale pin is named: {said}");
    let _agent = start_agent(&lab, &token_file)?;
    assert_eq!(connect_echo(&lab, &cred, b"after renewal\n")?, b"after renewal\n");
    Ok(())
}

#[test]
fn the_daemon_renews_a_certificate_that_is_due_and_the_key_pin_holds() -> Result<()> {
    let mut lab = Lab::with_nat()?;
    lab.serve_tcp_echo(Role::NatA, PRIVATE_PORT)?;
    lab.init()?;
    let token = lab.state_cli(&["tunnel", "issue", "web", "--owner", "ops"])?;
    let token_file = lab.scratch().join("web.token");
    gatekeeper::private_file::write(&token_file, token.trim())?;
    // A certificate for the state's key, long past two thirds of its
    // validity, as a gateway that was off for a year would hold.
    let key_pem = std::fs::read_to_string(lab.state_dir().join("gateway.key"))?;
    let key = rcgen::KeyPair::from_pem(&key_pem)?;
    let mut params = rcgen::CertificateParams::new(vec!["10.77.0.1".to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, "10.77.0.1");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    std::fs::write(lab.state_dir().join("gateway.crt"), params.self_signed(&key)?.pem())?;
    let stale = cert_show(&lab)?;

    let _daemon = lab.start_daemon(&["--protect", "tcp/22", "--config", &config(&lab, "")?])?;
    let renewed = audited(&lab, "certificate_renewed", |l| {
        l["serves"] == serde_json::json!(["tunnel"])
    })?;
    let now = cert_show(&lab)?;
    anyhow::ensure!(
        now["pin"] == stale["pin"]
            && now["serial"] == renewed["serial"]
            && now["not_after"].as_u64() > Some(1_800_000_000),
        "renewed with the same key, for a year: {stale} / {now} / {renewed}"
    );
    let _agent = start_agent(&lab, &token_file)?;
    Ok(())
}

#[test]
fn an_agent_stopped_by_its_operator_says_goodbye_and_is_audited_so() -> Result<()> {
    let (lab, _daemon, _cred, token) = setup()?;
    let token_arg = token.to_str().context("utf-8 path")?;

    // SIGTERM: the agent tells the gateway, and exits cleanly.
    let agent = start_agent(&lab, &token)?;
    let pid = agent.id().context("agent pid")?;
    gatekeeper_tests::lab::sh(&["kill", "-TERM", &pid.to_string()])?;
    let ended = agent.output_within(Duration::from_secs(10))?;
    anyhow::ensure!(
        ended.status.success(),
        "SIGTERM ends the agent cleanly: {}",
        String::from_utf8_lossy(&ended.stderr)
    );
    let line = audited(&lab, "agent_session", |l| l["result"] == "stopped")?;
    anyhow::ensure!(
        line["reason"]
            .as_str()
            .is_some_and(|r| r.contains("agent disconnected by its operator")),
        "{line}"
    );
    anyhow::ensure!(
        eventually(Duration::from_secs(5), || Ok(!connected(&lab)?))?,
        "the gateway closed the session"
    );
    anyhow::ensure!(!lab.tcp_echo_works(Role::Client, public(), None)?, "and its port");

    // agent --stop, from another process with the token.
    let agent = start_agent(&lab, &token)?;
    let stopped = lab.gatekeeper_with_input(
        Role::NatA,
        &["agent", "--stop", "--token-file", token_arg],
        b"",
        Duration::from_secs(20),
    )?;
    let said = String::from_utf8_lossy(&stopped.stdout);
    anyhow::ensure!(stopped.status.success() && said.contains("is ended"), "{said}");
    let ended = agent.output_within(Duration::from_secs(10))?;
    anyhow::ensure!(
        ended.status.success(),
        "the running agent hears it and exits cleanly: {}",
        String::from_utf8_lossy(&ended.stderr)
    );
    // The audit writer may still be writing the second line.
    let stops = || -> Result<usize> {
        Ok(lab
            .audit()?
            .iter()
            .filter(|l| l["event"] == "agent_session" && l["result"] == "stopped")
            .count())
    };
    anyhow::ensure!(
        eventually(Duration::from_secs(5), || Ok(stops()? == 2))?,
        "both stops audited as the operator's: {}",
        stops()?
    );
    Ok(())
}

/// Sends `len` pseudo-random bytes through `s` while reading back what the
/// echo service returns; the SHA-256 of what went and of what came back.
fn hashed_echo(s: std::net::TcpStream, len: u64) -> Result<([u8; 32], [u8; 32], u64)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut writer = s.try_clone()?;
    let send = std::thread::spawn(move || -> std::io::Result<[u8; 32]> {
        let mut rng = gatekeeper_tests::frames::Rng::new(0x5eed);
        let (mut hash, mut chunk, mut left) = (Sha256::new(), vec![0u8; 1 << 20], len);
        while left > 0 {
            let n = chunk.len().min(left as usize);
            for word in chunk[..n].chunks_mut(8) {
                word.copy_from_slice(&rng.next_u64().to_le_bytes()[..word.len()]);
            }
            hash.update(&chunk[..n]);
            writer.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(hash.finalize().into())
    });
    let (mut hash, mut buf, mut got) = (Sha256::new(), vec![0u8; 1 << 20], 0u64);
    let mut reader = &s;
    while got < len {
        match reader.read(&mut buf)? {
            0 => break,
            n => {
                hash.update(&buf[..n]);
                got += n as u64;
            }
        }
    }
    let sent = send.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    Ok((sent, hash.finalize().into(), got))
}

#[test]
fn a_gigabyte_crosses_a_tunnel_intact_while_its_keys_are_refreshed() -> Result<()> {
    let (lab, _daemon, cred, token_file) = setup_with("rekey_bytes = \"64MiB\"\n")?;
    let _agent = start_agent(&lab, &token_file)?;
    udp_knock(&lab, Role::Client, &cred, PUBLIC_PORT)?;
    let s = lab
        .tcp_connect(Role::Client, public(), None, Duration::from_secs(3))?
        .context("the published port did not answer")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    const GIB: u64 = 1 << 30;
    let (sent, came_back, got) = hashed_echo(s, GIB)?;
    anyhow::ensure!(
        got == GIB && sent == came_back,
        "{got} bytes back, intact: {}",
        sent == came_back
    );

    // Each direction moved to a new key about every 64 MiB, the agent's
    // following the gateway's requests.
    for direction in ["gateway_to_agent", "agent_to_gateway"] {
        let line = audited(&lab, "tunnel_key_update", |l| {
            l["direction"] == direction && l["updates"].as_u64().is_some_and(|u| u >= 15)
        })?;
        anyhow::ensure!(line["tunnel"] == "web", "{line}");
    }
    Ok(())
}

/// A web server in a role's namespace on `addr:8081`, serving `page`.
fn web_server(lab: &Lab, role: Role, addr: &str, page: &str) -> Result<ChildGuard> {
    let www = lab.scratch().join(format!("www-{addr}"));
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), page)?;
    let server = ChildGuard::new(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(role),
                "python3",
                "-m",
                "http.server",
                "8081",
                "--bind",
                addr,
            ])
            .arg("--directory")
            .arg(&www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let up = eventually(Duration::from_secs(10), || {
        Ok(lab
            .exec(
                role,
                &["curl", "-sS", "--max-time", "2", &format!("http://{addr}:8081/")],
            )
            .is_ok())
    })?;
    anyhow::ensure!(up, "the web server on {addr} did not come up");
    Ok(server)
}

#[test]
fn a_socks5_agent_publishes_its_network_within_its_allow_list() -> Result<()> {
    let (lab, _daemon, cred, token_file) = setup()?;
    // Three hosts of the private network, by names only the agent's host resolves.
    let _a = web_server(&lab, Role::NatA, "192.168.77.2", "<h1>host a</h1>\n")?;
    let _b = web_server(&lab, Role::NatB, "192.168.77.3", "<h1>host b</h1>\n")?;
    let _r = web_server(&lab, Role::Router, "192.168.77.1", "<h1>router</h1>\n")?;
    lab.set_hosts(
        Role::NatA,
        "127.0.0.1 localhost\n192.168.77.2 a.lan\n192.168.77.3 b.lan\n192.168.77.1 router.lan\n",
    )?;
    let token_arg = token_file.to_str().context("utf-8 path")?;
    let _agent = ChildGuard::new(lab.spawn_gatekeeper(
        Role::NatA,
        &[
            "agent",
            "--token-file",
            token_arg,
            "--socks5",
            "--allow-dest",
            "192.168.77.2/31:8081",
        ],
    )?);
    anyhow::ensure!(
        eventually(Duration::from_secs(20), || connected(&lab))?,
        "the agent never connected"
    );
    let proxy = format!("10.77.0.1:{PUBLIC_PORT}");
    let curl = |role: Role, host: &str| {
        lab.exec(
            role,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--socks5-hostname",
                &proxy,
                &format!("http://{host}:8081/"),
            ],
        )
    };
    anyhow::ensure!(curl(Role::Client, "a.lan").is_err(), "closed before the knock");
    udp_knock(&lab, Role::Client, &cred, PUBLIC_PORT)?;
    for (host, page) in [("a.lan", "host a"), ("b.lan", "host b")] {
        let got = curl(Role::Client, host)?;
        anyhow::ensure!(String::from_utf8_lossy(&got.stdout).contains(page), "{host}: {got:?}");
    }
    let refused = curl(Role::Client, "router.lan");
    let why = format!("{:#}", refused.err().context("the router is outside the allow list")?);
    // Reply code 2: "connection not allowed by ruleset" (RFC 1928).
    anyhow::ensure!(why.contains("SOCKS5") && why.contains("(2)"), "curl hears why: {why}");
    anyhow::ensure!(curl(Role::Intruder, "a.lan").is_err(), "the intruder reaches nothing");

    for (dest, result) in [
        ("a.lan:8081", "connected"),
        ("b.lan:8081", "connected"),
        ("router.lan:8081", "not_allowed"),
    ] {
        let line = audited(&lab, "tunnel_destination", |l| l["destination"] == dest)?;
        anyhow::ensure!(line["result"] == result && line["tunnel"] == "web", "{line}");
    }
    Ok(())
}

#[test]
fn an_idle_session_is_closed_and_its_agent_comes_back() -> Result<()> {
    let (lab, _daemon, cred, token_file) = setup_with("idle_timeout = \"2s\"\n")?;
    let _agent = start_agent(&lab, &token_file)?;
    udp_knock(&lab, Role::Client, &cred, PUBLIC_PORT)?;

    // In use, the session is not idle, however long the connection lasts.
    let mut held = live_connection(&lab)?;
    std::thread::sleep(Duration::from_secs(4));
    anyhow::ensure!(still_echoes(&mut held), "a connection in use keeps its session");
    let idle = |l: &serde_json::Value| l["reason"].as_str().is_some_and(|r| r.starts_with("idle"));
    anyhow::ensure!(
        !lab.audit()?.iter().any(|l| l["event"] == "agent_session" && idle(l)),
        "closed while in use"
    );
    drop(held);

    // Unused, it is closed, and the agent's reconnect brings it back.
    audited(&lab, "agent_session", |l| l["result"] == "disconnected" && idle(l))?;
    let back = eventually(Duration::from_secs(10), || {
        Ok(lab
            .audit()?
            .iter()
            .filter(|l| l["event"] == "agent_session" && l["result"] == "connected")
            .count()
            >= 2)
    })?;
    anyhow::ensure!(back, "the agent reconnected");
    anyhow::ensure!(answers_soon(&lab)?, "and the port serves again");
    Ok(())
}
