//! `cargo xtask demo`: the gate in a lab of network namespaces, step by step.

use std::{
    io::Write,
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gatekeeper::{
    knock::send::Request,
    spec::{PortRange, Proto},
};
use gatekeeper_tests::{
    clients::{LINUX, client_bin},
    cluster::{knock_and_connect, start_nodes},
    frames::Rng,
    fwknop,
    lab::{Lab, Role, SHARED_ADDR, eventually, gatekeeper_bin, output_within},
    nmap,
    redis::RedisServer,
    relay::{HOST, RELAY_PORT, RelayLab, SERVICE_PORT, curl, status_of},
};

use gatekeeper_tests::channel::{CHANNEL_PORT, ChannelLab, Sshd, inbound, on_the_wire, outbound};

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}] {text}\x1b[0m");
}

fn show(cmd: &str, out: &str) {
    println!("$ {cmd}");
    for line in out.lines() {
        println!("  {line}");
    }
}

fn describe(scan: &nmap::Scan) -> String {
    let closed = if scan.closed.is_empty() {
        "none".to_string()
    } else {
        format!("{} ports", scan.closed.len())
    };
    format!(
        "open: {:?}; closed: {closed}; everything else silent (filtered)",
        scan.open
    )
}

fn ok(b: bool) -> &'static str {
    if b { "connected, echo ok" } else { "no answer" }
}

