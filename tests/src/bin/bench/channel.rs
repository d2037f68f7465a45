//! `cargo xtask bench channel`: channels under each cipher policy against
//! stunnel4 (Debian's, TLS 1.3 AES-GCM) on the same path and against the
//! direct path, in one lab (two devices on one veth link) and one run:
//!
//! 1. iperf3 throughput through each (5 s each).
//! 2. New-connection latency, p50/p99 over 200 connections: connect, send
//!    one byte, read its echo (a full channel handshake each).
//!
//! 3. For context, Tongsuo's own SM4-GCM cipher rate on one core
//!    (`openssl speed`, 16 KiB blocks): the ceiling an SM channel's
//!    throughput is set against.
//!
//! Targets: `tls13-aes` at least stunnel's throughput. SM4-GCM against
//! AES-GCM is reported as a ratio without a target: AES runs on the CPU's
//! AES instructions here, SM4 in portable code.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use gatekeeper_tests::{
    channel::{ChannelLab, inbound, outbound, tongsuo},
    lab::{ChildGuard, Lab, Role},
};

use crate::{
    Row,
    tunnel::{connect_latency, iperf, spawn_in, wait_open},
};

const IPERF: u16 = 5201;
const ECHO: u16 = 7000;

/// A path from alpha to beta's iperf3 and echo services.
struct Path {
    name: &'static str,
    iperf: SocketAddr,
    echo: SocketAddr,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The channels config of each side: per policy, one channel to iperf3
/// and one to the echo service.
fn configs() -> (String, String) {
    let (mut alpha_toml, mut beta_toml) = (String::new(), String::new());
    for (i, policy) in ["sm", "tls13-aes", "tls13-chacha"].into_iter().enumerate() {
        for (j, backend) in [IPERF, ECHO].into_iter().enumerate() {
            let n = i * 2 + j;
            let (name, entry, port) = (
                format!("c{n}"),
                format!("listen = \"127.0.0.1:{}\"", 6000 + n),
                7440 + n as u16,
            );
            alpha_toml += &outbound(&name, &entry, "beta", port, policy, "");
            beta_toml += &inbound(&name, port, &format!("127.0.0.1:{backend}"), policy, &["alpha"], "");
        }
    }
    (alpha_toml, beta_toml)
}

/// stunnel4 on both devices, alpha's client side at 127.0.0.1:6100 (iperf3)
/// and 6101 (echo), with beta's ECDSA identity and the AES-GCM suites.
fn stunnel(cl: &ChannelLab) -> Result<(ChildGuard, ChildGuard)> {
    let beta = Role::Gateway.addr();
    let dir = cl.dir(Role::Gateway);
    // Its best setup: no Nagle on either socket, as the channels do.
    let suites = "ciphersuites = TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256\nsslVersionMin = TLSv1.3\n\
                  socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    let mut server = format!("foreground = yes\npid =\n{suites}cert = {dir}/ecdsa.crt\nkey = {dir}/ecdsa.key\n");
    let mut client = format!("foreground = yes\npid =\n{suites}client = yes\n");
    for (i, backend) in [IPERF, ECHO].into_iter().enumerate() {
        server += &format!("[s{i}]\naccept = 0.0.0.0:{}\nconnect = 127.0.0.1:{backend}\n", 7460 + i);
        client += &format!(
            "[s{i}]\naccept = 127.0.0.1:{}\nconnect = {beta}:{}\n",
            6100 + i,
            7460 + i
        );
    }
    let scratch = cl.lab.scratch();
    let (s, c) = (scratch.join("stunnel-beta.conf"), scratch.join("stunnel-alpha.conf"));
    std::fs::write(&s, server)?;
    std::fs::write(&c, client)?;
    let run = |role, conf: &std::path::Path| spawn_in(&cl.lab, role, &["stunnel4", conf.to_str().unwrap_or_default()]);
    Ok((run(Role::Gateway, &s)?, run(Role::Client, &c)?))
}

pub fn run(rows: &mut Vec<Row>) -> Result<()> {
    println!("[1/3] direct, stunnel4 and a channel per policy: iperf3 5 s each");
    let mut cl = ChannelLab::on(Lab::direct()?)?;
    cl.lab.serve_tcp_echo(Role::Gateway, ECHO)?;
    let _iperf = spawn_in(&cl.lab, Role::Gateway, &["iperf3", "-s", "-p", &IPERF.to_string()])?;
    let (alpha_toml, beta_toml) = configs();
    let _beta = cl.run(Role::Gateway, &beta_toml)?;
    let _alpha = cl.run(Role::Client, &alpha_toml)?;
    let _stunnel = stunnel(&cl)?;
    let beta = |port| SocketAddr::new(Role::Gateway.addr().into(), port);
    let paths = [
        Path {
            name: "direct",
            iperf: beta(IPERF),
            echo: beta(ECHO),
        },
        Path {
            name: "stunnel4 (TLS 1.3 AES-GCM)",
            iperf: local(6100),
            echo: local(6101),
        },
        Path {
            name: "channel sm (SM4-GCM)",
            iperf: local(6000),
            echo: local(6001),
        },
        Path {
            name: "channel tls13-aes (AES-GCM)",
            iperf: local(6002),
            echo: local(6003),
        },
        Path {
            name: "channel tls13-chacha",
            iperf: local(6004),
            echo: local(6005),
        },
    ];
    let lab = &cl.lab;
    for p in &paths {
        wait_open(lab, p.echo).with_context(|| p.name)?;
    }
    let mut gbps = Vec::new();
    for p in &paths {
        let g = iperf(lab, p.iperf).with_context(|| p.name)?;
        println!("  {:<30} {g:.2} Gbit/s", p.name);
        gbps.push(g);
    }
    println!("[2/3] new-connection latency: 200 connections each");
    let mut latency = Vec::new();
    for p in &paths {
        let (p50, p99) = connect_latency(lab, p.echo).with_context(|| p.name)?;
        println!("  {:<30} p50 {p50:.3} ms, p99 {p99:.3} ms", p.name);
        latency.push((p50, p99));
    }
    println!("[3/3] Tongsuo's SM4-GCM cipher rate, one core, 3 s");
    let tongsuo_gbps = tongsuo_sm4_gcm(lab)?;
    println!("  {tongsuo_gbps:.2} Gbit/s");
    for (p, g) in paths.iter().zip(&gbps) {
        rows.push(Row {
            what: format!("iperf3, {}", p.name),
            value: *g,
            unit: "Gbit/s",
            ratio: None,
        });
    }
    rows.push(Row {
        what: "iperf3, channel tls13-aes vs stunnel4".into(),
        value: gbps[3],
        unit: "Gbit/s",
        ratio: Some((gbps[3] / gbps[1], ">=", 1.0)),
    });
    rows.push(Row {
        what: "iperf3, SM4-GCM vs AES-GCM (both channels; no target)".into(),
        value: gbps[2] / gbps[3],
        unit: "ratio",
        ratio: None,
    });
    rows.push(Row {
        what: "SM4-GCM cipher rate, Tongsuo, one core (context)".into(),
        value: tongsuo_gbps,
        unit: "Gbit/s",
        ratio: None,
    });
    rows.push(Row {
        what: "iperf3, channel sm vs Tongsuo's SM4-GCM rate (no target)".into(),
        value: gbps[2] / tongsuo_gbps,
        unit: "ratio",
        ratio: None,
    });
    for (p, (p50, p99)) in paths.iter().zip(&latency) {
        rows.push(Row {
            what: format!("new connection p50, {}", p.name),
            value: *p50,
            unit: "ms",
            ratio: None,
        });
        rows.push(Row {
            what: format!("new connection p99, {}", p.name),
            value: *p99,
            unit: "ms",
            ratio: None,
        });
    }
    Ok(())
}

/// Tongsuo's `speed` for SM4-GCM on 16 KiB blocks; Gbit/s.
fn tongsuo_sm4_gcm(lab: &Lab) -> Result<f64> {
    let args = ["speed", "-seconds", "3", "-bytes", "16384", "-evp", "sm4-gcm"];
    let out = tongsuo()?.run(lab, None, &args, b"", std::time::Duration::from_secs(30))?;
    // The last line: `SM4-GCM   121957.89k` (thousands of bytes a second).
    let text = String::from_utf8_lossy(&out.stdout);
    let kbytes: f64 = text
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.trim_end_matches('k').parse().ok())
        .with_context(|| format!("reading Tongsuo's speed: {text}"))?;
    Ok(kbytes * 1000.0 * 8.0 / 1e9)
}
