//! One gate across several interfaces: two uplinks sharing one whitelist,
//! the ways around a gate on one interface (a second uplink, a VXLAN, a
//! VPN's tun device) named and closed, attaching and detaching
//! one interface on a running gate, and adopting a gate pinned before
//! gates could span several. Real daemon, real XDP, namespaces; needs root.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gatekeeper::gate::pins;
use gatekeeper_tests::{
    frames::{ACK, FrameSpec, SYN, tcp},
    lab::{GW_IFACE, GW_UPLINK2, Lab, ROAMING_ADDR, Role, SERVICE_ADDR, eventually, gw, tcp_request},
    nmap,
    tun::Tun,
};

const KNOCK_PORT: u16 = 62201;
/// The port the tunnel test protects.
const SSH_ALT: u16 = 2222;

fn service(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVICE_ADDR), port)
}

/// Initialises the gateway's state, so the daemon answers `status`.
fn init(lab: &Lab, public_addr: &str) -> Result<()> {
    lab.state_cli(&["init", "--public-addr", public_addr])?;
    Ok(())
}

/// The daemon's status, as `status --json` gives it.
fn status(lab: &Lab) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&lab.state_cli(&["status", "--json"])?)?)
}

/// The names under `key` (`interfaces`, as objects with a name; `uncovered`, as names).
fn names(status: &serde_json::Value, key: &str) -> Vec<String> {
    status[key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().or(v.as_str()).map(str::to_string))
        .collect()
}

