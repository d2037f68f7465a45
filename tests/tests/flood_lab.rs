//! Floods that must not crowd out real clients: knocks from a fresh spoofed
//! source per packet, replays of a captured knock from everywhere, and
//! thousands of idle connections held open to the portal. Real daemon,
//! real XDP, namespaces; needs root.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gatekeeper::knock::{Carrier, send::Request};
use gatekeeper::spec::{PortRange, Proto};
use gatekeeper_tests::{
    frames::{FrameSpec, Rng, udp},
    lab::{Lab, Role, eventually, round_trip, rss_kib},
    traffic::transmit,
};

const KNOCK_PORT: u16 = 62201;

fn stats(lab: &Lab) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&lab.cli_ok(&["stats", "--json"])?)?)
}

/// Lets this process hold the thousands of sockets a test opens.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit with a valid out-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn a_spoofed_flood_of_garbage_and_replays_crowds_out_no_real_client() -> Result<()> {
    let mut lab = Lab::direct()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let cred = lab.enroll("alice", &["--allow", "tcp/22,udp/5353"])?;
    let daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    let pid = daemon.pid().context("daemon pid")?;
    let gw = Role::Gateway.addr();

    // One knock of alice's, accepted, then captured: the flood replays it.
    let captured = lab.with_knocker(Role::Client, &cred, |k, server| {
        let req = Request {
            proto: Proto::Udp,
            ports: PortRange { lo: 5353, hi: 5353 },
            source_port: None,
        };
        Ok(k.build(server, &req, 0)?)
    })?;
    lab.send_udp(Role::Client, SocketAddr::new(gw.into(), KNOCK_PORT), captured.clone())?;
    ensure!(
        eventually(Duration::from_secs(5), || Ok(lab.audit()?.len() == 1))?,
        "the captured knock was accepted first"
    );
    ensure!(
        captured.starts_with(&gatekeeper_common::knock::PREFIX_V2),
        "alice knocks v2, which has no key id for the gate to check"
    );
    let mut garbage = gatekeeper_common::knock::PREFIX.to_vec();
    garbage.extend(Rng::new(7).bytes(150));
    let mut garbage_v2 = gatekeeper_common::knock::PREFIX_V2.to_vec();
    garbage_v2.extend(Rng::new(8).bytes(300));
    // The spraying transmitter gives every copy a fresh source in 198.0.0.0/8.
    let frames = vec![
        FrameSpec::v4([198, 18, 0, 1], gw.octets(), udp(1024, KNOCK_PORT, &garbage)).build(),
        FrameSpec::v4([198, 18, 0, 3], gw.octets(), udp(1024, KNOCK_PORT, &garbage_v2)).build(),
        FrameSpec::v4([198, 18, 0, 2], gw.octets(), udp(1024, KNOCK_PORT, &captured)).build(),
    ];
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kib(pid)?;
    let audit_before = std::fs::metadata(lab.state_dir().join("audit.log"))?.len();

    let more = Arc::new(AtomicBool::new(true));
    let (connected, flood) = std::thread::scope(|s| -> Result<_> {
        let flood = s.spawn(|| transmit(&lab, "transmit_spray", frames, 1 << 16, more.clone()));
        std::thread::sleep(Duration::from_millis(500));
        // Alice, meanwhile, knocks with a SYN and connects, again and again.
        let mut connected = 0;
        for _ in 0..5 {
            let ok = lab.with_knocker(Role::Client, &cred, move |k, server| {
                let stream = k.knock_and_connect(SocketAddr::new(server, 22), Duration::from_secs(3), Carrier::Syn)?;
                Ok(match stream {
                    Some(mut s) => {
                        s.set_read_timeout(Some(Duration::from_secs(3)))?;
                        round_trip(&mut s, b"through the flood").unwrap_or(false)
                    }
                    None => false,
                })
            })?;
            connected += usize::from(ok);
            std::thread::sleep(Duration::from_millis(200));
        }
        more.store(false, Ordering::Relaxed);
        let flood = flood.join().map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
        Ok((connected, flood))
    })?;
    let (frames_sent, took) = flood;
    let rss_after = rss_kib(pid)?;
    let audit_after = std::fs::metadata(lab.state_dir().join("audit.log"))?.len();
    let s = stats(&lab)?;
    let count = |name: &str| s[name].as_u64().unwrap_or(0);
    println!(
        "{frames_sent} flood frames in {took:?}; counters: {s}; daemon {rss_before} -> {rss_after} KiB; audit +{} bytes",
        audit_after - audit_before
    );
    assert_eq!(connected, 5, "every real knock-and-connect got through the flood");
    assert!(frames_sent >= 100_000, "a flood worth the name: {frames_sent}");
    // Where the flood died: v1 garbage at the key-id check, v2 garbage at
    // the flood tag check, replays at the replay cache, all in the kernel.
    let (unknown, replayed) = (count("knock_unknown_key"), count("knock_replayed"));
    assert!(
        unknown >= frames_sent / 2 && replayed >= frames_sent / 4,
        "unknown key ids {unknown}, replays {replayed} of {frames_sent}: {s}"
    );
    assert!(
        count("knock_diverted") <= 20,
        "only real knocks reached the daemon: {s}"
    );
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "the daemon's memory stays bounded: {rss_before} -> {rss_after} KiB"
    );
    assert!(
        audit_after - audit_before < 64 * 1024,
        "the audit trail grew by {} bytes for {frames_sent} flood frames",
        audit_after - audit_before
    );
    Ok(())
}

