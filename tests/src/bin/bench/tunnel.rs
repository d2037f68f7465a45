//! `cargo xtask bench tunnel`: the tunnel against the direct path and
//! against rathole 0.5 (TCP and TLS transports), in one lab and one run,
//! all four side by side and measured in turn, three rounds, medians kept:
//!
//! 1. iperf3 throughput through each (5 s each).
//! 2. New-connection latency, p50/p99 over 200 connections: connect, send
//!    one byte, read its echo.
//! 3. Memory of the gateway side with 100 idle tunnels: resident, and the
//!    anonymous part (heap and stacks, without the program's file pages and
//!    the gate's BPF maps, which the kernel holds whoever maps them).
//!
//! The gate stays attached while all four are measured: on veth, XDP makes
//! the kernel copy every cloned TCP packet, a cost every path through the
//! gateway then pays alike. rathole is measured once more with no gate, as
//! its users run it today.
//!
//! With `GATEKEEPER_BENCH_PERF=FILE`, a system-wide `perf record -e cpu-clock
//! -g` of 3 s of the tunnel's first iperf3 run is written to FILE.
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
use gatekeeper_tests::lab::{ChildGuard, Daemon, Lab, Role, anon_rss_kib, eventually, gatekeeper_bin, rss_kib, sh};

use crate::Row;

const ECHO: u16 = 7000;
const IPERF: u16 = 5201;
const SAMPLES: usize = 200;
const IDLE_TUNNELS: usize = 100;
const ROUNDS: usize = 3;

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

/// iperf3 from the client to `to` for 5 s; Gbit/s. A server that has
/// just started (or is still closing the previous test) refuses the first
/// attempt, so up to five are made, a second apart.
pub(crate) fn iperf(lab: &Lab, to: SocketAddr) -> Result<f64> {
    let mut why = String::new();
    for _ in 0..5 {
        // Not `lab.exec`: a refused attempt exits non-zero, and is retried.
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.ns(Role::Client), "iperf3", "-J", "-t", "5", "-c"])
            .args([to.ip().to_string(), "-p".into(), to.port().to_string()])
            .stdin(Stdio::null())
            .output()
            .context("running iperf3")?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
            return Ok(bps / 1e9);
        }
        why = json["error"]
            .as_str()
            .unwrap_or("no throughput in its report")
            .to_string();
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!("iperf3 to {to} failed five times; last: {why}")
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

#[derive(Clone)]
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

/// Issues `name` forwarding to `port` on the private host and starts its
/// agent, its output in `agent-NAME.log` in the lab's scratch directory.
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
    let log = std::fs::File::create(lab.scratch().join(format!("agent-{name}.log")))?;
    let agent = Command::new("ip")
        .args(["netns", "exec", &lab.ns(Role::Intruder)])
        .arg(bin)
        .args(["agent", "--token-file"])
        .arg(&file)
        .args(["--forward", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting an agent")?;
    Ok((ChildGuard::new(agent), public))
}

/// The tunnels whose agents are not connected, each with its agent's last
/// words.
fn unconnected(lab: &Lab) -> Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_str(&lab.state_cli(&["tunnel", "list", "--json"])?)?;
    Ok(json
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["connected"] != true)
        .map(|t| {
            let name = t["name"].as_str().unwrap_or("?");
            let log = std::fs::read_to_string(lab.scratch().join(format!("agent-{name}.log"))).unwrap_or_default();
            format!("{name}: {}", log.lines().last().unwrap_or("(agent said nothing)"))
        })
        .collect())
}

fn connected_tunnels(lab: &Lab) -> Result<usize> {
    let json: serde_json::Value = serde_json::from_str(&lab.state_cli(&["tunnel", "list", "--json"])?)?;
    Ok(json
        .as_array()
        .map(|a| a.iter().filter(|t| t["connected"] == true).count())
        .unwrap_or(0))
}

/// The gatekeeper side: the daemon with its gate attached, and two agents
/// publishing the private host's echo and iperf3 servers.
struct Gatekeeper {
    daemon: Daemon,
    _agents: [ChildGuard; 2],
    echo: SocketAddr,
    iperf: SocketAddr,
}