/// How the program runs on `iface`, as `status --json` reports it.
fn attachment(status: &serde_json::Value, iface: &str) -> Result<String> {
    let entry = status["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == iface)
        .with_context(|| format!("no {iface} in {status}"))?;
    Ok(entry["attachment"].as_str().unwrap_or_default().to_string())
}

/// Whether the client reaches the echo service on the gateway's loopback
/// (over whichever uplink the routes say).
fn client_gets_in(lab: &Lab) -> Result<bool> {
    lab.tcp_echo_works(Role::Client, service(22), None)
}

/// A lab with a second uplink, echo services on tcp/22 and (unprotected)
/// tcp/23, and a state whose public address is the service address on the
/// gateway's loopback.
fn two_uplinks() -> Result<Lab> {
    let mut lab = Lab::new()?;
    lab.add_uplink()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    lab.serve_tcp_echo(Role::Gateway, 23)?;
    init(&lab, &SERVICE_ADDR.to_string())?;
    Ok(lab)
}

#[test]
fn a_knock_through_one_uplink_opens_the_client_on_both() -> Result<()> {
    let lab = two_uplinks()?;
    let cred = lab.enroll("laptop", &["--allow", "tcp/22"])?;
    let _daemon = lab.start_daemon(&["--iface", GW_UPLINK2, "--protect", "tcp/22"])?;
    for target in ["10.77.0.1", "10.78.0.1"] {
        let scan = nmap::scan(&lab, Role::Intruder, "-sS", "1-1024", target)?;
        ensure!(
            scan.answered_in(22, 22).is_empty(),
            "tcp/22 answered through {target}: {scan:?}"
        );
        ensure!(
            scan.open == [23],
            "the scan through {target} reached the gateway: {scan:?}"
        );
    }
    for uplink in [1, 2] {
        lab.route_via(uplink)?;
        ensure!(
            !client_gets_in(&lab)?,
            "closed through uplink {uplink} before the knock"
        );
    }

    // Knock through the second uplink, come in through the first.
    let knock = lab.with_knocker(Role::Client, &cred, |k, _| {
        Ok(k.build(SERVICE_ADDR.into(), &tcp_request(22), 0)?)
    })?;
    lab.send_udp(Role::Client, service(KNOCK_PORT), knock)?;
    ensure!(
        eventually(Duration::from_secs(3), || client_gets_in(&lab))?,
        "the knock through uplink 2 opens uplink 2: {:?}",
        lab.audit()?
    );
    lab.route_via(1)?;
    ensure!(
        client_gets_in(&lab)?,
        "the same entry lets the client in through uplink 1"
    );
    for target in [gw(22), "10.78.0.1:22".parse()?] {
        ensure!(
            !lab.tcp_echo_works(Role::Intruder, target, None)?,
            "the intruder still sees nothing at {target}"
        );
    }
    let list = lab.cli_ok(&["whitelist", "list", "--json"])?;
    ensure!(list.matches("\"address\"").count() == 1, "one entry: {list}");
    ensure!(list.contains(&format!("\"address\":\"{ROAMING_ADDR}\"")), "{list}");

    // Each interface counts its own packets; the total adds them up.
    let stats: serde_json::Value = serde_json::from_str(&lab.cli_ok(&["stats", "--json"])?)?;
    let per = |iface: &str, counter: &str| stats["interfaces"][iface][counter].as_u64().unwrap_or(0);
    ensure!(per(GW_UPLINK2, "knock_diverted") == 1, "{stats}");
    ensure!(per(GW_IFACE, "knock_diverted") == 0, "{stats}");
    for iface in [GW_IFACE, GW_UPLINK2] {
        ensure!(per(iface, "pass_whitelisted") > 0, "{iface} passed the client: {stats}");
        ensure!(
            per(iface, "drop_not_allowed") > 0,
            "{iface} dropped the probes: {stats}"
        );
    }
    let text = lab.cli_ok(&["stats"])?;
    ensure!(text.contains("total") && text.contains(GW_UPLINK2), "{text}");

    let status = status(&lab)?;
    ensure!(names(&status, "interfaces") == [GW_IFACE, GW_UPLINK2], "{status}");
    for iface in [GW_IFACE, GW_UPLINK2] {
        let how = attachment(&status, iface)?;
        ensure!(how == "native (driver)" || how == "generic (skb)", "{iface}: {status}");
    }
    ensure!(names(&status, "uncovered").is_empty(), "{status}");
    Ok(())
}

/// Whether a SYN handed to the gateway through the tun device (as a VPN
/// daemon would hand it a peer's packet) gets a SYN-ACK back.
fn syn_through_tun_answered(tun: &mut Tun, sport: u16) -> Result<bool> {
    let syn = FrameSpec::v4([10, 90, 0, 2], [10, 90, 0, 1], tcp(sport, SSH_ALT, SYN)).ip_packet();
    tun.send(&syn)?;
    let answer = tun.receive(Duration::from_secs(1), |p| {
        let ihl = usize::from(p.first().copied().unwrap_or(0) & 0x0f) * 4;
        p.len() >= ihl + 20
            && p[9] == 6
            && p[ihl..ihl + 4] == [(SSH_ALT >> 8) as u8, SSH_ALT as u8, (sport >> 8) as u8, sport as u8]
            && p[ihl + 13] & (SYN | ACK) == SYN | ACK
    })?;
    Ok(answer.is_some())
}

#[test]
fn tunnels_around_the_gate_are_named_and_closed_with_cover_all() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, SSH_ALT)?;
    let vxlan = SocketAddr::new(lab.vxlan_to_gateway(Role::Intruder)?, SSH_ALT);
    init(&lab, "10.77.0.1")?;
    let mut tun = Tun::create(&lab, Role::Gateway, "tun0", "10.90.0.1", "10.90.0.2")?;

    // Gated on the uplink only: the tunnels are ways around it, and the
    // daemon says so.
    let mut daemon = lab.start_daemon(&["--protect", "tcp/2222"])?;
    ensure!(
        !lab.tcp_echo_works(Role::Intruder, gw(SSH_ALT), None)?,
        "the uplink is gated"
    );
    ensure!(
        lab.tcp_echo_works(Role::Intruder, vxlan, None)?,
        "the lab's VXLAN works"
    );
    ensure!(syn_through_tun_answered(&mut tun, 40001)?, "the lab's tun device works");
    daemon.wait_for("vx0", Duration::from_secs(5))?;
    daemon.wait_for("tun0", Duration::from_secs(5))?;
    ensure!(daemon.log().contains("not gated"), "{}", daemon.log());
    let s = status(&lab)?;
    ensure!(names(&s, "uncovered") == ["tun0", "vx0"], "{s}");
    let text = lab.state_cli(&["status"])?;
    ensure!(
        text.contains("NOT GATED") && text.contains("gatekeeper attach vx0"),
        "{text}"
    );
    daemon.stop()?;

    // --cover all: every interface that receives traffic for the host is
    // gated, each read with its own framing (Ethernet, bare IP).
    let _daemon = lab.start_daemon(&["--protect", "tcp/2222", "--cover", "all"])?;
    ensure!(
        eventually(Duration::from_secs(5), || Ok(
            names(&status(&lab)?, "uncovered").is_empty()
        ))?,
        "nothing stays uncovered: {}",
        status(&lab)?
    );
    ensure!(!lab.tcp_echo_works(Role::Intruder, vxlan, None)?, "the VXLAN is gated");
    ensure!(!syn_through_tun_answered(&mut tun, 40002)?, "the tun device is gated");
    let s = status(&lab)?;
    ensure!(names(&s, "interfaces") == [GW_IFACE, "tun0", "vx0"], "{s}");
    let stats: serde_json::Value = serde_json::from_str(&lab.cli_ok(&["stats", "--json"])?)?;
    for iface in ["vx0", "tun0"] {
        ensure!(
            stats["interfaces"][iface]["drop_not_allowed"].as_u64() > Some(0),
            "{iface} drops the SYNs, parsed with its framing: {stats}"
        );
    }

    // An interface that appears later is gated as it comes up, and one
    // that goes away is let go.
    let covered = |name: &str| -> Result<bool> { Ok(names(&status(&lab)?, "interfaces").iter().any(|n| n == name)) };
    lab.exec(
        Role::Gateway,
        &[
            "ip", "link", "add", "vx1", "type", "vxlan", "id", "43", "dstport", "4790", "dev", GW_IFACE,
        ],
    )?;
    lab.exec(Role::Gateway, &["ip", "link", "set", "vx1", "up"])?;
    ensure!(
        eventually(Duration::from_secs(6), || covered("vx1"))?,
        "a new interface is gated: {}",
        status(&lab)?
    );
    lab.exec(Role::Gateway, &["ip", "link", "del", "vx1"])?;
    ensure!(
        eventually(Duration::from_secs(6), || Ok(!covered("vx1")?))?,
        "a vanished interface is let go: {}",
        status(&lab)?
    );
    ensure!(
        !pins::linked_ifaces(lab.pin_dir()).contains(&"vx1".into()),
        "its link pin is gone"
    );
    Ok(())
}

