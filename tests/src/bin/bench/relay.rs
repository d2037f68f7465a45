//! `cargo xtask bench relay`: the relay through Redis against the TLS
//! tunnel and the direct path, in one lab and one run, each path ending at
//! the same nginx configuration:
//!
//! 1. wrk, one connection, 3 s: latency p50/p99 of a small GET.
//! 2. wrk, 32 connections, 5 s: requests per second of the same GET.
//! 3. A 1 GiB download with curl through each; the gateway's and the
//!    relay agent's peak resident memory during the relayed one.
//!
//! The relay's agent host reaches only Redis (as in the tests); the
//! tunnel's agent and the direct path use the intruder's host, which runs
//! the same nginx.

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use gatekeeper_tests::{
    cluster::shared,
    lab::{ChildGuard, Lab, Role, eventually, gatekeeper_bin, rss_kib},
    relay::{HOST, RELAY_PORT, RelayLab},
};

use crate::Row;

/// Beside the relay lab's own test service (on 8000).
const NGINX_PORT: u16 = 8100;
const BIG: u64 = 1 << 30;

/// nginx on `role`, port 8100: `/small` answers six bytes, `/big.bin` is
/// 1 GiB (a sparse file: the page cache serves it).
fn nginx(lab: &Lab, role: Role, name: &str) -> Result<ChildGuard> {
    let dir = lab.scratch().join(format!("nginx-{name}"));
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::File::create(www.join("big.bin"))?.set_len(BIG)?;
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen {NGINX_PORT};\n    root {www};\n    location = /small {{ return 200 \"hello\\n\"; }}\n  }}\n}}\n",
            www = www.display()
        ),
    )?;
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns(role), "nginx", "-c"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx (apt-get install nginx-light)")?;
    let guard = ChildGuard::new(child);
    let up = eventually(Duration::from_secs(10), || {
        Ok(lab
            .tcp_connect(
                role,
                ([127, 0, 0, 1], NGINX_PORT).into(),
                None,
                Duration::from_millis(200),
            )?
            .is_some())
    })?;
    if !up {
        bail!(
            "nginx on {role:?} did not come up: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
    }
    Ok(guard)
}

/// What wrk measured.
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// wrk from the client at `url` with `Host: host`.
fn wrk(lab: &Lab, url: &str, host: &str, connections: u32, secs: u32) -> Result<Wrk> {
    let (c, d, t) = (
        connections.to_string(),
        format!("{secs}s"),
        connections.min(2).to_string(),
    );
    let header = format!("Host: {host}");
    let out = lab.exec(
        Role::Client,
        &["wrk", "-t", &t, "-c", &c, "-d", &d, "--latency", "-H", &header, url],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors at {url}:\n{text}");
    }
    let latency = |pct: &str| -> Result<f64> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(pct))
            .with_context(|| format!("no {pct} line in wrk's output:\n{text}"))?;
        let value = line.split_whitespace().nth(1).context("wrk latency")?;
        let split = value
            .find(|c: char| c.is_ascii_alphabetic())
            .context("wrk latency unit")?;
        let (n, unit) = value.split_at(split);
        let n: f64 = n.parse()?;
        Ok(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => bail!("wrk latency unit {unit}"),
        })
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .context("no Requests/sec in wrk's output")?
        .trim()
        .parse()?;
    Ok(Wrk {
        rps,
        p50_ms: latency("50%")?,
        p99_ms: latency("99%")?,
    })
}

