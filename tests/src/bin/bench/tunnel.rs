//! `cargo xtask bench tunnel`: the tunnel against the direct path and
//! against rathole 0.5 (TCP and TLS transports), in one lab and one run:
//!
//! 1. iperf3 throughput through each (5 s each).
//! 2. New-connection latency, p50/p99 over 200 connections: connect, send
//!    one byte, read its echo.
//! 3. Resident memory of the gateway side with 100 idle tunnels.
//!
//! The private host is the lab's third namespace; the client reaches it
//! directly for the baseline, and through the gateway otherwise.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use gatekeeper_tests::lab::{ChildGuard, Daemon, Lab, Role, eventually, gatekeeper_bin, rss_kib, sh};

use crate::Row;

const ECHO: u16 = 7000;
const IPERF: u16 = 5201;
const SAMPLES: usize = 200;
const IDLE_TUNNELS: usize = 100;

pub(crate) fn spawn_in(lab: &Lab, role: Role, args: &[&str]) -> Result<ChildGuard> {
    Ok(ChildGuard::new(
        Command::new("ip")
            .args(["netns", "exec", &lab.ns(role)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args[0]))?,
    ))
}

fn gw(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Role::Gateway.addr()), port)
}

/// iperf3 from the client to `to` for 5 s; Gbit/s.
pub(crate) fn iperf(lab: &Lab, to: SocketAddr) -> Result<f64> {
    let out = lab.exec(
        Role::Client,
        &[
            "iperf3",
            "-c",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-t",
            "5",
            "-J",
        ],
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 reported no throughput")
}

/// p50 and p99, in ms, of connect + one echoed byte.
pub(crate) fn connect_latency(lab: &Lab, to: SocketAddr) -> Result<(f64, f64)> {
    let mut samples = lab.in_ns(Role::Client, move || -> Result<Vec<Duration>> {
        (0..SAMPLES)
            .map(|_| {
                let start = Instant::now();
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                Ok(start.elapsed())
            })
            .collect()
    })??;
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    Ok((at(0.5), at(0.99)))
}

/// Waits until a TCP connection to `to` comes up (any service).
fn wait_open_any(lab: &Lab, to: SocketAddr) -> Result<()> {
    let up = eventually(Duration::from_secs(30), || {
        Ok(lab
            .tcp_connect(Role::Client, to, None, Duration::from_millis(500))?
            .is_some())
    })?;
    if !up {
        bail!("{to} never accepted a connection");
    }
    Ok(())
}

pub(crate) fn wait_open(lab: &Lab, to: SocketAddr) -> Result<()> {
    let open = eventually(Duration::from_secs(30), || lab.tcp_echo_works(Role::Client, to, None))?;
    if !open {
        let audit = lab.audit()?;
        bail!(
            "{to} never came up; last audit lines: {:?}",
            &audit[audit.len().saturating_sub(4)..]
        );
    }
    Ok(())
}

struct Measured {
    gbps: f64,
    p50: f64,
    p99: f64,
}

/// Measures both; `before(port)` runs before each part (a knock, for the
/// gatekeeper path: one entry per client tuple holds one port range).
fn measure(
    lab: &Lab,
    iperf_at: SocketAddr,
    echo_at: SocketAddr,
    before: impl Fn(u16) -> Result<()>,
) -> Result<Measured> {
    before(iperf_at.port())?;
    let gbps = iperf(lab, iperf_at)?;
    before(echo_at.port())?;
    wait_open(lab, echo_at)?;
    let (p50, p99) = connect_latency(lab, echo_at)?;
    Ok(Measured { gbps, p50, p99 })
}

/// Issues `name` forwarding to `port` on the private host and starts its agent.
fn publish(lab: &Lab, name: &str, port: u16) -> Result<(ChildGuard, u16)> {
    let token = lab.state_cli(&["tunnel", "issue", name, "--owner", "bench", "--allow", "bench"])?;
    let file = lab.scratch().join(format!("{name}.token"));
    gatekeeper::private_file::write(&file, token.trim())?;
    let json: serde_json::Value = serde_json::from_str(&lab.state_cli(&["tunnel", "list", "--json"])?)?;
    let public = json
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == name))
        .and_then(|t| t["port"].as_u64())
        .context("issued tunnel")? as u16;
    let bin = gatekeeper_bin()?;
    let agent = spawn_in(
        lab,
        Role::Intruder,
        &[
            bin.to_str().context("utf-8")?,
            "agent",
            "--token-file",
            file.to_str().context("utf-8")?,
            "--forward",
            &format!("127.0.0.1:{port}"),
        ],
    )?;
    Ok((agent, public))
}

fn connected_tunnels(lab: &Lab) -> Result<usize> {
    let json: serde_json::Value = serde_json::from_str(&lab.state_cli(&["tunnel", "list", "--json"])?)?;
    Ok(json
        .as_array()
        .map(|a| a.iter().filter(|t| t["connected"] == true).count())
        .unwrap_or(0))
}