#[test]
fn attach_and_detach_one_interface_of_a_running_gate() -> Result<()> {
    let lab = two_uplinks()?;
    let mut daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    let roaming = format!("{ROAMING_ADDR}/tcp");
    // Names that are not there are refused, naming them.
    let out = lab.cli(&["attach", "nosuch0"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("\"nosuch0\"") && err.contains("ip link"),
        "{err}"
    );
    let out = lab.cli(&["detach", "--iface", "nosuch0"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("does not span nosuch0 (it spans gw0)"),
        "{err}"
    );
    ensure!(pins::has_links(lab.pin_dir()), "a refused detach leaves the gate");
    lab.route_via(2)?;
    ensure!(client_gets_in(&lab)?, "the ungated second uplink is a way in");
    ensure!(
        eventually(Duration::from_secs(5), || Ok(
            names(&status(&lab)?, "uncovered") == [GW_UPLINK2]
        ))?,
        "the daemon names the ungated uplink: {}",
        status(&lab)?
    );

    let out = lab.cli_ok(&["attach", GW_UPLINK2])?;
    ensure!(out.contains("attached"), "{out}");
    ensure!(!client_gets_in(&lab)?, "attached: the second uplink is gated");
    let s = status(&lab)?;
    ensure!(names(&s, "interfaces") == [GW_IFACE, GW_UPLINK2], "{s}");
    ensure!(names(&s, "uncovered").is_empty(), "{s}");
    ensure!(
        attachment(&s, GW_UPLINK2)?.contains("attached by `gatekeeper attach`"),
        "{s}"
    );
    lab.cli_ok(&["whitelist", "add", &roaming, "--ports", "22", "--ttl", "5m"])?;
    ensure!(client_gets_in(&lab)?, "an entry opens it");
    let again = lab.cli_ok(&["attach", GW_UPLINK2])?;
    ensure!(again.contains("already"), "{again}");

    // Detaching one interface leaves the others gated, with their entries.
    let out = lab.cli_ok(&["detach", "--iface", GW_UPLINK2])?;
    ensure!(out.contains("stays gated"), "{out}");
    lab.route_via(1)?;
    ensure!(client_gets_in(&lab)?, "the entry still holds on uplink 1");
    ensure!(
        !lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "uplink 1 stays gated"
    );
    ensure!(daemon.running(), "the daemon keeps serving the rest");
    ensure!(
        eventually(Duration::from_secs(5), || Ok(
            names(&status(&lab)?, "uncovered") == [GW_UPLINK2]
        ))?,
        "the detached uplink is reported again: {}",
        status(&lab)?
    );
    lab.cli_ok(&["whitelist", "del", &roaming])?;
    lab.route_via(2)?;
    ensure!(client_gets_in(&lab)?, "detached: open without an entry");

    // Detaching the last interface removes the gate.
    let out = lab.cli_ok(&["detach", "--iface", GW_IFACE])?;
    ensure!(out.contains("removed the gate"), "{out}");
    let exit = daemon.wait_exit(Duration::from_secs(10))?;
    ensure!(exit.success(), "the daemon exits when its gate is gone: {exit}");
    Ok(())
}

#[test]
fn a_gate_pinned_with_one_link_is_adopted_with_its_entries() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    init(&lab, "10.77.0.1")?;
    let mut daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    let client = format!("{}/tcp", Role::Client.addr());
    lab.cli_ok(&["whitelist", "add", &client, "--ports", "22", "--ttl", "5m"])?;
    daemon.stop()?;
    // What an earlier release left: one link named `link`, no interface map.
    let dir = lab.pin_dir();
    std::fs::rename(pins::link_path(dir, GW_IFACE), dir.join("link"))?;
    std::fs::remove_file(dir.join(gatekeeper_common::maps::IFACES))?;
    ensure!(
        !lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "still gated by the old link"
    );

    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    ensure!(!dir.join("link").exists(), "the old link is renamed");
    ensure!(pins::link_path(dir, GW_IFACE).exists(), "to the interface's");
    ensure!(lab.tcp_echo_works(Role::Client, gw(22), None)?, "the entry is kept");
    ensure!(!lab.tcp_echo_works(Role::Intruder, gw(22), None)?, "the gate holds");
    let s = status(&lab)?;
    ensure!(names(&s, "interfaces") == [GW_IFACE], "{s}");
    ensure!(
        attachment(&s, GW_IFACE)?.contains("native"),
        "the kernel runs the adopted link's program: {s}"
    );
    Ok(())
}