/// A 1 GiB download from the client; Gbit/s.
fn download(lab: &Lab, url: &str, host: &str) -> Result<f64> {
    let header = format!("Host: {host}");
    let out = lab.exec(
        Role::Client,
        &[
            "curl",
            "-sS",
            "--max-time",
            "120",
            "-H",
            &header,
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{speed_download}",
            url,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let size: u64 = parts.next().context("curl size")?.parse()?;
    let speed: f64 = parts.next().context("curl speed")?.parse()?;
    if size != BIG {
        bail!("a download of {size} bytes from {url}, not {BIG}");
    }
    Ok(speed * 8.0 / 1e9)
}

/// Samples the peak resident memory of `pids` while `f` runs.
fn peaks<T>(pids: &[u32], f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<u64>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
    let (s, p, pids_owned) = (stop.clone(), peaks.clone(), pids.to_vec());
    let sampler = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            for (pid, peak) in pids_owned.iter().zip(p.iter()) {
                if let Ok(kib) = rss_kib(*pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let result = f();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    Ok((result?, peaks.iter().map(|p| p.load(Ordering::Relaxed)).collect()))
}

/// Issues a tunnel to the intruder host's nginx, starts its agent there,
/// knocks for its port; returns the agent and the port.
fn tunnel(relay: &RelayLab) -> Result<(ChildGuard, u16)> {
    let token = relay.cli(&["tunnel", "issue", "bench", "--owner", "bench", "--allow", "laptop"])?;
    let file = relay.lab.scratch().join("bench.token");
    gatekeeper::private_file::write(&file, token.trim())?;
    let listed: serde_json::Value = serde_json::from_str(&relay.cli(&["tunnel", "list", "--json"])?)?;
    let port = listed[0]["port"].as_u64().context("the tunnel's port")? as u16;
    let bin = gatekeeper_bin()?;
    let agent = ChildGuard::new(
        Command::new("ip")
            .args(["netns", "exec", &relay.lab.ns(Role::Intruder)])
            .arg(&bin)
            .args(["agent", "--token-file"])
            .arg(&file)
            .args(["--forward", &format!("127.0.0.1:{NGINX_PORT}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let connected = eventually(Duration::from_secs(30), || {
        let listed: serde_json::Value = serde_json::from_str(&relay.cli(&["tunnel", "list", "--json"])?)?;
        Ok(listed[0]["connected"] == true)
    })?;
    if !connected {
        bail!("the tunnel's agent did not connect");
    }
    relay.knock_for(port)?;
    Ok((agent, port))
}

pub fn run(rows: &mut Vec<Row>) -> Result<()> {
    println!("[1/3] a relay node, Redis, the relay agent, a tunnel agent, nginx on both private hosts");
    let relay = RelayLab::start(1, "[knock]\nopen_for = \"10m\"\n")?;
    let _relay_nginx = nginx(&relay.lab, Role::Agent, "agent")?;
    let _other_nginx = nginx(&relay.lab, Role::Intruder, "intruder")?;
    let agent = relay.start_agent(&relay.credential, NGINX_PORT)?;
    relay.knock()?;
    let (_tunnel_agent, tunnel_port) = tunnel(&relay)?;
    let direct_base = format!("http://{}:{NGINX_PORT}", Role::Intruder.addr());
    let tunnel_base = format!("http://{}", shared(tunnel_port));
    let relay_base = format!("http://{}", shared(RELAY_PORT));
    let paths = [
        ("direct", &direct_base),
        ("tls tunnel", &tunnel_base),
        ("relay", &relay_base),
    ];

    println!("[2/3] wrk: a small GET, one connection for latency, 32 for throughput");
    let mut small = Vec::new();
    for (name, base) in paths {
        let url = format!("{base}/small");
        let header = format!("Host: {HOST}");
        let probe = relay.lab.exec(
            Role::Client,
            &["curl", "-sS", "-i", "--max-time", "5", "-H", &header, &url],
        )?;
        let answer = String::from_utf8_lossy(&probe.stdout);
        if !answer.starts_with("HTTP/1.1 200") {
            bail!("{name} does not answer {url} with 200:\n{answer}");
        }
        let one = wrk(&relay.lab, &url, HOST, 1, 3)?;
        let many = wrk(&relay.lab, &url, HOST, 32, 5)?;
        println!(
            "      {name}: p50 {:.3} ms, p99 {:.3} ms (1 connection); {:.0} requests/s (32 connections)",
            one.p50_ms, one.p99_ms, many.rps
        );
        small.push((name, one, many));
    }

    println!("[3/3] a 1 GiB download through each; memory during the relayed one");
    let pids = [
        relay.daemons[0].pid().context("gateway pid")?,
        agent.pid().context("agent pid")?,
    ];
    let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect::<Result<_>>()?;
    let mut big = Vec::new();
    for (name, base) in paths {
        let url = format!("{base}/big.bin");
        let (gbps, peak) = peaks(&pids, || download(&relay.lab, &url, HOST))?;
        println!("      {name}: {gbps:.2} Gbit/s");
        big.push((name, gbps, peak));
    }
    let relay_peak = &big[2].2;
    println!(
        "      during the relayed download: gateway {} KiB (from {}), relay agent {} KiB (from {})",
        relay_peak[0], before[0], relay_peak[1], before[1]
    );

    let (tunnel, relayed) = (&small[1], &small[2]);
    for (name, _, many) in &small {
        rows.push(Row {
            what: format!("small GET, {name}, 32 connections"),
            value: many.rps,
            unit: "req/s",
            ratio: None,
        });
    }
    for (name, one, _) in &small {
        rows.push(Row {
            what: format!("small GET p50, {name}, 1 connection"),
            value: one.p50_ms,
            unit: "ms",
            ratio: None,
        });
        rows.push(Row {
            what: format!("small GET p99, {name}, 1 connection"),
            value: one.p99_ms,
            unit: "ms",
            ratio: None,
        });
    }
    let over_tunnel = relayed.1.p50_ms - tunnel.1.p50_ms;
    rows.push(Row {
        what: "small GET p50, relay minus tls tunnel".into(),
        value: over_tunnel,
        unit: "ms",
        ratio: None,
    });
    for (name, gbps, _) in &big {
        rows.push(Row {
            what: format!("1 GiB download, {name}"),
            value: *gbps,
            unit: "Gbit/s",
            ratio: None,
        });
    }
    let relay_gbps = big[2].1;
    println!(
        "\n      targets: p50 within 0.5 ms of the tls tunnel: {over_tunnel:.3} ms ({}); at least 1 Gbit/s relayed: {relay_gbps:.2} ({})",
        if over_tunnel <= 0.5 { "met" } else { "NOT met" },
        if relay_gbps >= 1.0 { "met" } else { "NOT met" }
    );
    rows.push(Row {
        what: "peak RSS during the relayed 1 GiB, gateway".into(),
        value: relay_peak[0] as f64,
        unit: "KiB",
        ratio: None,
    });
    rows.push(Row {
        what: "peak RSS during the relayed 1 GiB, relay agent".into(),
        value: relay_peak[1] as f64,
        unit: "KiB",
        ratio: None,
    });
    Ok(())
}
