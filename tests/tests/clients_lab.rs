//! The client-only builds end to end (`cargo xtask clients` makes them):
//! the Linux one knocks, connects and publishes a service through a real
//! daemon, and the Windows one, run by Wine on the client host, enrolls
//! itself, knocks over UDP and reaches an upstream through the portal.
//! Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gatekeeper_tests::{
    clients::{LINUX, Wine, client_bin},
    lab::{ChildGuard, Lab, Role, eventually, gatekeeper_bin, gw, output_within},
};

const PORTAL: &str = "10.77.0.1:443";
const LIMIT: Duration = Duration::from_secs(30);

/// `program ARGS` run on a lab host with `input` on its stdin; what it
/// printed, failing with its stderr unless it succeeded.
fn run_on(lab: &Lab, role: Role, program: &Path, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut child = lab.spawn_program(role, program, args)?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, input)?;
    let out = output_within(child, LIMIT)?;
    ensure!(
        out.status.success(),
        "{} {} failed: {}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Whether `binary` holds an eBPF object: an ELF header whose machine is
/// BPF (247), past the binary's own.
fn embeds_bpf_object(binary: &[u8]) -> bool {
    binary
        .windows(20)
        .skip(1)
        .any(|w| w.starts_with(b"\x7fELF") && w[18..20] == 247u16.to_le_bytes())
}

/// The knock lines of the gateway's audit log.
fn knocks(lab: &Lab) -> Result<Vec<serde_json::Value>> {
    Ok(lab.audit()?.into_iter().filter(|l| l["event"] == "knock").collect())
}

#[test]
fn the_linux_client_build_knocks_connects_and_publishes() -> Result<()> {
    let bin = client_bin(LINUX, "gatekeeper")?;
    // The client build: the device's commands, none of the gateway's, and
    // no XDP program in it.
    let help = String::from_utf8(Command::new(&bin).arg("--help").output()?.stdout)?;
    for command in ["knock", "connect", "portal", "agent", "keygen", "client"] {
        assert!(help.contains(&format!("\n  {command} ")), "{command} missing: {help}");
    }
    for command in ["run", "whitelist", "tunnel", "relay", "channel"] {
        assert!(!help.contains(&format!("\n  {command} ")), "{command} present: {help}");
    }
    let run = Command::new(&bin).args(["run", "--iface", "lo"]).output()?;
    assert!(
        !run.status.success() && String::from_utf8_lossy(&run.stderr).contains("unrecognized subcommand 'run'"),
        "{run:?}"
    );
    assert!(
        !embeds_bpf_object(&std::fs::read(&bin)?),
        "the client build embeds the XDP program"
    );
    assert!(
        embeds_bpf_object(&std::fs::read(gatekeeper_bin()?)?),
        "the gateway build embeds it (so the check above can see one)"
    );
    // Built by a stable rustc (a nightly names itself "-nightly" here).
    let comment = Command::new("readelf").args(["-p", ".comment"]).arg(&bin).output()?;
    let comment = String::from_utf8_lossy(&comment.stdout);
    assert!(
        comment.contains("rustc version 1.") && !comment.contains("nightly"),
        "{comment}"
    );

    let mut lab = Lab::with_nat()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    lab.serve_tcp_echo(Role::NatA, 8080)?;
    let cred = lab.enroll("laptop", &["--allow", "tcp/22"])?;
    let cred = cred.to_str().context("utf-8 path")?;
    let token = lab.state_cli(&["tunnel", "issue", "web", "--owner", "ops", "--allow", "laptop"])?;
    let token_file = lab.scratch().join("web.token");
    gatekeeper::private_file::write(&token_file, token.trim())?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;

    // The agent, in the private network, publishes its echo service.
    let token_file = token_file.to_str().context("utf-8 path")?;
    let _agent = ChildGuard::new(lab.spawn_program(
        Role::NatA,
        &bin,
        &["agent", "--token-file", token_file, "--forward", "127.0.0.1:8080"],
    )?);
    let tunnel = || -> Result<serde_json::Value> {
        let list: serde_json::Value = serde_json::from_str(&lab.state_cli(&["tunnel", "list", "--json"])?)?;
        Ok(list[0].clone())
    };
    ensure!(
        eventually(LIMIT, || Ok(tunnel()?["connected"] == true))?,
        "the agent never connected: {}",
        tunnel()?
    );
    let public = SocketAddr::new(
        IpAddr::V4(Role::Gateway.addr()),
        tunnel()?["port"].as_u64().context("no port")? as u16,
    );

    // The client knocks with a SYN and connects, to the gateway's own
    // service and to the published one.
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "closed before the knock"
    );
    for (target, msg) in [(gw(22), "to the gateway\n"), (public, "to the private network\n")] {
        let target = target.to_string();
        let echoed = run_on(
            &lab,
            Role::Client,
            &bin,
            &["connect", "--credential", cred, &target],
            msg.as_bytes(),
        )?;
        assert_eq!(String::from_utf8_lossy(&echoed), msg, "through {target}");
    }
    let accepted: Vec<_> = knocks(&lab)?
        .into_iter()
        .filter(|l| l["result"] == "accepted" && l["client"] == "laptop")
        .collect();
    assert!(accepted.len() >= 2, "{accepted:?}");
    assert!(
        accepted.iter().all(|l| l["request"]["platform"] == "linux"),
        "{accepted:?}"
    );
    Ok(())
}