impl Gatekeeper {
    fn start(lab: &mut Lab) -> Result<Gatekeeper> {
        lab.enroll("bench", &["--allow", "tcp/22"])?;
        let config = lab.scratch().join("bench.toml");
        std::fs::write(
            &config,
            "[knock]\nopen_for = \"10m\"\nrate = 1000\nburst = 1000\nkey_rate = 1000\nkey_burst = 1000\n",
        )?;
        let daemon = lab.start_daemon(&["--protect", "tcp/22", "--config", config.to_str().context("utf-8")?])?;
        let (echo_agent, echo_port) = publish(lab, "echo", ECHO)?;
        let (iperf_agent, iperf_port) = publish(lab, "iperf", IPERF)?;
        if !eventually(Duration::from_secs(30), || Ok(connected_tunnels(lab)? == 2))? {
            bail!("the agents did not connect");
        }
        Ok(Gatekeeper {
            daemon,
            _agents: [echo_agent, iperf_agent],
            echo: gw(echo_port),
            iperf: gw(iperf_port),
        })
    }

    /// Knocks for `port` from the client, then waits until it answers.
    fn knock(lab: &Lab, port: u16) -> Result<()> {
        let cred = lab.scratch().join("bench.credential.toml");
        let bin = gatekeeper_bin()?;
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
    }