fn main() -> Result<()> {
    let gw = Role::Gateway.addr();
    let ssh = SocketAddr::from((gw, 22));
    let web = SocketAddr::from((gw, 8080));

    step(
        1,
        "A lab: gateway 10.77.0.1 (ssh 22, web 8080, public 9090, portal 443), client 10.77.0.2, intruder 10.77.0.3",
    );
    let mut lab = Lab::new()?;
    for port in [22, 8080, 9090] {
        lab.serve_tcp_echo(Role::Gateway, port)?;
    }

    step(
        2,
        "The gateway gets a key; the client's device is enrolled for the web ports and the portal",
    );
    let cred = lab.enroll("laptop", &["--allow", "tcp/443,tcp/8000-8100"])?;
    let cred_arg = cred.to_str().context("utf-8 path")?;
    println!(
        "$ gatekeeper init --state-dir {} --public-addr 10.77.0.1,fd77::1",
        lab.state_dir().display()
    );
    println!("$ gatekeeper client add laptop --allow tcp/443,tcp/8000-8100 --out {cred_arg}");
    show("gatekeeper client list", &lab.state_cli(&["client", "list"])?);

    step(
        3,
        "The gate starts on the gateway's NIC, protecting ssh and the web ports, with a TLS portal on 443 in front of web and Prometheus metrics on loopback",
    );
    let protect = "tcp/22,tcp/8000-8100";
    let portal = [
        "--portal",
        "10.77.0.1:443",
        "--portal-upstream",
        "127.0.0.1:8080",
        "--metrics",
        "127.0.0.1:9477",
    ];
    println!("$ gatekeeper run --iface gw0 --protect {protect} {}", portal.join(" "));
    let mut args = vec!["--protect", protect];
    args.extend(portal);
    let mut daemon = lab.start_daemon(&args)?;
    println!(
        "  {}",
        daemon
            .log()
            .lines()
            .find(|l| l.contains("gate up"))
            .unwrap_or("gate up")
    );

    step(4, "The intruder scans every TCP port with nmap");
    let scan = nmap::scan(&lab, Role::Intruder, "-sS", "1-65535", &gw.to_string())?;
    show("nmap -sS -p- 10.77.0.1   (from the intruder)", &describe(&scan));
    ensure!(
        scan.answered_in(22, 22).is_empty() && scan.answered_in(8000, 8100).is_empty(),
        "a protected port answered: {scan:?}"
    );
    ensure!(scan.open.contains(&443), "the portal is the public face: {scan:?}");
    println!("  -> ssh and web are invisible; only the unprotected 9090 and the portal on 443 show");

    step(5, "The client tries ssh before anyone let it in");
    let before = lab.tcp_echo_works(Role::Client, ssh, None)?;
    println!(
        "  client -> 10.77.0.1:22: {}",
        if before {
            "connected"
        } else {
            "no answer (dropped in XDP)"
        }
    );
    ensure!(!before, "the client got in without an entry");

    step(
        6,
        "An operator lets the client's address into ssh, and only ssh, for 10 minutes",
    );
    let cmd = ["whitelist", "add", "10.77.0.2/tcp", "--ports", "22", "--ttl", "10m"];
    show(&format!("gatekeeper {}", cmd.join(" ")), &lab.cli_ok(&cmd)?);
    let ssh_ok = lab.tcp_echo_works(Role::Client, ssh, None)?;
    let web_ok = lab.tcp_echo_works(Role::Client, web, None)?;
    println!("  client -> 10.77.0.1:22 {}; -> :8080 {}", ok(ssh_ok), ok(web_ok));
    ensure!(ssh_ok && !web_ok, "the entry should open exactly port 22 to the client");

    step(
        7,
        "The client's device lets itself into web with its key: one SYN knock, then the connection",
    );
    // The device runs the client-only build: stable Rust, no gate inside
    // (`cargo xtask clients` also makes the Windows one).
    let client = client_bin(LINUX, "gatekeeper")?;
    println!(
        "  the device's gatekeeper is the client-only build ({:.1} MiB, stable Rust, no XDP): {}",
        std::fs::metadata(&client)?.len() as f64 / (1024.0 * 1024.0),
        client.display()
    );
    println!("$ echo hello | gatekeeper connect --credential {cred_arg} 10.77.0.1:8080   (on the client)");
    let mut child = lab.spawn_program(
        Role::Client,
        &client,
        &["connect", "--credential", cred_arg, "10.77.0.1:8080"],
    )?;
    child.stdin.take().context("stdin")?.write_all(b"hello\n")?;
    let out = output_within(child, Duration::from_secs(30))?;
    println!("  {}", String::from_utf8_lossy(&out.stdout).trim());
    ensure!(
        out.stdout == b"hello\n",
        "connect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit = lab.audit()?;
    let line = audit.last().context("no audit line")?;
    println!(
        "  audit: {} {} from {}:{}, opened ports {} for that source port (knock format {}: the packet named no device, only the gateway could tell)",
        line["client"], line["result"], line["src"], line["sport"], line["opened"]["ports"], line["format"]
    );
    ensure!(line["format"] == "v2", "the device knocked {}, not v2", line["format"]);

    step(8, "The intruder still sees nothing");
    let again = nmap::scan(&lab, Role::Intruder, "-sS", "22,8000-8100", &gw.to_string())?;
    show(
        "nmap -sS -p 22,8000-8100 10.77.0.1   (from the intruder)",
        &describe(&again),
    );
    ensure!(
        again.open.is_empty() && again.closed.is_empty(),
        "the intruder saw a protected port: {again:?}"
    );

    step(
        9,
        "The portal on 443: a browser without a key gets the guidance page (HTTP/2, a certificate like any server's); the laptop's key gets it to web",
    );
    let page = lab.exec(
        Role::Intruder,
        &[
            "curl",
            "-sk",
            "--max-time",
            "10",
            "-w",
            "\nHTTP/%{http_version}",
            "https://10.77.0.1/wp-admin",
        ],
    )?;
    let page = String::from_utf8_lossy(&page.stdout).into_owned();
    let (page, version) = page.rsplit_once('\n').unwrap_or((&page, ""));
    let title = page
        .split("<title>")
        .nth(1)
        .and_then(|t| t.split("</title>").next())
        .unwrap_or("(no title)");
    show(
        "curl -k https://10.77.0.1/wp-admin   (from the intruder)",
        &format!("<title>{title}</title>   ({version})"),
    );
    ensure!(
        page.contains("This gateway is private"),
        "not the guidance page: {page:.200}"
    );
    show("gatekeeper cert show", &lab.state_cli(&["cert", "show"])?);
    println!("$ echo through-the-portal | gatekeeper connect --portal --credential {cred_arg} 10.77.0.1:443");
    let mut child = lab.spawn_gatekeeper(
        Role::Client,
        &["connect", "--portal", "--credential", cred_arg, "10.77.0.1:443"],
    )?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"through-the-portal\n")?;
    let out = output_within(child, Duration::from_secs(30))?;
    println!("  {}", String::from_utf8_lossy(&out.stdout).trim());
    ensure!(
        out.stdout == b"through-the-portal\n",
        "connect --portal failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit = lab.audit()?;
    let decisions: Vec<String> = audit
        .iter()
        .filter(|l| l["event"] == "portal")
        .map(|l| format!("{} from {} -> {}", l["result"], l["src"], l["decision"]))
        .collect();
    println!("  audit (portal): {}", decisions.join("; "));

    step(
        10,
        "A flood from the intruder: 20,000 garbage knocks and replays of a captured one, while the laptop connects",
    );
    let captured = lab.with_knocker(Role::Client, &cred, |k, server| {
        let req = Request {
            proto: Proto::Tcp,
            ports: PortRange { lo: 8080, hi: 8080 },
            source_port: None,
        };
        Ok(k.build(server, &req, 0)?)
    })?;
    let sent = captured.clone();
    let lines = lab.audit()?.len();
    lab.in_ns(Role::Client, move || -> Result<()> {
        UdpSocket::bind("0.0.0.0:0")?.send_to(&sent, (gw, 62201))?;
        Ok(())
    })??;
    ensure!(
        eventually(Duration::from_secs(5), || Ok(lab.audit()?.len() > lines))?,
        "the knock to be captured was not accepted"
    );
    let mut garbage = gatekeeper_common::knock::PREFIX.to_vec();
    garbage.extend(Rng::new(7).bytes(150));
    let audit_before = std::fs::metadata(lab.state_dir().join("audit.log"))?.len();
    let flood = std::thread::scope(|s| -> Result<_> {
        let flood = s.spawn(|| {
            lab.in_ns(Role::Intruder, move || -> Result<()> {
                let sock = UdpSocket::bind("0.0.0.0:0")?;
                for i in 0..10_000 {
                    sock.send_to(&garbage, (gw, 62201))?;
                    sock.send_to(&captured, (gw, 62201))?;
                    if i % 500 == 499 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                Ok(())
            })
        });
        let mut child = lab.spawn_gatekeeper(Role::Client, &["connect", "--credential", cred_arg, "10.77.0.1:8080"])?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(b"hello through the flood\n")?;
        let out = output_within(child, Duration::from_secs(30));
        flood
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"))???;
        out
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let stats: serde_json::Value = serde_json::from_str(&lab.cli_ok(&["stats", "--json"])?)?;
    println!(
        "  dropped in XDP: {} for an unknown key id, {} as replays; the daemon saw none of them",
        stats["knock_unknown_key"], stats["knock_replayed"]
    );
    println!("  laptop: {}", String::from_utf8_lossy(&flood.stdout).trim());
    ensure!(
        flood.stdout == b"hello through the flood\n",
        "the laptop was crowded out"
    );
    let grown = std::fs::metadata(lab.state_dir().join("audit.log"))?.len() - audit_before;
    println!("  the audit trail grew by {grown} bytes: the laptop's knock, nothing of the flood");

    step(
        11,
        "A way around the gate: the intruder sets up a VXLAN into the gateway; the daemon names it, one command closes it",
    );
    let inside = SocketAddr::new(lab.vxlan_to_gateway(Role::Intruder)?, 22);
    let through = lab.tcp_echo_works(Role::Intruder, inside, None)?;
    println!("  intruder -> {inside} (inside the VXLAN): {}", ok(through));
    ensure!(through, "the lab's VXLAN does not work");
    daemon.wait_for("not gated", Duration::from_secs(5))?;
    let warning = daemon.log();
    println!(
        "  daemon: {}",
        warning.lines().find(|l| l.contains("not gated")).unwrap_or("").trim()
    );
    show("gatekeeper attach vx0", &lab.cli_ok(&["attach", "vx0"])?);
    let closed = lab.tcp_echo_works(Role::Intruder, inside, None)?;
    println!("  intruder -> {inside}: {}", ok(closed));
    ensure!(!closed, "attaching vx0 did not close it");
    println!("  (`gatekeeper run --cover all` gates such interfaces as they appear)");

    step(
        12,
        "A phone enrolls with a key it made itself; the gateway rotates its knock key and the phone follows",
    );
    key_lifecycle(&lab)?;

    step(
        13,
        "An old phone keeps its stock fwknop client: enrolled with --fwknop while the daemon runs, it knocks unchanged",
    );
    old_phone(&mut lab)?;

    step(
        14,
        "A broken file in the state, then a revocation the running daemon confirms",
    );
    std::fs::write(
        lab.state_dir().join("clients/typo.toml"),
        "name = \"typo\"\nallow = tcp/22\n",
    )?;
    show("gatekeeper client list", &lab.state_cli(&["client", "list"])?);
    show(
        "gatekeeper client revoke laptop",
        &lab.state_cli(&["client", "revoke", "laptop"])?,
    );
    show("gatekeeper status", &lab.state_cli(&["status"])?);

    step(
        15,
        "What the gate holds and what it did: the maps, the audit trail searched, the metrics Prometheus reads",
    );
    show("gatekeeper whitelist list", &lab.cli_ok(&["whitelist", "list"])?);
    show("gatekeeper stats", &lab.cli_ok(&["stats"])?);
    show(
        "gatekeeper audit --client laptop --result accepted --limit 3",
        &lab.state_cli(&["audit", "--client", "laptop", "--result", "accepted", "--limit", "3"])?,
    );
    let scrape = lab.exec(
        Role::Gateway,
        &["curl", "-sS", "--max-time", "3", "http://127.0.0.1:9477/metrics"],
    )?;
    let wanted = [
        "gatekeeper_knocks_total",
        "gatekeeper_knock_open_seconds_count",
        "gatekeeper_portal_sessions_total",
        "gatekeeper_whitelist_entries",
    ];
    let picked: String = String::from_utf8_lossy(&scrape.stdout)
        .lines()
        .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
        .map(|l| format!("{l}\n"))
        .collect();
    ensure!(!picked.is_empty(), "the metrics endpoint served nothing");
    show("curl -s http://127.0.0.1:9477/metrics | grep ...", &picked);

    step(16, "Cleaning up: stopping the daemon, detaching, removing the lab");
    drop(daemon);
    show("gatekeeper detach", &lab.cli_ok(&["detach"])?);
    drop(lab);

    tunnels()?;
    cluster()?;
    relay()?;
    channel()?;
    println!(
        "\ndone: a full scan saw only the portal; one client got into ssh by an operator's entry, into web by a knock and through the portal, also during a flood; strangers got the guidance page; a tunnel around the gate was named and closed; a phone enrolled with a key it made itself and followed a rotation of the gateway's knock key; an old phone got in with the stock fwknop client; a broken file blocked nothing and the revocation was confirmed; the audit trail was searched and the metrics counted every knock; a service behind a NAT was published through a tunnel, paused, resumed and stopped by its agent's operator; three gateways behind one address let the client in wherever its knock and its connection landed, and all three confirmed its revocation; an agent that reaches only Redis published a web service through both nodes of a relay, until it was revoked; an unmodified ssh crossed a channel under the SM suite and sshd saw its real address, while a peer outside the policy and an unpinned one were refused."
    );
    Ok(())
}

/// Step 13: a device on another host (10.77.0.6) with Debian's fwknop
/// client and the stanza `client add --fwknop` printed.
fn old_phone(lab: &mut Lab) -> Result<()> {
    lab.add_host(Role::Agent)?;
    let web = SocketAddr::from((Role::Gateway.addr(), 8080));
    let cred = lab.scratch().join("oldphone.credential.toml");
    let cred = cred.to_str().context("utf-8 path")?;
    println!("$ gatekeeper client add oldphone --allow tcp/8000-8100 --fwknop");
    let said = lab.state_cli(&[
        "client",
        "add",
        "oldphone",
        "--allow",
        "tcp/8000-8100",
        "--fwknop",
        "--out",
        cred,
    ])?;
    let (rc, stanza) = fwknop::write_stanza(lab, &said, "oldphone")?;
    for line in stanza.lines().filter(|l| !l.contains("KEY")) {
        println!("  {line}");
    }
    println!("  KEY_BASE64 ..., HMAC_KEY_BASE64 ...   (its ~/.fwknoprc stanza, handed over privately)");
    let before = lab.tcp_echo_works(Role::Agent, web, None)?;
    println!("  phone -> 10.77.0.1:8080: {}", ok(before));
    ensure!(!before, "the phone got in before knocking");
    println!("$ fwknop -n oldphone -A tcp/8080   (on the phone, unchanged)");
    // The daemon confirmed the enrollment; the first knock normally opens.
    let opened = eventually(Duration::from_secs(10), || {
        fwknop::knock(lab, Role::Agent, &rc, "oldphone", &["-A", "tcp/8080"])?;
        eventually(Duration::from_secs(2), || lab.tcp_echo_works(Role::Agent, web, None))
    })?;
    println!("  phone -> 10.77.0.1:8080: {}", ok(opened));
    ensure!(opened, "the fwknop knock did not open: {:?}", lab.audit()?.last());
    let audit = lab.audit()?;
    let line = audit
        .iter()
        .rev()
        .find(|l| l["format"] == "fwknop")
        .context("no fwknop audit line")?;
    println!(
        "  audit: {} {} (format {}, user {}, access {})",
        line["client"], line["result"], line["format"], line["request"]["user"], line["request"]["access"]
    );
    println!("  (`gatekeeper import fwknop /etc/fwknop/access.conf` takes over a whole fwknopd gateway's devices)");
    Ok(())
}

/// `gatekeeper ARGS` on the client's host; its stdout.
fn on_client(lab: &Lab, args: &[&str]) -> Result<String> {
    let bin = gatekeeper_bin()?;
    let mut full = vec![bin.to_str().context("utf-8 path")?];
    full.extend_from_slice(args);
    Ok(String::from_utf8(lab.exec(Role::Client, &full)?.stdout)?)
}

/// A one-line code cut short for the screen.
fn short(line: &str) -> String {
    format!("{}...", &line[..line.len().min(28)])
}

/// Enrollment by request and approval, then a knock key rotation the
/// device learns of from the gateway.
fn key_lifecycle(lab: &Lab) -> Result<()> {
    let key = lab.scratch().join("phone.key");
    let cred = lab.scratch().join("phone.credential.toml");
    let (key, cred) = (key.to_str().context("utf-8")?, cred.to_str().context("utf-8")?);
    let asked: serde_json::Value = serde_json::from_str(&on_client(
        lab,
        &[
            "client",
            "request",
            "--key",
            key,
            "--gateway",
            "10.77.0.1",
            "--name",
            "phone",
            "--json",
        ],
    )?)?;
    let (request, fingerprint) = (
        asked["request"].as_str().context("request")?,
        asked["fingerprint"].as_str().context("fingerprint")?,
    );
    println!("$ gatekeeper client request --key phone.key --gateway 10.77.0.1 --name phone   (on the client)");
    println!(
        "  {}   fingerprint {fingerprint}; the secret stays in phone.key",
        short(request)
    );
    let approve = [
        "client",
        "approve",
        request,
        "--allow",
        "tcp/22",
        "--fingerprint",
        fingerprint,
    ];
    let approved = lab.state_cli(&approve)?;
    let line = approved
        .lines()
        .find(|l| l.starts_with("gk-credential-1:"))
        .context("no credential line")?;
    println!(
        "$ gatekeeper client approve {} --allow tcp/22 --fingerprint {fingerprint}",
        short(request)
    );
    println!("  {}", approved.lines().next().unwrap_or(""));
    println!("  {}   (no secret in it)", short(line));
    on_client(lab, &["client", "install", line, "--key", key, "--out", cred])?;
    println!(
        "$ gatekeeper client install {} --key phone.key   (on the client)",
        short(line)
    );
    show(
        "gatekeeper rotate-key --overlap 1h",
        &lab.state_cli(&["rotate-key", "--overlap", "1h"])?,
    );
    show(
        "gatekeeper client refresh --credential phone.credential.toml   (on the client)",
        &on_client(lab, &["client", "refresh", "--credential", cred])?,
    );
    let sent = lab.udp_knock(Role::Client, Path::new(cred), 22, None, &[])?;
    ensure!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let mut knocked = None;
    eventually(Duration::from_secs(5), || {
        knocked = lab.audit()?.into_iter().rfind(|l| l["client"] == "phone");
        Ok(knocked.is_some())
    })?;
    let knocked = knocked.context("no audit line for the phone's knock")?;
    ensure!(
        knocked["result"] == "accepted" && knocked.get("server_key").is_none(),
        "the phone's knock with the new key: {knocked}"
    );
    println!("$ gatekeeper knock --credential phone.credential.toml --proto tcp --port 22 --via udp");
    println!("  audit: \"phone\" accepted, sealed for the new key (the old one is accepted for an hour, then refused)");
    Ok(())
}

/// A service behind a NAT published through a tunnel, paused, resumed,
/// and stopped by its agent's operator.
fn tunnels() -> Result<()> {
    step(
        16,
        "A service behind a NAT (192.168.77.2:8080) published through a tunnel; paused and resumed by the gateway's operator",
    );
    let mut lab = Lab::with_nat()?;
    lab.serve_tcp_echo(Role::NatA, 8080)?;
    let cred = lab.enroll("laptop", &["--allow", "tcp/22"])?;
    let token = lab.state_cli(&["tunnel", "issue", "web", "--owner", "ops", "--allow", "laptop"])?;
    let token_file = lab.scratch().join("web.token");
    gatekeeper::private_file::write(&token_file, token.trim())?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    println!("$ gatekeeper tunnel issue web --owner ops --allow laptop > web.token");
    println!("$ gatekeeper agent --token-file web.token --forward 127.0.0.1:8080   (inside the private network)");
    let token_arg = token_file.to_str().context("utf-8 path")?;
    let agent = lab.spawn_gatekeeper(
        Role::NatA,
        &["agent", "--token-file", token_arg, "--forward", "127.0.0.1:8080"],
    )?;
    let connected = |lab: &Lab| -> Result<bool> {
        let list: serde_json::Value = serde_json::from_str(&lab.state_cli(&["tunnel", "list", "--json"])?)?;
        Ok(list[0]["connected"] == true)
    };
    ensure!(
        eventually(Duration::from_secs(20), || connected(&lab))?,
        "the agent never connected"
    );
    let public = SocketAddr::from((Role::Gateway.addr(), 20000));
    let sent = lab.udp_knock(Role::Client, &cred, 20000, None, &[])?;
    ensure!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let reach = |lab: &Lab| lab.tcp_echo_works(Role::Client, public, None);
    let first = eventually(Duration::from_secs(5), || reach(&lab))?;
    println!(
        "  after a knock, laptop -> 10.77.0.1:20000 -> the private service: {}",
        ok(first)
    );
    ensure!(first, "the published service did not answer");
    show(
        "gatekeeper tunnel pause web",
        &lab.state_cli(&["tunnel", "pause", "web"])?,
    );
    let paused = reach(&lab)?;
    println!(
        "  laptop -> 10.77.0.1:20000: {} (the agent stays connected: {})",
        ok(paused),
        connected(&lab)?
    );
    ensure!(!paused, "a paused tunnel answered");
    show(
        "gatekeeper tunnel resume web",
        &lab.state_cli(&["tunnel", "resume", "web"])?,
    );
    let resumed = eventually(Duration::from_secs(5), || reach(&lab))?;
    println!("  laptop -> 10.77.0.1:20000: {}", ok(resumed));
    ensure!(resumed, "the resumed tunnel did not answer");

    step(
        17,
        "The agent's operator stops it (SIGTERM): it says goodbye, the gateway audits it and closes the port",
    );
    lab.exec(Role::NatA, &["kill", "-TERM", &agent.id().to_string()])?;
    let ended = output_within(agent, Duration::from_secs(10))?;
    ensure!(ended.status.success(), "the agent did not stop cleanly");
    let mut line = None;
    eventually(Duration::from_secs(5), || {
        line = lab.audit()?.into_iter().rfind(|l| l["result"] == "stopped");
        Ok(line.is_some())
    })?;
    let line = line.context("no audit line for the stop")?;
    println!(
        "  audit: agent_session {} \"{}\"",
        line["result"],
        line["reason"].as_str().unwrap_or("")
    );
    Ok(())
}

/// Three gateways behind one address, sharing their state through Redis.
fn cluster() -> Result<()> {
    step(
        18,
        "A cluster: three gateways behind one address (a router spreads flows by ECMP), their clients, knocks and grants in Redis",
    );
    let mut lab = Lab::cluster(3)?;
    let redis = RedisServer::start(&lab, Role::Store)?;
    let url = redis.url();
    let (_nodes, cred) = start_nodes(&mut lab, &url, 3)?;
    println!("  redis-server at {url}; nodes gw-1, gw-2, gw-3 at 10.80.1-3.2, all answering for {SHARED_ADDR}");
    let rounds = 20u16;
    let mut got_in = 0;
    for i in 0..rounds {
        got_in += u16::from(knock_and_connect(&lab, &cred, 30000 + i, 22)?);
    }
    let verified: Vec<usize> = (1..=3)
        .map(|n| {
            lab.audit_of(Role::Node(n))
                .map(|a| a.iter().filter(|l| l["result"] == "accepted").count())
        })
        .collect::<Result<_>>()?;
    println!(
        "  {got_in} of {rounds} rounds of a UDP knock and a TCP connection (each a flow of its own) got in; knocks verified per node {verified:?}"
    );
    ensure!(
        got_in == rounds,
        "the cluster let the client in {got_in} of {rounds} times"
    );
    show(
        "gatekeeper whitelist list --all-nodes",
        &lab.state_cli_on(Role::Node(1), &["whitelist", "list", "--all-nodes", "--cluster", &url])?
            .lines()
            .filter(|l| l.contains(": ") && l.contains("entries"))
            .collect::<Vec<_>>()
            .join("\n"),
    );

    step(
        19,
        "Revoked from one node's CLI: every node confirms, and closes its entries",
    );
    show(
        "gatekeeper client revoke laptop --cluster ...",
        &lab.state_cli_on(Role::Node(3), &["client", "revoke", "laptop", "--cluster", &url])?,
    );
    let after = knock_and_connect(&lab, &cred, 31000, 22)?;
    println!("  the laptop knocks and connects again: {}", ok(after));
    ensure!(!after, "the revoked laptop got in");
    Ok(())
}

/// A web service published through Redis by an agent that reaches
/// nothing else.
fn relay() -> Result<()> {
    step(
        20,
        "A relay: an agent whose only route is to Redis publishes a web service, served by two gateways by its host name",
    );
    let relay = RelayLab::start(2, "")?;
    let mut agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    // The node holds the session once the agent's answer reaches it.
    eventually(Duration::from_secs(5), || {
        let listed: serde_json::Value = serde_json::from_str(&relay.cli(&["relay", "list", "--json"])?)?;
        Ok(listed[0]["connected"] == true)
    })?;
    show("gatekeeper relay list --cluster ...", &relay.cli(&["relay", "list"])?);
    let reach = relay
        .lab
        .tcp_connect(
            Role::Agent,
            (SHARED_ADDR, RELAY_PORT).into(),
            None,
            Duration::from_millis(500),
        )?
        .is_some();
    println!("  the agent's host reaches the gateways: {}", ok(reach));
    relay.knock()?;
    for n in [1u8, 2] {
        let out = curl(&relay.lab, Role::Node(n).addr().into(), HOST, "/", &[])?;
        println!(
            "  curl -H 'Host: {HOST}' http://{}:{RELAY_PORT}/  ->  {:?}",
            Role::Node(n).addr(),
            String::from_utf8_lossy(&out.stdout).replace('\n', " ")
        );
        ensure!(status_of(&out) == Some(200), "node {n} did not relay the request");
    }
    let out = relay.curl("other.lab.example", "/", &[])?;
    println!(
        "  another host name on the same port  ->  HTTP {}",
        status_of(&out).unwrap_or(0)
    );

    step(
        21,
        "The relay revoked: every node stops serving the host, and the agent is told",
    );
    show(
        "gatekeeper relay revoke web --cluster ...",
        &relay.cli(&["relay", "revoke", "web"])?,
    );
    let out = relay.curl(HOST, "/", &[])?;
    println!("  the same request again  ->  HTTP {}", status_of(&out).unwrap_or(0));
    agent.wait_exit(Duration::from_secs(10))?;
    let log = agent.log();
    println!("  the agent: {}", log.lines().last().unwrap_or("").trim());
    ensure!(status_of(&out) == Some(404), "the revoked host is still served");
    Ok(())
}

/// ssh between two devices, captured and carried under the SM suite.
fn channel() -> Result<()> {
    step(
        22,
        "Channels: alpha (10.77.0.2) runs plain `ssh 10.77.0.1`; it is captured and carried to beta under RFC 8998's SM suite",
    );
    let cl = ChannelLab::new()?;
    let beta = Role::Gateway.addr();
    let sshd = Sshd::start(&cl.lab, Role::Gateway)?;
    let inbound = inbound(
        "ssh",
        CHANNEL_PORT,
        "127.0.0.1:22",
        "sm",
        &["alpha"],
        "source = \"client\"\n",
    );
    let outbound = |name: &str, entry: &str, policy: &str| outbound(name, entry, "beta", CHANNEL_PORT, policy, "");
    let capture = format!("capture = \"{beta}:22/tcp\"");
    let alpha_toml = [
        outbound("ssh", &capture, "sm"),
        outbound("aes", "listen = \"127.0.0.1:6001\"", "tls13-aes"),
    ]
    .concat();
    show("beta: channels.toml", &inbound);
    show("alpha: channels.toml (first channel)", &outbound("ssh", &capture, "sm"));
    let _beta = cl.run(Role::Gateway, &inbound)?;
    let _alpha = cl.run(Role::Client, &alpha_toml)?;
    let lab = &cl.lab;
    let mut said = String::new();
    let suite = on_the_wire(
        lab,
        Role::Gateway,
        CHANNEL_PORT,
        "tls.handshake.type == 2",
        &["tls.handshake.ciphersuite"],
        || {
            let out = sshd.ssh(lab, Role::Client, &beta.to_string(), "echo via the channel")?;
            said = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
            Ok(())
        },
    )?;
    println!("  ssh root@{beta} 'echo via the channel'  ->  {said:?}");
    println!(
        "  tshark on beta's link: the ServerHello chose cipher suite {} (TLS_SM4_GCM_SM3)",
        suite.trim()
    );
    let accepted = sshd
        .log()
        .lines()
        .find(|l| l.contains("Accepted publickey"))
        .unwrap_or("")
        .trim()
        .to_string();
    println!("  beta's sshd (on 127.0.0.1): {accepted}");
    ensure!(
        said.contains("via the channel") && suite.trim() == "0x00c6",
        "the ssh channel did not work"
    );

    step(
        23,
        "A channel outside beta's policy (tls13-aes) and a device beta never paired are refused, and say what they offered",
    );
    cl.pair(Role::Intruder, Role::Gateway)?;
    let _mallory = cl.run(Role::Intruder, &outbound("sneak", "listen = \"127.0.0.1:6002\"", "sm"))?;
    let aes = lab.tcp_echo_works(Role::Client, "127.0.0.1:6001".parse()?, None)?;
    let sneak = lab.tcp_echo_works(Role::Intruder, "127.0.0.1:6002".parse()?, None)?;
    println!(
        "  alpha through its tls13-aes channel: {}; mallory through its unpinned one: {}",
        ok(aes),
        ok(sneak)
    );
    eventually(Duration::from_secs(5), || {
        Ok(cl.events(Role::Gateway, "channel_refused")?.len() >= 2)
    })?;
    for line in cl.events(Role::Gateway, "channel_refused")? {
        println!(
            "  beta audits: offered {} -> {}",
            line["offered"],
            line["detail"].as_str().unwrap_or("")
        );
    }
    ensure!(!aes && !sneak, "a refused channel got through");
    Ok(())
}
