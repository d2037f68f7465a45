//! `cargo xtask demo`: the gate in a lab of network namespaces, step by step.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, ensure};
use gatekeeper_tests::{
    lab::{Lab, Role},
    nmap,
};

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
    format!(
        "open: {:?}; closed: {}; everything else silent (filtered)",
        scan.open,
        if scan.closed.is_empty() {
            "none".to_string()
        } else {
            format!("{} ports", scan.closed.len())
        }
    )
}

fn main() -> Result<()> {
    let gw = Role::Gateway.addr();
    let ssh = SocketAddr::from((gw, 22));
    let web = SocketAddr::from((gw, 8080));

    step(
        1,
        "Building a lab: gateway 10.77.0.1 (ssh on 22, web on 8080, public page on 9090), client 10.77.0.2, intruder 10.77.0.3",
    );
    let mut lab = Lab::new()?;
    for port in [22, 8080, 9090] {
        lab.serve_tcp_echo(Role::Gateway, port)?;
    }

    step(
        2,
        "Starting the gate on the gateway's NIC, protecting ssh and the web ports",
    );
    let protect = "tcp/22,tcp/8000-8100";
    println!("$ gatekeeper run --iface gw0 --protect {protect}");
    let daemon = lab.start_daemon(&["--protect", protect])?;
    println!(
        "  {}",
        daemon
            .log()
            .lines()
            .find(|l| l.contains("gate up"))
            .unwrap_or("gate up")
    );

    step(3, "The intruder scans every TCP port with nmap");
    let scan = nmap::scan(&lab, Role::Intruder, "-sS", "1-65535", &gw.to_string())?;
    show("nmap -sS -p- 10.77.0.1   (from the intruder)", &describe(&scan));
    ensure!(
        scan.answered_in(22, 22).is_empty() && scan.answered_in(8000, 8100).is_empty(),
        "a protected port answered: {scan:?}"
    );
    println!("  -> ssh and web are invisible; only the unprotected 9090 shows");

    step(4, "The client tries ssh before anyone let it in");
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
        5,
        "An operator lets the client's address in to ssh and web for 10 minutes",
    );
    let cmd = ["whitelist", "add", "10.77.0.2/tcp", "--ports", "22", "--ttl", "10m"];
    show(&format!("gatekeeper {}", cmd.join(" ")), &lab.cli_ok(&cmd)?);
    let cmd = [
        "whitelist",
        "add",
        "10.77.0.2/tcp",
        "--ports",
        "8000-8100",
        "--ttl",
        "10m",
    ];
    show(&format!("gatekeeper {}", cmd.join(" ")), &lab.cli_ok(&cmd)?);

    step(6, "The client connects; the intruder still sees nothing");
    let ssh_ok = lab.tcp_echo_works(Role::Client, ssh, None)?;
    let web_ok = lab.tcp_echo_works(Role::Client, web, None)?;
    println!("  client -> 10.77.0.1:22 {}; -> :8080 {}", ok(ssh_ok), ok(web_ok));
    ensure!(ssh_ok || web_ok, "the whitelisted client could not connect");
    let again = nmap::scan(&lab, Role::Intruder, "-sS", "22,8000-8100", &gw.to_string())?;
    show(
        "nmap -sS -p 22,8000-8100 10.77.0.1   (from the intruder)",
        &describe(&again),
    );
    ensure!(
        again.open.is_empty() && again.closed.is_empty(),
        "the intruder saw a protected port: {again:?}"
    );

    step(7, "What the gate holds and what it did");
    show("gatekeeper whitelist list", &lab.cli_ok(&["whitelist", "list"])?);
    show("gatekeeper stats", &lab.cli_ok(&["stats"])?);

    step(8, "Cleaning up: stopping the daemon, detaching, removing the lab");
    drop(daemon);
    show("gatekeeper detach", &lab.cli_ok(&["detach"])?);
    drop(lab);
    std::thread::sleep(Duration::from_millis(100));
    println!("\ndone: the gate hid ssh and web from a full scan and let one client into ssh alone.");
    Ok(())
}

fn ok(b: bool) -> &'static str {
    if b { "connected, echo ok" } else { "no answer" }
}