/// Holds `count` idle TCP connections to `to`, spread over `sources`
/// (addresses of the intruder), inside the intruder's namespace. Returns
/// the connections that came up.
fn hold_idle(lab: &Lab, to: SocketAddr, sources: Vec<Ipv4Addr>, count: usize) -> Result<Vec<TcpStream>> {
    lab.in_ns(Role::Intruder, move || -> Result<Vec<TcpStream>> {
        let mut held = Vec::with_capacity(count);
        for i in 0..count {
            let src = sources[i % sources.len()];
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
            if sock.connect_timeout(&to.into(), Duration::from_secs(2)).is_ok() {
                held.push(sock.into());
            }
        }
        Ok(held)
    })?
}

#[test]
fn thousands_of_idle_connections_leave_the_portal_to_real_clients() -> Result<()> {
    raise_open_files();
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 9000)?;
    let cred = lab.enroll("laptop", &["--allow", "tcp/443"])?;
    let mut daemon = lab.start_daemon(&[
        "--protect",
        "all",
        "--portal",
        "10.77.0.1:443",
        "--portal-upstream",
        "127.0.0.1:9000",
    ])?;
    daemon.wait_for("portal listening", Duration::from_secs(20))?;
    // A hundred more addresses for the intruder.
    let batch = lab.scratch().join("addresses");
    let lines: String = (100..200)
        .map(|i| format!("addr add 10.77.0.{i}/24 dev {}\n", Role::Intruder.iface()))
        .collect();
    std::fs::write(&batch, lines)?;
    lab.exec(Role::Intruder, &["ip", "-batch", batch.to_str().context("utf-8 path")?])?;
    let portal: SocketAddr = "10.77.0.1:443".parse()?;
    let one = hold_idle(&lab, portal, vec![Role::Intruder.addr()], 2000)?;
    let many = hold_idle(
        &lab,
        portal,
        (100..200).map(|i| Ipv4Addr::new(10, 77, 0, i)).collect(),
        2000,
    )?;
    println!("holding {} + {} idle connections", one.len(), many.len());
    ensure!(
        many.len() >= 1900,
        "the hundred sources got their connections: {}",
        many.len()
    );

    // The enrolled client still gets through, within two seconds.
    let cred = cred.to_str().context("utf-8 path")?;
    let out = lab.gatekeeper_with_input(
        Role::Client,
        &["connect", "--portal", "--credential", cred, "10.77.0.1:443"],
        b"past the idle crowd\n",
        Duration::from_secs(2),
    )?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "past the idle crowd\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And a stranger still gets the guidance page.
    let page = lab.exec(Role::Client, &["curl", "-sk", "--max-time", "2", "https://10.77.0.1/"])?;
    assert!(
        String::from_utf8_lossy(&page.stdout).contains("This gateway is private"),
        "the stranger got the guidance page"
    );
    assert!(daemon.running());
    // The one source's surplus was turned away at once, and counted.
    ensure!(
        eventually(Duration::from_secs(5), || Ok(lab.audit()?.iter().any(|l| {
            l["reason"] == "too_many_sessions" || l["by_reason"]["too_many_sessions"].as_u64().is_some_and(|n| n > 0)
        })))?,
        "refusals over the per-source limit are audited"
    );
    let status: serde_json::Value = serde_json::from_str(&lab.state_cli(&["status", "--json"])?)?;
    println!("audit: {}", status["audit"]);
    drop((one, many));
    Ok(())
}