    /// The daemon's resident memory, whole and anonymous, once
    /// `IDLE_TUNNELS` more agents are connected and idle.
    fn idle_rss(&self, lab: &Lab) -> Result<(u64, u64)> {
        let pid = self.daemon.pid().context("daemon pid")?;
        let mut agents = Vec::new();
        for i in 0..IDLE_TUNNELS {
            agents.push(publish(lab, &format!("idle{i}"), ECHO)?.0);
        }
        if !eventually(Duration::from_secs(120), || {
            Ok(connected_tunnels(lab)? == IDLE_TUNNELS + 2)
        })? {
            bail!(
                "only {} of {} tunnels connected; the others:\n{}\ndaemon log ends:\n{}",
                connected_tunnels(lab)?,
                IDLE_TUNNELS + 2,
                unconnected(lab)?.join("\n"),
                self.daemon.log().lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
        }
        Ok((rss_kib(pid)?, anon_rss_kib(pid)?))
    }
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
/// services; service i is published on `rathole_port(tls, i)` and forwards
/// to `local(i)`. The TCP and TLS transports can run side by side.
fn rathole(lab: &Lab, tls: bool, services: usize, local: impl Fn(usize) -> u16) -> Result<(ChildGuard, ChildGuard)> {
    let dir = lab.scratch().join(if tls { "rathole-tls" } else { "rathole-tcp" });
    std::fs::create_dir_all(&dir)?;
    if tls {
        rathole_certs(&dir)?;
    }
    let transport = if tls { "tls" } else { "tcp" };
    let control = if tls { 2334 } else { 2333 };
    let mut server =
        format!("[server]\nbind_addr = \"0.0.0.0:{control}\"\n[server.transport]\ntype = \"{transport}\"\n");
    let mut client =
        format!("[client]\nremote_addr = \"10.77.0.1:{control}\"\n[client.transport]\ntype = \"{transport}\"\n");
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
            rathole_port(tls, i)
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

fn rathole_port(tls: bool, service: usize) -> u16 {
    (if tls { 21100 } else { 21000 }) + service as u16
}

/// Median and spread ((max - min) / median) of one figure over the rounds.
fn median_spread(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    (median, (v[v.len() - 1] - v[0]) / median)
}

pub fn run(rows: &mut Vec<Row>) -> Result<()> {
    println!(
        "[1/3] {ROUNDS} rounds of direct, gatekeeper tunnel, rathole tcp and tls, in turn: iperf3 5 s and \
         {SAMPLES} new connections each; the gate stays attached throughout, so every path pays for it"
    );
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Intruder, ECHO)?;
    let _iperf = spawn_in(&lab, Role::Intruder, &["iperf3", "-s", "-p", &IPERF.to_string()])?;
    let private = |port| SocketAddr::new(IpAddr::V4(Role::Intruder.addr()), port);
    let gatekeeper = Gatekeeper::start(&mut lab)?;
    let services = |i| if i == 0 { ECHO } else { IPERF };
    let rathole_tcp = rathole(&lab, false, 2, services)?;
    let rathole_tls = rathole(&lab, true, 2, services)?;

    type Before<'a> = Box<dyn Fn(u16) -> Result<()> + 'a>;
    let lab_ref = &lab;
    let paths: [(&str, SocketAddr, SocketAddr, Before); 4] = [
        ("direct", private(IPERF), private(ECHO), Box::new(|_| Ok(()))),
        (
            "gatekeeper (tls)",
            gatekeeper.iperf,
            gatekeeper.echo,
            Box::new(move |port| Gatekeeper::knock(lab_ref, port)),
        ),
        (
            "rathole tcp",
            gw(rathole_port(false, 1)),
            gw(rathole_port(false, 0)),
            Box::new(move |port| wait_open_any(lab_ref, gw(port))),
        ),
        (
            "rathole tls",
            gw(rathole_port(true, 1)),
            gw(rathole_port(true, 0)),
            Box::new(move |port| wait_open_any(lab_ref, gw(port))),
        ),
    ];
    let mut rounds: Vec<Vec<Measured>> = vec![Vec::new(); paths.len()];
    for round in 1..=ROUNDS {
        for ((name, iperf_at, echo_at, before), results) in paths.iter().zip(rounds.iter_mut()) {
            let profile = std::env::var("GATEKEEPER_BENCH_PERF")
                .ok()
                .filter(|_| round == 1 && *name == "gatekeeper (tls)")
                .map(|out| {
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(1500));
                        sh(&[
                            "perf",
                            "record",
                            "-e",
                            "cpu-clock",
                            "-a",
                            "-g",
                            "-o",
                            &out,
                            "--",
                            "sleep",
                            "3",
                        ])
                    })
                });
            let m = measure(&lab, *iperf_at, *echo_at, before)?;
            if let Some(profile) = profile {
                profile
                    .join()
                    .map_err(|_| anyhow::anyhow!("the profiler thread panicked"))??;
            }
            println!(
                "      round {round}, {name}: {:.2} Gbit/s, new connection p50 {:.3} ms p99 {:.3} ms",
                m.gbps, m.p50, m.p99
            );
            results.push(m);
        }
    }
    drop((rathole_tcp, rathole_tls));
    let summary: Vec<(Measured, f64)> = rounds
        .iter()
        .map(|r| {
            let (gbps, spread) = median_spread(r.iter().map(|m| m.gbps));
            let m = Measured {
                gbps,
                p50: median_spread(r.iter().map(|m| m.p50)).0,
                p99: median_spread(r.iter().map(|m| m.p99)).0,
            };
            (m, spread)
        })
        .collect();
    for ((name, ..), (m, spread)) in paths.iter().zip(&summary) {
        println!(
            "      median {name}: {:.2} Gbit/s (spread {:.0}%), new connection p50 {:.3} ms p99 {:.3} ms",
            m.gbps,
            spread * 100.0,
            m.p50,
            m.p99
        );
    }

    println!("[2/3] {IDLE_TUNNELS} idle tunnels: gatekeeper's daemon, then rathole's server");
    let (ours_rss, ours_anon) = gatekeeper.idle_rss(&lab)?;
    drop(gatekeeper);
    lab.cli_ok(&["detach"])?;
    let (server, client) = rathole(&lab, true, IDLE_TUNNELS, |_| ECHO)?;
    std::thread::sleep(Duration::from_secs(3));
    let rathole_pid = server.id().context("rathole pid")?;
    let (rathole_rss, rathole_anon) = (rss_kib(rathole_pid)?, anon_rss_kib(rathole_pid)?);
    drop((client, server));
    println!(
        "      gateway memory with {IDLE_TUNNELS} idle tunnels, resident (anonymous): gatekeeper {ours_rss} \
         ({ours_anon}) KiB, rathole server {rathole_rss} ({rathole_anon}) KiB"
    );

    println!("[3/3] rathole again, {ROUNDS} rounds, with no gate attached: what its users see today");
    let ungated: Vec<(&str, f64)> = {
        let rathole_tcp = rathole(&lab, false, 2, services)?;
        let rathole_tls = rathole(&lab, true, 2, services)?;
        let mut gbps = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (tls, results) in [false, true].into_iter().zip(gbps.iter_mut()) {
                let at = gw(rathole_port(tls, 1));
                wait_open_any(&lab, at)?;
                results.push(iperf(&lab, at)?);
            }
        }
        drop((rathole_tcp, rathole_tls));
        ["rathole tcp, no gate", "rathole tls, no gate"]
            .into_iter()
            .zip(gbps)
            .map(|(name, g)| {
                let (median, spread) = median_spread(g.into_iter());
                println!(
                    "      median {name}: {median:.2} Gbit/s (spread {:.0}%)",
                    spread * 100.0
                );
                (name, median)
            })
            .collect()
    };

    let [(direct, _), (ours, _), (rathole_tcp, _), (rathole_tls, _)] = &summary[..] else {
        bail!("four paths measured");
    };
    let mut row = |what: &str, value: f64, unit: &'static str, ratio: Option<(f64, &'static str, f64)>| {
        rows.push(Row {
            what: what.into(),
            value,
            unit,
            ratio,
        })
    };
    row("iperf3, direct", direct.gbps, "Gbit/s", None);
    row("iperf3, rathole tcp", rathole_tcp.gbps, "Gbit/s", None);
    row("iperf3, rathole tls", rathole_tls.gbps, "Gbit/s", None);
    row(
        "iperf3, gatekeeper vs rathole tcp, both gated",
        ours.gbps,
        "Gbit/s",
        Some((ours.gbps / rathole_tcp.gbps, ">=", 1.0)),
    );
    row(
        "iperf3, gatekeeper vs rathole tls, both gated",
        ours.gbps,
        "Gbit/s",
        Some((ours.gbps / rathole_tls.gbps, ">=", 1.3)),
    );
    row("new connection p50, direct", direct.p50, "ms", None);
    row(
        "new connection p50, gatekeeper vs rathole tcp",
        ours.p50,
        "ms",
        Some((ours.p50 / rathole_tcp.p50, "<=", 1.0)),
    );
    row(
        "new connection p99, gatekeeper vs rathole tcp",
        ours.p99,
        "ms",
        Some((ours.p99 / rathole_tcp.p99, "<=", 1.0)),
    );
    row(
        "new connection p50, gatekeeper vs rathole tls",
        ours.p50,
        "ms",
        Some((ours.p50 / rathole_tls.p50, "<=", 1.0)),
    );
    for (name, gbps) in &ungated {
        row(&format!("iperf3, {name}"), *gbps, "Gbit/s", None);
        row(
            &format!("iperf3, gatekeeper (gated) vs {name}"),
            ours.gbps,
            "Gbit/s",
            Some((ours.gbps / gbps, ">=", if name.contains("tls") { 1.3 } else { 1.0 })),
        );
    }
    row(
        &format!("gateway memory, {IDLE_TUNNELS} idle, resident"),
        ours_rss as f64,
        "KiB",
        None,
    );
    row(
        &format!("gateway memory, {IDLE_TUNNELS} idle, anonymous vs 20 MB"),
        ours_anon as f64,
        "KiB",
        Some((ours_anon as f64 / 20480.0, "<=", 1.0)),
    );
    row(
        &format!("gateway memory, {IDLE_TUNNELS} idle, anonymous: gatekeeper vs rathole"),
        ours_anon as f64,
        "KiB",
        Some((ours_anon as f64 / rathole_anon as f64, "<=", 1.0)),
    );
    Ok(())
}