#[test]
fn the_windows_client_enrolls_knocks_and_reaches_the_portal_under_wine() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    lab.serve_tcp_echo(Role::Gateway, 9000)?;
    // `init` through a first enrollment; the Windows device enrolls below.
    lab.enroll("linux-laptop", &["--allow", "tcp/22"])?;
    let mut daemon = lab.start_daemon(&[
        "--protect",
        "tcp/22",
        "--portal",
        PORTAL,
        "--portal-upstream",
        "127.0.0.1:9000",
    ])?;
    daemon.wait_for("portal listening", LIMIT)?;
    let wine = Wine::new(&lab, Role::Client)?;

    // Enrollment the device's way: its own key, a request line approved
    // on the gateway, the credential line installed.
    let made = wine.ok(&["keygen", "--out", "win.key"])?;
    assert!(made.contains("public key:"), "{made}");
    let request: serde_json::Value = serde_json::from_str(&wine.ok(&[
        "client",
        "request",
        "--key",
        "win.key",
        "--gateway",
        &Role::Gateway.addr().to_string(),
        "--name",
        "winlaptop",
        "--json",
    ])?)?;
    let line = request["request"].as_str().context("no request line")?;
    let approved: serde_json::Value = serde_json::from_str(&lab.state_cli(&[
        "client",
        "approve",
        line,
        "--allow",
        "tcp/22,tcp/443",
        "--fingerprint",
        request["fingerprint"].as_str().context("no fingerprint")?,
        "--json",
    ])?)?;
    assert_eq!(approved["platform"], "windows", "{approved}");
    let credential = approved["credential"].as_str().context("no credential line")?;
    wine.ok(&[
        "client",
        "install",
        credential,
        "--key",
        "win.key",
        "--out",
        "win.credential.toml",
    ])?;
    let secret = std::fs::read_to_string(wine.dir().join("win.key"))?;
    assert!(
        !std::fs::read_to_string(lab.state_dir().join("clients/winlaptop.toml"))
            .unwrap_or_default()
            .contains(
                secret
                    .lines()
                    .find_map(|l| l.strip_prefix("secret_key = "))
                    .context("no secret in the key file")?
            ),
        "the device's secret never reaches the gateway"
    );

    // Windows sends no hand-made TCP: a SYN knock is refused with the way
    // out, and nothing reaches the gateway.
    let before = knocks(&lab)?.len();
    let knock_22 = [
        "knock",
        "--credential",
        "win.credential.toml",
        "--proto",
        "tcp",
        "--port",
        "22",
    ];
    let syn = wine.run(&knock_22, b"", LIMIT)?;
    let said = String::from_utf8_lossy(&syn.stderr);
    assert!(!syn.status.success() && said.contains("--via udp"), "{said}");

    // A UDP knock opens the port to this host, and to nobody else.
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "closed before the knock"
    );
    wine.ok(&[&knock_22[..], &["--via", "udp"]].concat())?;
    assert!(
        eventually(Duration::from_secs(5), || lab.tcp_echo_works(
            Role::Client,
            gw(22),
            None
        ))?,
        "the Windows client's knock did not open tcp/22: {:?}",
        knocks(&lab)?
    );
    assert!(
        !lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "the intruder still sees nothing"
    );
    let lines = knocks(&lab)?;
    assert_eq!(lines.len(), before + 1, "the SYN attempt sent nothing: {lines:?}");
    let last = lines.last().context("no knock line")?;
    assert_eq!(last["result"], "accepted", "{last}");
    assert_eq!(last["client"], "winlaptop", "{last}");
    assert_eq!(last["request"]["platform"], "windows", "{last}");

    // The device's own record of that knock joins the gateway's.
    let journal = wine.dir().join("win.credential.knocks.jsonl");
    let merged = lab.state_cli(&["audit", "merge", journal.to_str().context("utf-8 path")?, "--json"])?;
    let sent = merged
        .lines()
        .map(serde_json::from_str::<serde_json::Value>)
        .collect::<Result<Vec<_>, _>>()?;
    assert!(
        sent.iter()
            .any(|m| m["sent"]["outcome"] == "sent" && m["gateway"][0]["result"] == "accepted"),
        "{merged}"
    );

    // One session through the portal, over stdin and stdout, reaches the upstream.
    let msg = b"through the portal from Windows\n";
    let out = wine.run(
        &["connect", "--portal", "--credential", "win.credential.toml", PORTAL],
        msg,
        LIMIT,
    )?;
    assert_eq!(
        out.stdout,
        msg,
        "connect --portal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let portal = lab
        .audit()?
        .into_iter()
        .rfind(|l| l["event"] == "portal")
        .context("no portal line")?;
    assert_eq!(portal["decision"], "upstream", "{portal}");
    assert_eq!(portal["client"], "winlaptop", "{portal}");
    Ok(())
}