fn gatekeeper_side(lab: &mut Lab) -> Result<(Measured, u64, Daemon)> {
    lab.enroll("bench", &["--allow", "tcp/22"])?;
    let config = lab.scratch().join("bench.toml");
    std::fs::write(
        &config,
        "[knock]\nopen_for = \"10m\"\nrate = 1000\nburst = 1000\nkey_rate = 1000\nkey_burst = 1000\n",
    )?;
    let daemon = lab.start_daemon(&["--protect", "tcp/22", "--config", config.to_str().context("utf-8")?])?;
    let (_echo_agent, echo_port) = publish(lab, "echo", ECHO)?;
    let (_iperf_agent, iperf_port) = publish(lab, "iperf", IPERF)?;
    if !eventually(Duration::from_secs(30), || Ok(connected_tunnels(lab)? == 2))? {
        bail!("the agents did not connect");
    }
    let cred = lab.scratch().join("bench.credential.toml");
    let bin = gatekeeper_bin()?;
    let knock = |port: u16| -> Result<()> {
        let args = [
            bin.to_str().context("utf-8")?,
            "knock",
            "--credential",
            cred.to_str().context("utf-8")?,
            "--proto",
            "tcp",
            "--port",
            &port.to_string(),
            "--via",
            "udp",
        ];
        lab.exec(Role::Client, &args)?;
        wait_open_any(lab, gw(port))
    };
    let m = measure(lab, gw(iperf_port), gw(echo_port), knock)?;

    // 100 idle tunnels, each with its agent connected.
    let pid = daemon.pid().context("daemon pid")?;
    let mut agents = Vec::new();
    for i in 0..IDLE_TUNNELS {
        agents.push(publish(lab, &format!("idle{i}"), ECHO)?.0);
    }
    if !eventually(Duration::from_secs(120), || {
        Ok(connected_tunnels(lab)? == IDLE_TUNNELS + 2)
    })? {
        bail!(
            "only {} of {} idle tunnels connected",
            connected_tunnels(lab)?,
            IDLE_TUNNELS + 2
        );
    }
    let rss = rss_kib(pid)?;
    Ok((m, rss, daemon))
}

/// Self-signed CA and a server identity for rathole's TLS transport.
fn rathole_certs(dir: &Path) -> Result<()> {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    sh(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=bench-ca",
    ])?;
    sh(&[
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &p("srv.key"),
        "-out",
        &p("srv.csr"),
        "-subj",
        "/CN=gateway",
    ])?;
    std::fs::write(dir.join("ext"), "subjectAltName=DNS:gateway\n")?;
    sh(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        &p("srv.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("srv.pem"),
        "-days",
        "2",
        "-extfile",
        &p("ext"),
    ])?;
    sh(&[
        "openssl",
        "pkcs12",
        "-export",
        "-out",
        &p("identity.pfx"),
        "-inkey",
        &p("srv.key"),
        "-in",
        &p("srv.pem"),
        "-passout",
        "pass:bench",
    ])?;
    Ok(())
}

