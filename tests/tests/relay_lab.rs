//! HTTP services relayed through Redis: a real redis-server, the real
//! daemon serving relayed hosts, `gatekeeper relay-agent` in a namespace
//! whose only route is to Redis, a real HTTP service behind it, curl as
//! the visitor. Needs root.

use std::{
    io::{Read, Write},
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gatekeeper_tests::{
    cluster::shared,
    lab::{Role, SHARED_ADDR, eventually, rss_kib},
    redis::RedisServer,
    relay::{HOST, RELAY_PORT, RelayLab, SERVICE_PORT, curl, curl_url, issue, status_of},
};
use sha2::{Digest, Sha256};

fn body(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.rsplit_once("\nHTTP ")
        .map_or(text.to_string(), |(b, _)| b.to_string())
}

/// SHA-256 of what the service's `/bytes/N` sends.
fn pattern_sha256(n: usize) -> String {
    let block: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    let mut h = Sha256::new();
    let mut left = n;
    while left > 0 {
        let take = left.min(block.len());
        h.update(&block[..take]);
        left -= take;
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sha256(path: &std::path::Path) -> Result<String> {
    Ok(hex(&Sha256::digest(std::fs::read(path)?)))
}

/// Samples a process's resident memory until stopped; the peak.
struct Peak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Peak {
    fn watch(pid: u32) -> Peak {
        let (stop, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Peak {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn kib(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

#[test]
fn a_host_published_through_redis_answers_get_and_post() -> Result<()> {
    let relay = RelayLab::start(1, "")?;
    let lab = &relay.lab;
    for to in [shared(RELAY_PORT), (Role::Node(1).addr(), RELAY_PORT).into()] {
        ensure!(
            lab.tcp_connect(Role::Agent, to, None, Duration::from_millis(500))?
                .is_none(),
            "the agent host reaches the gateway at {to}: the test would prove nothing"
        );
    }
    let _agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    ensure!(
        lab.tcp_connect(Role::Client, shared(RELAY_PORT), None, Duration::from_millis(500))?
            .is_none(),
        "the relay's port is gated until a knock"
    );
    relay.knock()?;

    let out = relay.curl(HOST, "/", &[])?;
    ensure!(status_of(&out) == Some(200), "{out:?}");
    ensure!(body(&out) == "hello from web\n", "{out:?}");

    let out = relay.curl(HOST, "/headers", &[])?;
    let seen: serde_json::Value = serde_json::from_str(&body(&out)).with_context(|| format!("{out:?}"))?;
    let client = Role::Client.addr().to_string();
    ensure!(seen["x-forwarded-for"] == client.as_str(), "{seen}");
    ensure!(
        seen["forwarded"]
            .as_str()
            .is_some_and(|f| f.contains(&format!("for={client}")) && f.contains(HOST)),
        "{seen}"
    );
    ensure!(seen["host"] == HOST, "the service sees the visitor's host: {seen}");

    let out = relay.curl(HOST, "/sha256", &["--data-binary", "relayed body"])?;
    let answer: serde_json::Value = serde_json::from_str(&body(&out)).with_context(|| format!("{out:?}"))?;
    ensure!(answer["length"] == 12, "{answer}");
    ensure!(answer["sha256"] == hex(&Sha256::digest(b"relayed body")), "{answer}");

    let out = relay.curl(
        HOST,
        "/chunked/100000",
        &["-o", "/dev/null", "-w", "%{http_code} %{size_download}"],
    )?;
    ensure!(out.stdout == b"200 100000", "a chunked response: {out:?}");

    let out = relay.curl("nobody.lab.example", "/", &[])?;
    ensure!(status_of(&out) == Some(404), "an unknown host: {out:?}");
    ensure!(
        body(&out).contains("nobody.lab.example"),
        "the page names the host: {out:?}"
    );

    let status = relay.status(1)?;
    ensure!(status["relay"]["agents"][0]["name"] == "web", "{status}");
    let listed: serde_json::Value = serde_json::from_str(&relay.cli(&["relay", "list", "--json"])?)?;
    ensure!(listed[0]["host"] == HOST && listed[0]["state"] == "live", "{listed}");
    Ok(())
}

/// A connection through the relay switched to `Upgrade: websocket` (the
/// service's `/echo` answers 101 and echoes).
fn upgraded(relay: &RelayLab) -> Result<std::net::TcpStream> {
    let mut s = relay
        .lab
        .tcp_connect(Role::Client, shared(RELAY_PORT), None, Duration::from_secs(3))?
        .context("no connection to the relay")?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(
        format!("GET /echo HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").as_bytes(),
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        s.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    ensure!(head.starts_with("http/1.1 101"), "{head}");
    ensure!(head.contains("upgrade: websocket"), "{head}");
    Ok(s)
}

#[test]
fn upgraded_connections_carry_bytes_both_ways_and_idle_ones_keep_nobody_waiting() -> Result<()> {
    let relay = RelayLab::start(1, "")?;
    let _agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    relay.knock()?;
    // Idle ones, more than the flow control's budget has windows for.
    let idle: Vec<_> = (0..10).map(|_| upgraded(&relay)).collect::<Result<_>>()?;
    let out = relay.curl(HOST, "/bytes/300000", &["-o", "/dev/null"])?;
    ensure!(
        status_of(&out) == Some(200),
        "a request beside {} idle upgrades: {out:?}",
        idle.len()
    );
    let mut s = upgraded(&relay)?;
    // 4 MiB each way at once, then our end closes and theirs follows.
    let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(7) % 251) as u8).collect();
    let (mut writer, payload) = (s.try_clone()?, sent.clone());
    let writing = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&payload)?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    writing.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(got == sent, "{} of {} bytes came back intact", got.len(), sent.len());
    Ok(())
}

#[test]
fn a_hundred_mebibytes_go_down_and_up_intact_in_bounded_memory() -> Result<()> {
    const SIZE: usize = 100 << 20;
    let relay = RelayLab::start(1, "")?;
    let agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    relay.knock()?;
    let (gw_pid, agent_pid) = (
        relay.daemons[0].pid().context("gateway pid")?,
        agent.pid().context("agent pid")?,
    );
    let (gw_before, agent_before) = (rss_kib(gw_pid)?, rss_kib(agent_pid)?);
    let (gw_peak, agent_peak) = (Peak::watch(gw_pid), Peak::watch(agent_pid));

    let down = relay.lab.scratch().join("down.bin");
    let down_arg = down.to_string_lossy().into_owned();
    let started = std::time::Instant::now();
    let out = relay.curl(HOST, &format!("/bytes/{SIZE}"), &["-o", &down_arg])?;
    eprintln!("100 MiB down in {:?}", started.elapsed());
    ensure!(out.status.success() && status_of(&out) == Some(200), "{out:?}");
    ensure!(std::fs::metadata(&down)?.len() == SIZE as u64, "a short download");
    ensure!(file_sha256(&down)? == pattern_sha256(SIZE), "the download is corrupted");

    let up = relay.lab.scratch().join("up.bin");
    let mut data = vec![0u8; SIZE];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    std::fs::write(&up, &data)?;
    let up_arg = format!("@{}", up.display());
    let out = relay.curl(HOST, "/sha256", &["--data-binary", &up_arg])?;
    let answer: serde_json::Value = serde_json::from_str(&body(&out)).with_context(|| format!("{out:?}"))?;
    ensure!(answer["length"] == SIZE, "{answer}");
    ensure!(
        answer["sha256"] == hex(&Sha256::digest(&data)),
        "the upload is corrupted"
    );

    // Both ways the body was 100 MiB; what either side held at once is
    // bounded by the flow control's budget and hyper's buffers.
    let (gw_grew, agent_grew) = (
        gw_peak.kib().saturating_sub(gw_before),
        agent_peak.kib().saturating_sub(agent_before),
    );
    ensure!(gw_grew < 16 << 10, "the gateway grew by {gw_grew} KiB");
    ensure!(agent_grew < 16 << 10, "the agent grew by {agent_grew} KiB");
    eprintln!("memory growth during 100 MiB each way: gateway {gw_grew} KiB, agent {agent_grew} KiB");
    Ok(())
}

#[test]
fn two_agents_share_one_port_by_host_and_two_hundred_requests_run_at_once() -> Result<()> {
    let mut relay = RelayLab::start(1, "")?;
    let _web = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    let url = relay.redis.url();
    let shop = issue(&relay.lab, &url, "shop", "shop.lab.example", "laptop")?;
    // A third host on the same port, for another client only.
    let tablet = relay.lab.scratch().join("tablet.credential.toml");
    let tablet = tablet.to_string_lossy().into_owned();
    relay.cli(&["client", "add", "tablet", "--allow", "tcp/22", "--out", &tablet])?;
    issue(&relay.lab, &url, "admin", "admin.lab.example", "tablet")?;
    relay.serve_http(Role::Agent, SERVICE_PORT + 1, "shop")?;
    let _shop = relay.start_agent(&shop, SERVICE_PORT + 1)?;
    relay.knock()?;
    for (host, label) in [(HOST, "web"), ("shop.lab.example", "shop")] {
        let out = relay.curl(host, "/", &[])?;
        ensure!(body(&out) == format!("hello from {label}\n"), "{host}: {out:?}");
    }
    let out = relay.curl("admin.lab.example", "/", &[])?;
    ensure!(
        status_of(&out) == Some(403),
        "a host whose relay does not allow the client that knocked: {out:?}"
    );
    // One curl, 200 transfers at once, each on a connection of its own.
    let url = format!("http://{}/bytes/20000", shared(RELAY_PORT));
    let mut args = vec!["-Z", "--parallel-max", "200", "--parallel-immediate"];
    for _ in 0..200 {
        args.extend(["-o", "/dev/null"]);
    }
    for _ in 1..200 {
        args.push(&url);
    }
    let out = relay.curl(HOST, "/bytes/20000", &args)?;
    let codes = String::from_utf8_lossy(&out.stdout).matches("HTTP 200").count();
    ensure!(codes == 200, "{codes} of 200 concurrent requests succeeded: {out:?}");
    Ok(())
}

/// Rotations of node 1's session with `web` for `reason`, audited.
fn rotations(relay: &RelayLab, reason: &str) -> Result<usize> {
    Ok(relay
        .lab
        .audit_of(Role::Node(1))?
        .into_iter()
        .filter(|e| e["event"] == "relay_session" && e["reason"] == reason)
        .count())
}

#[test]
fn keys_rotate_by_time_and_by_volume_and_downloads_still_complete() -> Result<()> {
    const SIZE: usize = 60 << 20;
    let relay = RelayLab::start(
        1,
        "[relay]\nrotate_after = \"1s\"\nrotate_messages = 100\nresponse_timeout = \"2s\"\n",
    )?;
    let _agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    relay.knock()?;
    let down = relay.lab.scratch().join("rotated.bin");
    let down_arg = down.to_string_lossy().into_owned();
    // At full speed: a thousand messages, a rotation at every look (a
    // fast machine finishes within a few looks, a slow one sees many).
    let out = relay.curl(HOST, &format!("/bytes/{SIZE}"), &["-o", &down_arg])?;
    ensure!(out.status.success() && status_of(&out) == Some(200), "{out:?}");
    ensure!(
        file_sha256(&down)? == pattern_sha256(SIZE),
        "the fast download is corrupted"
    );
    let by_volume = rotations(&relay, "messages")?;
    ensure!(by_volume >= 1, "{by_volume} rotations by volume");
    // Slowly, for about six seconds: rotations while it runs.
    let before = by_volume + rotations(&relay, "time")?;
    let out = relay.curl(
        HOST,
        &format!("/bytes/{SIZE}"),
        &["--limit-rate", "10M", "-o", &down_arg],
    )?;
    ensure!(out.status.success() && status_of(&out) == Some(200), "{out:?}");
    ensure!(
        file_sha256(&down)? == pattern_sha256(SIZE),
        "the slow download is corrupted"
    );
    let during = rotations(&relay, "messages")? + rotations(&relay, "time")? - before;
    ensure!(during >= 4, "{during} rotations during the slow download");
    // Idle, the keys still age out.
    let idle = rotations(&relay, "time")?;
    std::thread::sleep(Duration::from_millis(2500));
    let by_time = rotations(&relay, "time")? - idle;
    ensure!(by_time >= 2, "{by_time} rotations by time in 2.5 idle seconds");

    let out = relay.curl(HOST, "/slow/4", &[])?;
    ensure!(status_of(&out) == Some(504), "a slow service: {out:?}");
    Ok(())
}

#[test]
fn an_agent_killed_mid_request_gives_502_and_its_restart_serves_again() -> Result<()> {
    let relay = RelayLab::start(1, "")?;
    let mut agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    relay.knock()?;
    let lab_curl = {
        let ns_lab = &relay.lab;
        std::thread::scope(|s| -> Result<Output> {
            let waiting = s.spawn(|| curl(ns_lab, SHARED_ADDR.into(), HOST, "/slow/20", &["--max-time", "20"]));
            std::thread::sleep(Duration::from_secs(1));
            agent.kill9()?;
            waiting.join().map_err(|_| anyhow::anyhow!("curl thread panicked"))?
        })?
    };
    ensure!(
        status_of(&lab_curl) == Some(502),
        "a request in flight when its agent died: {lab_curl:?}"
    );
    let out = relay.curl(HOST, "/", &[])?;
    ensure!(status_of(&out) == Some(502), "no agent: 502 at once: {out:?}");
    let _again = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    let out = relay.curl(HOST, "/", &[])?;
    ensure!(status_of(&out) == Some(200), "the agent is back: {out:?}");
    Ok(())
}

/// Kills the pub/sub connections to `redis` from `addr`, as a network
/// blip would; returns how many.
fn cut_subscriptions(redis: &RedisServer, addr: &str) -> Result<usize> {
    let list = redis.cli(&["CLIENT", "LIST", "TYPE", "pubsub"])?;
    let ids: Vec<&str> = list
        .lines()
        .filter(|l| l.contains(&format!(" addr={addr}:")))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .collect();
    for id in &ids {
        redis.cli(&["CLIENT", "KILL", "ID", id])?;
    }
    Ok(ids.len())
}

#[test]
fn requests_in_flight_fail_cleanly_when_a_side_resubscribes_and_redis_restarts_are_survived() -> Result<()> {
    let mut relay = RelayLab::start(1, "")?;
    let agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    relay.knock()?;
    ensure!(status_of(&relay.curl(HOST, "/", &[])?) == Some(200));
    // Each side alone losing its subscription fails what was in flight.
    for side in [Role::Node(1), Role::Agent] {
        let in_flight = std::thread::scope(|s| -> Result<Output> {
            let lab = &relay.lab;
            let waiting = s.spawn(move || curl(lab, SHARED_ADDR.into(), HOST, "/slow/2", &[]));
            std::thread::sleep(Duration::from_millis(500));
            ensure!(cut_subscriptions(&relay.redis, &side.addr().to_string())? >= 1);
            waiting.join().map_err(|_| anyhow::anyhow!("curl thread panicked"))?
        })?;
        ensure!(
            status_of(&in_flight) == Some(502),
            "in flight while {side:?} subscribed again: {in_flight:?}\n{}\n{}",
            agent.log(),
            relay.daemons[0].log()
        );
        let back = eventually(Duration::from_secs(5), || {
            Ok(status_of(&relay.curl(HOST, "/", &["--max-time", "2"])?) == Some(200))
        })?;
        ensure!(back, "no request got through after {side:?} subscribed again");
    }
    relay.redis.restart()?;
    let back = eventually(Duration::from_secs(10), || {
        Ok(status_of(&relay.curl(HOST, "/", &["--max-time", "2"])?) == Some(200))
    })?;
    ensure!(back, "no request got through after Redis restarted");
    Ok(())
}

#[test]
fn a_revoked_agent_is_refused_at_once_and_told_to_stop() -> Result<()> {
    let relay = RelayLab::start(1, "")?;
    let mut agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    relay.knock()?;
    ensure!(status_of(&relay.curl(HOST, "/", &[])?) == Some(200));
    let out = relay.cli(&["relay", "revoke", "web"])?;
    ensure!(out.contains("applied by every running node"), "{out}");
    let out = relay.curl(HOST, "/", &[])?;
    ensure!(status_of(&out) == Some(404), "revoked: not published any more: {out:?}");
    let status = agent.wait_exit(Duration::from_secs(10))?;
    ensure!(!status.success(), "the agent exits with an error");
    ensure!(agent.log().contains("revoked"), "and says why: {}", agent.log());
    Ok(())
}

#[test]
fn garbage_and_replayed_messages_are_dropped_and_counted() -> Result<()> {
    let mut relay = RelayLab::start(1, "")?;
    let mut agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    relay.knock()?;
    // Record every message on the agent's channels during a few requests.
    let url = relay.redis.url();
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = Arc::new(AtomicBool::new(false));
    let listening = ready.clone();
    relay.lab.in_ns(Role::Store, move || -> Result<()> {
        let client = redis::Client::open(url)?;
        let mut con = client.get_connection()?;
        std::thread::spawn(move || -> Result<()> {
            let mut pubsub = con.as_pubsub();
            pubsub.psubscribe("gatekeeper:relay:web:*")?;
            pubsub.set_read_timeout(Some(Duration::from_secs(5)))?;
            listening.store(true, Ordering::Relaxed);
            while let Ok(msg) = pubsub.get_message() {
                let channel: String = msg.get_channel_name().to_string();
                if tx.send((channel, msg.get_payload_bytes().to_vec())).is_err() {
                    break;
                }
            }
            Ok(())
        });
        Ok(())
    })??;
    ensure!(eventually(
        Duration::from_secs(3),
        || Ok(ready.load(Ordering::Relaxed))
    )?);
    for _ in 0..3 {
        ensure!(status_of(&relay.curl(HOST, "/sha256", &["--data-binary", "x"])?) == Some(200));
    }
    std::thread::sleep(Duration::from_millis(300));
    let captured: Vec<(String, Vec<u8>)> = rx.try_iter().collect();
    ensure!(
        captured.iter().filter(|(c, _)| c.ends_with(":up:gw-1")).count() >= 6,
        "captured {} messages",
        captured.len()
    );
    // Replayed as they were, truncated, flipped, and plain noise.
    let mut publish = Vec::new();
    for (channel, msg) in &captured {
        publish.push((channel.clone(), msg.clone()));
        publish.push((channel.clone(), msg[..msg.len() / 2].to_vec()));
        let mut flipped = msg.clone();
        if let Some(last) = flipped.last_mut() {
            *last ^= 0x55;
        }
        publish.push((channel.clone(), flipped));
    }
    let mut noise = 0x9e37_79b9_u32;
    for channel in [
        "gatekeeper:relay:web:up:gw-1",
        "gatekeeper:relay:web:down",
        "gatekeeper:relay:web:hello",
    ] {
        for len in [0usize, 1, 9, 100, 70_000] {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    noise ^= noise << 13;
                    noise ^= noise >> 17;
                    noise ^= noise << 5;
                    noise as u8
                })
                .collect();
            publish.push((channel.to_string(), bytes));
        }
    }
    let url = relay.redis.url();
    relay.lab.in_ns(Role::Store, move || -> Result<()> {
        let mut con = redis::Client::open(url)?.get_connection()?;
        for (channel, msg) in publish {
            redis::cmd("PUBLISH").arg(channel).arg(msg).query::<i64>(&mut con)?;
        }
        Ok(())
    })??;
    ensure!(relay.daemons[0].running(), "the gateway survived");
    ensure!(agent.running(), "the agent survived:\n{}", agent.log());
    let out = relay.curl(HOST, "/", &[])?;
    ensure!(status_of(&out) == Some(200), "still served: {out:?}");
    let dropped = &relay.status(1)?["relay"]["dropped"];
    ensure!(dropped["replayed"].as_u64() >= Some(3), "{dropped}");
    ensure!(
        dropped["malformed"].as_u64().unwrap_or(0) + dropped["undecryptable"].as_u64().unwrap_or(0) >= 6,
        "{dropped}"
    );
    Ok(())
}

#[test]
fn requests_at_either_node_reach_the_agent() -> Result<()> {
    let relay = RelayLab::start(2, "")?;
    let mut agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    ensure!(
        eventually(Duration::from_secs(5), || Ok(agent
            .log()
            .matches("relay session established")
            .count()
            >= 2))?,
        "the agent holds a session with both nodes:\n{}",
        agent.log()
    );
    relay.knock()?;
    for n in [1u8, 2] {
        let out = curl(&relay.lab, Role::Node(n).addr().into(), HOST, "/", &[])?;
        ensure!(body(&out) == "hello from web\n", "through node {n}: {out:?}");
        ensure!(
            relay.status(n)?["relay"]["requests"].as_u64() >= Some(1),
            "node {n} relayed it"
        );
    }
    ensure!(agent.running());
    Ok(())
}

#[test]
fn an_agent_with_a_redis_user_of_its_own_reaches_only_its_own_channels() -> Result<()> {
    let mut relay = RelayLab::start(1, "")?;
    let cams = relay.lab.scratch().join("cams.relay");
    let cams_arg = cams.to_string_lossy().into_owned();
    relay.cli(&[
        "relay",
        "issue",
        "cams",
        "--host",
        "cams.lab.example",
        "--owner",
        "ops",
        "--allow",
        "laptop",
        "--redis-user",
        "--out",
        &cams_arg,
    ])?;
    let user = "gatekeeper-relay-cams";
    let cred: toml::Value = toml::from_str(&std::fs::read_to_string(&cams)?)?;
    let url = cred["redis"].as_str().unwrap_or("");
    ensure!(url.starts_with(&format!("redis://{user}:")), "{url}");
    relay.serve_http(Role::Agent, SERVICE_PORT + 1, "cams")?;
    let mut agent = relay.start_agent(&cams, SERVICE_PORT + 1)?;
    relay.knock()?;
    let out = relay.curl("cams.lab.example", "/", &[])?;
    ensure!(body(&out) == "hello from cams\n", "through its own user: {out:?}");
    // What the user may do, asked of Redis's own ACL checks.
    for (command, allowed) in [
        (&["SUBSCRIBE", "gatekeeper:relay:cams:down"][..], true),
        (&["PUBLISH", "gatekeeper:relay:cams:up:gw-1", "x"], true),
        (&["SUBSCRIBE", "gatekeeper:relay:web:down"], false),
        (&["PSUBSCRIBE", "gatekeeper:relay:*"], false),
        (&["PUBLISH", "gatekeeper:relay:web:up:gw-1", "x"], false),
        (&["HGETALL", "gatekeeper:relays"], false),
        (&["GET", "gatekeeper:server_key"], false),
    ] {
        let out = relay.redis.cli(&[&["ACL", "DRYRUN", user][..], command].concat())?;
        ensure!((out.trim() == "OK") == allowed, "{command:?}: {out}");
    }
    // Redis restarted empty (no ACL file): the node makes the user again.
    relay.redis.restart()?;
    let back = eventually(Duration::from_secs(15), || {
        Ok(status_of(&relay.curl("cams.lab.example", "/", &["--max-time", "2"])?) == Some(200))
    })?;
    ensure!(
        back,
        "the agent's user did not come back with the records:\n{}",
        agent.log()
    );
    let out = relay.cli(&["relay", "revoke", "cams"])?;
    ensure!(out.contains(&format!("deleted its Redis user {user}")), "{out}");
    agent.wait_exit(Duration::from_secs(10))?;
    ensure!(agent.log().contains("revoked"), "the agent was told: {}", agent.log());
    ensure!(!relay.redis.cli(&["ACL", "USERS"])?.contains(user), "the user is gone");
    Ok(())
}

#[test]
fn the_portal_hands_a_relayed_host_asked_for_by_sni_to_its_agent() -> Result<()> {
    let relay = RelayLab::start(1, "[portal]\nlisten = \"0.0.0.0:443\"\nupstream = \"127.0.0.1:9\"\n")?;
    let _agent = relay.start_agent(&relay.credential, SERVICE_PORT)?;
    let cred = relay.client.to_string_lossy().into_owned();
    let portal = format!("{SHARED_ADDR}:443");
    let mut locals = Vec::new();
    for (port, sni) in [(18080u16, Some(HOST)), (18081, None)] {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["portal", "--credential", &cred, "-L", &listen, &portal];
        if let Some(name) = sni {
            args.extend(["--sni", name]);
        }
        locals.push(
            relay
                .lab
                .start_gatekeeper_on(Role::Client, &args, "carrying local connections")?,
        );
    }
    let get = |port: u16| {
        let url = format!("http://127.0.0.1:{port}/headers");
        curl_url(&relay.lab, &url, HOST, &["--max-time", "10"])
    };
    let out = get(18080)?;
    let seen: serde_json::Value = serde_json::from_str(&body(&out)).with_context(|| {
        let audit = relay.lab.audit_of(Role::Node(1)).unwrap_or_default();
        format!(
            "through the portal by SNI: {:?}",
            audit.iter().rev().take(2).collect::<Vec<_>>()
        )
    })?;
    let client = Role::Client.addr().to_string();
    ensure!(
        seen["forwarded"]
            .as_str()
            .is_some_and(|f| f.contains(&format!("for={client}")) && f.contains("proto=https")),
        "{seen}"
    );
    let out = get(18081)?;
    ensure!(
        body(&out).is_empty(),
        "without the relayed host's name the portal's upstream (nobody) gets the session: {out:?}"
    );
    Ok(())
}