/// rathole server (gateway) and client (private host) with `services`
/// services; service i is published on 21000 + i and forwards to `local(i)`.
fn rathole(lab: &Lab, tls: bool, services: usize, local: impl Fn(usize) -> u16) -> Result<(ChildGuard, ChildGuard)> {
    let dir = lab.scratch().join(if tls { "rathole-tls" } else { "rathole-tcp" });
    std::fs::create_dir_all(&dir)?;
    if tls {
        rathole_certs(&dir)?;
    }
    let transport = if tls { "tls" } else { "tcp" };
    let mut server = format!("[server]\nbind_addr = \"0.0.0.0:2333\"\n[server.transport]\ntype = \"{transport}\"\n");
    let mut client =
        format!("[client]\nremote_addr = \"10.77.0.1:2333\"\n[client.transport]\ntype = \"{transport}\"\n");
    if tls {
        server += &format!(
            "[server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n",
            dir.join("identity.pfx").display()
        );
        client += &format!(
            "[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"gateway\"\n",
            dir.join("ca.pem").display()
        );
    }
    for i in 0..services {
        server += &format!(
            "[server.services.s{i}]\ntoken = \"bench{i}\"\nbind_addr = \"0.0.0.0:{}\"\n",
            21000 + i
        );
        client += &format!(
            "[client.services.s{i}]\ntoken = \"bench{i}\"\nlocal_addr = \"127.0.0.1:{}\"\n",
            local(i)
        );
    }
    std::fs::write(dir.join("server.toml"), server)?;
    std::fs::write(dir.join("client.toml"), client)?;
    let s = spawn_in(
        lab,
        Role::Gateway,
        &["rathole", "-s", &dir.join("server.toml").to_string_lossy()],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let c = spawn_in(
        lab,
        Role::Intruder,
        &["rathole", "-c", &dir.join("client.toml").to_string_lossy()],
    )?;
    Ok((s, c))
}

pub fn run(rows: &mut Vec<Row>) -> Result<()> {
    println!("[1/3] direct, gatekeeper tunnel, rathole tcp and tls: iperf3 5 s and {SAMPLES} new connections each");
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Intruder, ECHO)?;
    let _iperf = spawn_in(&lab, Role::Intruder, &["iperf3", "-s", "-p", &IPERF.to_string()])?;
    let private = |port| SocketAddr::new(IpAddr::V4(Role::Intruder.addr()), port);
    let direct = measure(&lab, private(IPERF), private(ECHO), |_| Ok(()))?;
    let (ours, ours_rss, daemon) = gatekeeper_side(&mut lab)?;
    drop(daemon);
    lab.cli_ok(&["detach"])?;

    let mut rathole_results = Vec::new();
    for tls in [false, true] {
        let (server, client) = rathole(&lab, tls, 2, |i| if i == 0 { ECHO } else { IPERF })?;
        let m = measure(&lab, gw(21001), gw(21000), |port| wait_open_any(&lab, gw(port)))?;
        drop((client, server));
        rathole_results.push((if tls { "rathole tls" } else { "rathole tcp" }, m));
    }
    println!("[2/3] {IDLE_TUNNELS} idle tunnels: gatekeeper's daemon measured above, now rathole's server");
    let (server, client) = rathole(&lab, true, IDLE_TUNNELS, |_| ECHO)?;
    std::thread::sleep(Duration::from_secs(3));
    let rathole_rss = rss_kib(server.id().context("rathole pid")?)?;
    drop((client, server));

    for (name, m) in std::iter::once(("direct", &direct))
        .chain(std::iter::once(("gatekeeper (tls)", &ours)))
        .chain(rathole_results.iter().map(|(n, m)| (*n, m)))
    {
        println!(
            "      {name}: {:.2} Gbit/s, new connection p50 {:.3} ms p99 {:.3} ms",
            m.gbps, m.p50, m.p99
        );
    }
    println!(
        "      gateway RSS with {IDLE_TUNNELS} idle tunnels: gatekeeper {ours_rss} KiB, rathole server {rathole_rss} KiB"
    );
    let rathole_tcp = &rathole_results[0].1;
    let rathole_tls = &rathole_results[1].1;
    rows.push(Row {
        what: "iperf3, direct".into(),
        value: direct.gbps,
        unit: "Gbit/s",
        ratio: None,
    });
    rows.push(Row {
        what: "iperf3, gatekeeper tunnel vs direct".into(),
        value: ours.gbps,
        unit: "Gbit/s",
        ratio: Some((ours.gbps / direct.gbps, ">=", 0.5)),
    });
    rows.push(Row {
        what: "iperf3, rathole tcp".into(),
        value: rathole_tcp.gbps,
        unit: "Gbit/s",
        ratio: None,
    });
    rows.push(Row {
        what: "iperf3, rathole tls".into(),
        value: rathole_tls.gbps,
        unit: "Gbit/s",
        ratio: None,
    });
    rows.push(Row {
        what: "iperf3, gatekeeper tunnel vs rathole tls".into(),
        value: ours.gbps,
        unit: "Gbit/s",
        ratio: Some((ours.gbps / rathole_tls.gbps, ">=", 1.0)),
    });
    rows.push(Row {
        what: "new connection p50, direct".into(),
        value: direct.p50,
        unit: "ms",
        ratio: None,
    });
    rows.push(Row {
        what: "new connection p50, gatekeeper vs rathole tcp".into(),
        value: ours.p50,
        unit: "ms",
        ratio: Some((ours.p50 / rathole_tcp.p50, "<=", 1.0)),
    });
    rows.push(Row {
        what: "new connection p99, gatekeeper vs rathole tcp".into(),
        value: ours.p99,
        unit: "ms",
        ratio: Some((ours.p99 / rathole_tcp.p99, "<=", 1.0)),
    });
    rows.push(Row {
        what: "new connection p50, gatekeeper vs rathole tls".into(),
        value: ours.p50,
        unit: "ms",
        ratio: Some((ours.p50 / rathole_tls.p50, "<=", 1.0)),
    });
    rows.push(Row {
        what: format!("gateway memory, {IDLE_TUNNELS} idle tunnels vs 20 MB"),
        value: ours_rss as f64,
        unit: "KiB",
        ratio: Some((ours_rss as f64 / 20480.0, "<=", 1.0)),
    });
    rows.push(Row {
        what: format!("gateway memory, {IDLE_TUNNELS} idle: gatekeeper vs rathole"),
        value: ours_rss as f64,
        unit: "KiB",
        ratio: Some((ours_rss as f64 / rathole_rss as f64, "<=", 1.0)),
    });
    Ok(())
}
