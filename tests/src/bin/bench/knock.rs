//! `cargo xtask bench knock`:
//!
//! 1. Knocks verified per second on one core: the daemon's verifier over
//!    100,000 distinct valid v1 knocks, with an in-memory replay set and
//!    with the pinned replay map the daemon really uses (target 100,000/s);
//!    20,000 v2 knocks, which cost an X25519 more (target 30,000/s); the
//!    stock fwknop client's packets with 300 fwknop clients enrolled, the
//!    packet's key tried last.
//! 2. Knock-to-open latency, p50 and p99 over 1,000 knocks each: from the
//!    client sending a UDP knock to the first UDP probe (sent every 20 µs)
//!    that the opened port echoes back. Gatekeeper with v2 knocks and with
//!    the stock fwknop client's packets, against fwknopd 2.6.10 from
//!    Debian (UDP server mode, iptables) in the same lab, with pre-built
//!    packets on every side so none pays for process start-up, and 5 ms
//!    between trials. Target: p99 under 2 ms.
//! 3. Spoofed floods at the generator's top rate, a fresh source address
//!    per packet (XDP_TX live frames), while a real client knocks 50 times
//!    (v2): (a) v1 and v2 garbage and replays of a captured knock, (b) v1
//!    knocks carrying another enrolled client's key id (leaked: v1 sends
//!    it in the clear), (c) v2 knocks with valid flood tags (a leaked
//!    credential), then the same flood after `rotate-key`. Measured: the
//!    flood's rate, knocks that reach the daemon per second and its CPU,
//!    the real knocks' p99 and slowest time to open (target 100 ms), the
//!    daemon's memory before and after, audit bytes per second.

use std::{
    collections::HashSet,
    net::{IpAddr, UdpSocket},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use gatekeeper::{
    gate::{Gate, GateError, loader},
    knock::{
        Carrier,
        credential::Credential,
        fwknop::FwknopKeys,
        send::{Knocker, Request},
        verify::{Client, ClientKeys, Knock, Registry, ReplayError, Standing, Verifier},
    },
    spec::{PortRange, Proto},
    store::{NewClient, Store, files::FileStore},
};
use gatekeeper_tests::{
    frames::{FrameSpec, Rng, udp},
    lab::{Lab, Pins, Role, rss_kib, sh},
    traffic::transmit,
};

use crate::Row;

const PROBE_PORT: u16 = 5353;
const KNOCK_PORT: u16 = 62201;
const TRIALS: usize = 1000;
/// A pause after each trial, so each knock meets a gateway that has
/// finished with the one before (its audit line, the echo): knocks from
/// one client do not come every quarter millisecond.
const BETWEEN_TRIALS: Duration = Duration::from_millis(5);
/// In the latency trials the client's busy-polling prober has CPU 0 and
/// the gateway's side (the daemon or fwknopd, and the echo service) CPU 1:
/// sharing a CPU with a busy loop, a woken server waits for the scheduler's
/// time slice (milliseconds), which would measure the machine, not the
/// knock.
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

pub fn run(rows: &mut Vec<Row>) -> Result<()> {
    verification_rate(rows)?;
    latency(rows)?;
    flood(rows, Flood::GarbageAndReplays)?;
    flood(rows, Flood::LeakedKeyId)?;
    flood(rows, Flood::LeakedTagKey)
}

fn udp5353() -> Request {
    Request {
        proto: Proto::Udp,
        ports: PortRange {
            lo: PROBE_PORT,
            hi: PROBE_PORT,
        },
        source_port: None,
    }
}

/// A verifier for one enrolled client and `n` distinct valid knocks of
/// `version` (1 or 2) from it, with the temporary state directory they
/// came from (removed on drop).
pub(crate) fn verifier_and_knocks(n: usize, version: u8) -> Result<(Verifier, Vec<Knock>, TempState)> {
    let dir = TempState(std::env::temp_dir().join(format!("gk-bench-knock-{}-{n}-v{version}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let store = FileStore::new(&dir.0);
    let gw: IpAddr = "192.0.2.1".parse()?;
    store.init(&[gw], false)?;
    let (rec, mut cred) = store.add_client(&NewClient {
        name: "bench".into(),
        allow: "udp/5353".parse()?,
        expires_in: None,
        nat: false,
        portal_upstream: None,
        public_key: None,
        gateway: None,
        fwknop: None,
        open_for: None,
    })?;
    let mut registry = Registry::default();
    registry.insert(Client::new(
        ClientKeys::derive(&store.server_keys()?, &rec.public()?)?,
        Standing {
            name: rec.name.clone(),
            id: rec.id,
            policy: rec.policy(),
            enabled: true,
            nat: false,
            expires: None,
            portal_upstream: None,
            fwknop: None,
            open_for: None,
        },
    ));
    let mut verifier = Verifier::new(registry, vec![gw], 120, Duration::from_secs(30));
    verifier.set_server(&store.server_keys()?);
    cred.knock_version = Some(version);
    let k = Knocker::new(cred)?;
    let src: IpAddr = "10.0.0.2".parse()?;
    let mut payload = k.payload(gw, &udp5353(), 0)?;
    payload.local_ip = src;
    let knocks: Vec<Knock> = (0..n)
        .map(|_| {
            Ok(Knock {
                src,
                dst: gw,
                sport: 40000,
                dport: KNOCK_PORT,
                carrier: Carrier::Udp,
                payload: k.seal(&payload)?,
                seen_ns: 0,
            })
        })
        .collect::<Result<_>>()?;
    Ok((verifier, knocks, dir))
}

/// A state directory of the bench's own, removed on drop.
pub(crate) struct TempState(std::path::PathBuf);

impl Drop for TempState {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Knocks verified per second by `verifier` over `knocks` (all distinct
/// and valid), with an in-memory replay set.
fn in_memory_rate(verifier: &Verifier, knocks: &[Knock]) -> Result<f64> {
    let now = gatekeeper::clock::unix_now();
    let mut seen = HashSet::with_capacity(knocks.len());
    let started = Instant::now();
    let accepted = knocks
        .iter()
        .filter(|d| verifier.check(d, now, |n, _| Ok(seen.insert(*n))).outcome.is_ok())
        .count();
    let rate = knocks.len() as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        accepted == knocks.len(),
        "only {accepted} of {} knocks verified",
        knocks.len()
    );
    Ok(rate)
}

/// v2 knocks verified per second on one core (in-memory replay set):
/// each costs an X25519 with the knock's ephemeral key on top of v1's work.
fn v2_verification_rate() -> Result<f64> {
    const N: usize = 20_000;
    let (verifier, knocks, _dir) = verifier_and_knocks(N, 2)?;
    let rate = in_memory_rate(&verifier, &knocks)?;
    println!("      {rate:.0}/s v2 knocks (no key id: one more X25519 each), in-memory replay set");
    Ok(rate)
}

/// fwknop clients enrolled in the HMAC-search measurement.
const FWKNOP_CLIENTS: usize = 300;

/// fwknop packets verified per second on one core with
/// [`FWKNOP_CLIENTS`] fwknop clients enrolled, each packet from the
/// client the daemon tries last: fwknop sends no key id, so the daemon
/// tries each client's HMAC key, and this one's is found after every
/// other's.
fn fwknop_verification_rate() -> Result<f64> {
    const PACKETS: usize = 200;
    const ROUNDS: usize = 20;
    let dir = TempState(std::env::temp_dir().join(format!("gk-bench-fwknop-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let store = FileStore::new(&dir.0);
    let gw: IpAddr = "192.0.2.1".parse()?;
    store.init(&[gw], false)?;
    let server = store.server_keys()?;
    let mut registry = Registry::default();
    let mut keys_of = std::collections::HashMap::new();
    for i in 0..FWKNOP_CLIENTS {
        let (rec, _) = store.add_client(&NewClient {
            name: format!("old{i}"),
            allow: "udp/5353".parse()?,
            expires_in: None,
            nat: false,
            portal_upstream: None,
            public_key: None,
            gateway: None,
            fwknop: Some(FwknopKeys::generate()),
            open_for: None,
        })?;
        let keys = rec.fwknop.clone().context("fwknop keys")?;
        registry.insert(Client::new(
            ClientKeys::derive(&server, &rec.public()?)?,
            Standing {
                name: rec.name.clone(),
                id: rec.id,
                policy: rec.policy(),
                enabled: true,
                nat: false,
                expires: None,
                portal_upstream: None,
                fwknop: Some(keys.key()?),
                open_for: None,
            },
        ));
        keys_of.insert(rec.name.clone(), keys);
    }
    let tried_last = registry.clients().last().context("no client")?.name.clone();
    let last = keys_of.remove(&tried_last).context("the last client's keys")?;
    let mut verifier = Verifier::new(registry, vec![gw], 120, Duration::from_secs(30));
    verifier.set_server(&server);
    let src: IpAddr = "10.0.0.2".parse()?;
    let packets: Vec<Knock> = (0..PACKETS)
        .map(|_| {
            Ok(Knock {
                src,
                dst: gw,
                sport: 40000,
                dport: KNOCK_PORT,
                carrier: Carrier::Udp,
                payload: spa_packet(
                    &dir.0,
                    &gw.to_string(),
                    &src.to_string(),
                    &last.key_base64,
                    &last.hmac_key_base64,
                )?,
                seen_ns: 0,
            })
        })
        .collect::<Result<_>>()?;
    let now = gatekeeper::clock::unix_now();
    let started = Instant::now();
    let mut accepted = 0;
    for _ in 0..ROUNDS {
        // Every round accepts every packet again: the replay cache is
        // measured with v1's knocks above.
        accepted += packets
            .iter()
            .filter(|k| verifier.check_fwknop(k, now, |_, _| Ok(true)).0.outcome.is_ok())
            .count();
    }
    let rate = (PACKETS * ROUNDS) as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(accepted == PACKETS * ROUNDS, "only {accepted} fwknop packets verified");
    println!("      {rate:.0}/s fwknop packets, the HMAC key found after {FWKNOP_CLIENTS} clients' keys");
    Ok(rate)
}

fn verification_rate(rows: &mut Vec<Row>) -> Result<()> {
    const N: usize = 100_000;
    println!("[1/3] verifying {N} distinct knocks on one core");
    let (verifier, knocks, _dir) = verifier_and_knocks(N, 1)?;
    let now = gatekeeper::clock::unix_now();
    let in_memory = in_memory_rate(&verifier, &knocks)?;

    let pins = Pins::new()?;
    let _ebpf = loader::load_pinned(pins.dir(), 65536, loader::Instance::default())?;
    let gate = Gate::open(pins.dir())?;
    let started = Instant::now();
    let accepted = knocks
        .iter()
        .filter(|d| {
            verifier
                .check(d, now, |n, until| {
                    gate.replay_record(n, until).map_err(|e| match e {
                        GateError::ReplayFull => ReplayError::Full,
                        other => ReplayError::Failed(other.to_string()),
                    })
                })
                .outcome
                .is_ok()
        })
        .count();
    let pinned = N as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        accepted == N,
        "only {accepted} of {N} knocks verified with the pinned replay map"
    );
    println!("      {in_memory:.0}/s with an in-memory replay set, {pinned:.0}/s with the pinned replay map");
    let v2 = v2_verification_rate()?;
    let fwknop = fwknop_verification_rate()?;
    rows.push(Row {
        what: "knocks verified/s, one core, in-memory replay set".into(),
        value: in_memory,
        unit: "knocks/s",
        ratio: Some((in_memory / 100_000.0, ">=", 1.0)),
    });
    rows.push(Row {
        what: "knocks verified/s, one core, pinned replay map".into(),
        value: pinned,
        unit: "knocks/s",
        ratio: Some((pinned / 100_000.0, ">=", 1.0)),
    });
    rows.push(Row {
        what: "v2 knocks verified/s, one core, in-memory replay set".into(),
        value: v2,
        unit: "knocks/s",
        ratio: Some((v2 / 30_000.0, ">=", 1.0)),
    });
    rows.push(Row {
        what: "v2 knocks verified/s as a share of v1's, same conditions".into(),
        value: v2 / in_memory,
        unit: "x of v1",
        ratio: None,
    });
    rows.push(Row {
        what: format!("fwknop packets verified/s, one core, {FWKNOP_CLIENTS} fwknop clients"),
        value: fwknop,
        unit: "packets/s",
        // Against fwknopd's own pace, a few thousand a second (below).
        ratio: None,
    });
    Ok(())
}

/// From sending `packet` to the knock port until a probe to the opened port
/// comes back; `None` if nothing opened within a second.
fn time_to_open(lab: &Lab, packet: Vec<u8>) -> Result<Option<Duration>> {
    let gw = Role::Gateway.addr();
    lab.in_ns(Role::Client, move || -> Result<Option<Duration>> {
        pin_to(CLIENT_CPU)?;
        let knock = UdpSocket::bind("0.0.0.0:0")?;
        let probe = UdpSocket::bind("0.0.0.0:0")?;
        probe.set_nonblocking(true)?;
        let mut buf = [0u8; 64];
        let start = Instant::now();
        knock.send_to(&packet, (gw, KNOCK_PORT))?;
        while start.elapsed() < Duration::from_secs(1) {
            probe.send_to(b"probe", (gw, PROBE_PORT))?;
            let sent = Instant::now();
            while sent.elapsed() < Duration::from_micros(20) {
                if probe.recv_from(&mut buf).is_ok() {
                    return Ok(Some(start.elapsed()));
                }
            }
        }
        Ok(None)
    })?
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; the call acts on this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pins every thread of process `pid` to `cpu`.
fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    sh(&["taskset", "-a", "-pc", &cpu.to_string(), &pid.to_string()])?;
    Ok(())
}

/// A UDP echo service on the gateway's `port`, its thread on `cpu`,
/// answering until `stop` is set.
fn pinned_echo(lab: &Lab, port: u16, cpu: usize, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let sock = lab.in_ns(Role::Gateway, move || UdpSocket::bind(("::", port)))??;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(std::thread::spawn(move || {
        if pin_to(cpu).is_err() {
            return;
        }
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    }))
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn summarize(name: &str, mut samples: Vec<Duration>, failed: usize) -> (f64, f64) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!(
        "      {name}: p50 {p50:.3} ms, p99 {p99:.3} ms ({} opened, {failed} did not within 1 s)",
        samples.len()
    );
    (p50, p99)
}

fn latency(rows: &mut Vec<Row>) -> Result<()> {
    println!(
        "[2/3] knock-to-open latency, {TRIALS} knocks each: gatekeeper (v2 knocks, then the stock fwknop client's packets), then fwknopd"
    );
    let lab = Lab::new()?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = pinned_echo(&lab, PROBE_PORT, SERVER_CPU, stop.clone())?;

    let cred = lab.enroll("bench", &["--allow", "udp/5353"])?;
    let said = lab.state_cli(&[
        "client",
        "add",
        "oldphone",
        "--allow",
        "udp/5353",
        "--fwknop",
        "--out",
        lab.scratch()
            .join("oldphone.credential.toml")
            .to_str()
            .context("utf-8 path")?,
    ])?;
    let (_, stanza) = gatekeeper_tests::fwknop::write_stanza(&lab, &said, "oldphone")?;
    let stanza_value = |name: &str| {
        stanza
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .with_context(|| format!("no {name} in {stanza}"))
    };
    let (key, hmac) = (stanza_value("KEY_BASE64")?, stanza_value("HMAC_KEY_BASE64")?);
    // One source and one key knock a thousand times in a row: lift the
    // per-source and per-key knock limits, which would otherwise (rightly)
    // drop most of them.
    let config = lab.scratch().join("bench.toml");
    std::fs::write(
        &config,
        "[knock]\nrate = 100000\nburst = 100000\nkey_rate = 100000\nkey_burst = 100000\n",
    )?;
    let daemon = lab.start_daemon(&[
        "--protect",
        "udp/5353",
        "--config",
        config.to_str().context("utf-8 path")?,
    ])?;
    pin_process(daemon.pid().context("daemon pid")?, SERVER_CPU)?;
    let knocks: Vec<Vec<u8>> = lab.with_knocker(Role::Client, &cred, |k, gw| {
        (0..TRIALS).map(|_| Ok(k.build(gw, &udp5353(), 0)?)).collect()
    })?;
    let gate = Gate::open(lab.pin_dir())?;
    let (mut ours, mut ours_failed) = (Vec::new(), 0);
    for packet in knocks {
        gate.whitelist_flush()?;
        match time_to_open(&lab, packet)? {
            Some(d) => ours.push(d),
            None => ours_failed += 1,
        }
        std::thread::sleep(BETWEEN_TRIALS);
    }
    // The stock fwknop client's packets, on the same daemon.
    let (gw, client) = (Role::Gateway.addr().to_string(), Role::Client.addr().to_string());
    let packets: Vec<Vec<u8>> = (0..TRIALS)
        .map(|_| spa_packet(lab.scratch(), &gw, &client, &key, &hmac))
        .collect::<Result<_>>()?;
    let (mut old, mut old_failed) = (Vec::new(), 0);
    for packet in packets {
        gate.whitelist_flush()?;
        match time_to_open(&lab, packet)? {
            Some(d) => old.push(d),
            None => old_failed += 1,
        }
        std::thread::sleep(BETWEEN_TRIALS);
    }
    drop(daemon);
    lab.cli_ok(&["detach"])?;

    let (mut theirs, mut theirs_failed) = (Vec::new(), 0);
    let fwknopd = Fwknopd::start(&lab)?;
    pin_process(fwknopd.child.id(), SERVER_CPU)?;
    for _ in 0..TRIALS {
        let packet = spa_packet(lab.scratch(), &gw, &client, &fwknopd.key, &fwknopd.hmac)?;
        lab.exec(Role::Gateway, &["iptables", "-F", "FWKNOP_INPUT"])?;
        match time_to_open(&lab, packet)? {
            Some(d) => theirs.push(d),
            None => theirs_failed += 1,
        }
        std::thread::sleep(BETWEEN_TRIALS);
    }
    drop(fwknopd);
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    if ours.is_empty() || old.is_empty() || theirs.is_empty() {
        bail!(
            "no knock opened: gatekeeper {} of {TRIALS}, fwknop packets on gatekeeper {} of {TRIALS}, fwknopd {} of {TRIALS}",
            ours.len(),
            old.len(),
            theirs.len()
        );
    }
    let (g50, g99) = summarize("gatekeeper, v2 knocks", ours, ours_failed);
    let (o50, o99) = summarize("fwknop packets on gatekeeper", old, old_failed);
    let (f50, f99) = summarize("fwknopd 2.6.10 + iptables", theirs, theirs_failed);
    rows.push(Row {
        what: "knock-to-open p50, fwknop packets: gatekeeper vs fwknopd".into(),
        value: o50,
        unit: "ms",
        ratio: Some((o50 / f50, "<=", 1.0)),
    });
    rows.push(Row {
        what: "knock-to-open p99, fwknop packets: gatekeeper vs fwknopd".into(),
        value: o99,
        unit: "ms",
        ratio: Some((o99 / f99, "<=", 1.0)),
    });
    rows.push(Row {
        what: "knock-to-open p50, fwknop packets vs v2 knocks on gatekeeper".into(),
        value: o50,
        unit: "ms",
        ratio: Some((o50 / g50, "<=", 1.5)),
    });
    rows.push(Row {
        what: "knock-to-open p50, v2 knocks: gatekeeper vs fwknopd".into(),
        value: g50,
        unit: "ms",
        ratio: Some((g50 / f50, "<=", 1.0)),
    });
    rows.push(Row {
        what: "knock-to-open p99, v2 knocks: gatekeeper vs fwknopd".into(),
        value: g99,
        unit: "ms",
        ratio: Some((g99 / f99, "<=", 1.0)),
    });
    rows.push(Row {
        what: "knock-to-open p99, v2 knocks vs the 2 ms target".into(),
        value: g99,
        unit: "ms",
        ratio: Some((g99 / 2.0, "<=", 1.0)),
    });
    rows.push(Row {
        what: "knock-to-open p50, fwknopd".into(),
        value: f50,
        unit: "ms",
        ratio: None,
    });
    rows.push(Row {
        what: "knock-to-open p99, fwknopd".into(),
        value: f99,
        unit: "ms",
        ratio: None,
    });
    Ok(())
}

/// fwknopd from Debian in the gateway's namespace, UDP server mode, opening
/// udp/5353 with iptables for whoever sends a valid SPA packet.
struct Fwknopd {
    child: Child,
    key: String,
    hmac: String,
}

impl Fwknopd {
    fn start(lab: &Lab) -> Result<Fwknopd> {
        let keys = sh(&["fwknop", "--key-gen"])?;
        let keys = String::from_utf8_lossy(&keys.stdout).into_owned();
        let value = |name: &str| {
            keys.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .with_context(|| format!("fwknop --key-gen printed no {name}"))
        };
        let (key, hmac) = (value("KEY_BASE64:")?, value("HMAC_KEY_BASE64:")?);
        let dir = lab.scratch().join("fwknop");
        std::fs::create_dir_all(dir.join("run"))?;
        let private = |path: &Path, text: String| -> Result<()> { Ok(gatekeeper::private_file::write(path, &text)?) };
        private(
            &dir.join("fwknopd.conf"),
            format!(
                "PCAP_INTF {}\nENABLE_UDP_SERVER Y\nUDPSERV_PORT {KNOCK_PORT}\nFLUSH_IPT_AT_INIT Y\nFLUSH_IPT_AT_EXIT Y\nENABLE_DIGEST_PERSISTENCE N\nFWKNOP_RUN_DIR {}\n",
                Role::Gateway.iface(),
                dir.join("run").display()
            ),
        )?;
        private(
            &dir.join("access.conf"),
            format!(
                "SOURCE ANY\nOPEN_PORTS udp/{PROBE_PORT}\nKEY_BASE64 {key}\nHMAC_KEY_BASE64 {hmac}\nFW_ACCESS_TIMEOUT 30\n"
            ),
        )?;
        lab.exec(
            Role::Gateway,
            &[
                "iptables",
                "-A",
                "INPUT",
                "-p",
                "udp",
                "--dport",
                &PROBE_PORT.to_string(),
                "-j",
                "DROP",
            ],
        )?;
        let log = std::fs::File::create(dir.join("fwknopd.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(Role::Gateway), "fwknopd", "-f", "-U", "-c"])
            .arg(dir.join("fwknopd.conf"))
            .arg("-a")
            .arg(dir.join("access.conf"))
            .arg("-p")
            .arg(dir.join("run/fwknopd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let ready = gatekeeper_tests::lab::eventually(Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(dir.join("fwknopd.log"))?.contains("Kicking off UDP server"))
        })?;
        if !ready {
            bail!(
                "fwknopd did not start: {}",
                std::fs::read_to_string(dir.join("fwknopd.log"))?
            );
        }
        Ok(Fwknopd { child, key, hmac })
    }
}

/// A fresh SPA packet from the stock fwknop client asking to open
/// udp/5353 for `client` on `gw`, built (`--test`) but not sent; `dir`
/// holds its rc file and the packet.
fn spa_packet(dir: &Path, gw: &str, client: &str, key: &str, hmac: &str) -> Result<Vec<u8>> {
    let path = dir.join("spa.packet");
    let _ = std::fs::remove_file(&path);
    let open = format!("udp/{PROBE_PORT}");
    let out = Command::new("fwknop")
        .arg("--rc-file")
        .arg(dir.join("bench.fwknoprc"))
        .args(["-A", &open, "-a", client, "-D", gw, "--use-hmac"])
        .args(["--key-base64-rijndael", key, "--key-base64-hmac", hmac])
        .arg("--save-packet")
        .arg(&path)
        .arg("--test")
        .output()?;
    anyhow::ensure!(out.status.success(), "fwknop: {}", String::from_utf8_lossy(&out.stdout));
    Ok(std::fs::read_to_string(&path)?.trim().as_bytes().to_vec())
}

impl Drop for Fwknopd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a spoofed flood carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flood {
    /// Garbage with the knock prefixes (v1's with unknown key ids, v2's
    /// without a valid flood tag), and replays of a knock captured from
    /// the real client.
    GarbageAndReplays,
    /// Knocks with a bad tag and another enrolled client's key id.
    LeakedKeyId,
    /// v2 knocks with valid flood tags (a leaked credential names the
    /// gateway's public knock key, which the tag key derives from) and
    /// noise the daemon cannot open; then `rotate-key`, while the flood
    /// goes on unchanged.
    LeakedTagKey,
}

impl Flood {
    fn label(self) -> &'static str {
        match self {
            Flood::GarbageAndReplays => "v1 and v2 garbage + replays",
            Flood::LeakedKeyId => "leaked key id",
            Flood::LeakedTagKey => "leaked v2 tag key",
        }
    }
}

/// What one round of real knocks met during a flood.
struct Round {
    samples: Vec<Duration>,
    failed: usize,
    /// Knocks per second that reached the daemon, the real ones included.
    reached: f64,
    audit_bytes: f64,
    /// The daemon's CPU time over the round's wall time.
    daemon_cpu: f64,
}

/// The CPU time (user and system) the process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses: utime and
    // stime are the 12th and 13th, in clock ticks (100 a second on Linux).
    let rest = stat.rsplit_once(')').context("/proc/PID/stat without a command")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> { Ok(fields.get(i).context("short /proc/PID/stat")?.parse::<f64>()?) };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// The flood's v2 knocks under a leaked tag key: each with a fresh
/// ephemeral key and nonce and a valid tag, the sealed parts noise.
fn tagged_noise(server: &str, n: usize) -> Result<Vec<Vec<u8>>> {
    let tag_key = gatekeeper::knock::wire::v2::tag_key(&gatekeeper::knock::keys::decode_public(server)?);
    let mut rng = Rng::new(97);
    Ok((0..n)
        .map(|_| {
            let mut packet = gatekeeper_common::knock::PREFIX_V2.to_vec();
            packet.extend(rng.bytes(gatekeeper_common::knock::V2_MIN_LEN + 64 - 3));
            let at = gatekeeper_common::knock::V2_EPHEMERAL_AT;
            let nonce_at = packet.len() - gatekeeper::knock::wire::NONCE_LEN;
            let ephemeral: [u8; 32] = packet[at..at + 32].try_into().expect("32 bytes");
            let nonce: [u8; 24] = packet[nonce_at..].try_into().expect("24 bytes");
            let tag =
                gatekeeper_common::knock::flood_tag(tag_key, &gatekeeper_common::knock::tag_words(&ephemeral, &nonce));
            packet[gatekeeper_common::knock::V2_TAG_AT..gatekeeper_common::knock::V2_TAG_AT + 8]
                .copy_from_slice(&tag.to_le_bytes());
            packet
        })
        .collect())
}

fn flood(rows: &mut Vec<Row>, kind: Flood) -> Result<()> {
    const KNOCKS: usize = 50;
    let (step, what) = match kind {
        Flood::GarbageAndReplays => ("3a", "v1 and v2 garbage and replays of a captured knock"),
        Flood::LeakedKeyId => ("3b", "knocks with a leaked key id of another client"),
        Flood::LeakedTagKey => ("3c", "v2 knocks with valid flood tags from a leaked credential"),
    };
    println!(
        "[{step}/3] a spoofed flood ({what}), a fresh source per packet, at full speed while a real client knocks {KNOCKS} times"
    );
    let mut lab = Lab::direct()?;
    lab.serve_udp_echo(Role::Gateway, PROBE_PORT)?;
    // The real client knocks v2, as credentials now announce.
    let cred = lab.enroll("bench", &["--allow", "udp/5353"])?;
    // The leaked credential's knocks are v1, whose key id is in the clear.
    let leaked = lab.enroll("leaked", &["--allow", "udp/5353"])?;
    let text = std::fs::read_to_string(&leaked)?;
    gatekeeper::private_file::write(&leaked, &text.replace("knock_version = 2\n", ""))?;
    // Default knock limits: per source 20/s (bursts of 40), per key 10/s
    // (20), 2,000 a second per CPU.
    let daemon = lab.start_daemon(&["--protect", "udp/5353"])?;
    let pid = daemon.pid().context("daemon pid")?;
    let build = |lab: &Lab, cred: &Path| -> Result<Vec<Vec<u8>>> {
        lab.with_knocker(Role::Client, cred, |k, gw| {
            (0..KNOCKS).map(|_| Ok(k.build(gw, &udp5353(), 0)?)).collect()
        })
    };
    let knocks = build(&lab, &cred)?;
    let gw = Role::Gateway.addr();
    let payloads = match kind {
        Flood::GarbageAndReplays => {
            let captured = lab.with_knocker(Role::Client, &cred, |k, gw| Ok(k.build(gw, &udp5353(), 0)?))?;
            if time_to_open(&lab, captured.clone())?.is_none() {
                bail!("the knock to be captured did not open");
            }
            let mut garbage = gatekeeper_common::knock::PREFIX.to_vec();
            garbage.extend(Rng::new(99).bytes(120));
            let mut garbage_v2 = gatekeeper_common::knock::PREFIX_V2.to_vec();
            garbage_v2.extend(Rng::new(98).bytes(300));
            vec![garbage, garbage_v2, captured]
        }
        Flood::LeakedKeyId => {
            let mut forged = lab.with_knocker(Role::Client, &leaked, |k, gw| Ok(k.build(gw, &udp5353(), 0)?))?;
            let n = forged.len();
            forged[n - 30] ^= 0x40;
            vec![forged]
        }
        Flood::LeakedTagKey => tagged_noise(&Credential::load(&leaked)?.server_public_key, 4096)?,
    };
    let frames: Vec<Vec<u8>> = payloads
        .iter()
        .map(|p| FrameSpec::v4([198, 18, 0, 0], gw.octets(), udp(1024, KNOCK_PORT, p)).build())
        .collect();
    let gate = Gate::open(lab.pin_dir())?;
    let audit = lab.state_dir().join("audit.log");
    // Let the daemon settle, then take its resident size as the baseline.
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kib(pid)?;
    let diverted = |lab: &Lab| -> Result<u64> {
        let stats: serde_json::Value = serde_json::from_str(&lab.cli_ok(&["stats", "--json"])?)?;
        Ok(stats["knock_diverted"].as_u64().unwrap_or(0))
    };
    let round = |lab: &Lab, knocks: Vec<Vec<u8>>| -> Result<Round> {
        let (reached_before, audit_before, cpu_before, started) = (
            diverted(lab)?,
            std::fs::metadata(&audit)?.len(),
            cpu_seconds(pid)?,
            Instant::now(),
        );
        let (mut samples, mut failed) = (Vec::new(), 0);
        for packet in knocks {
            gate.whitelist_flush()?;
            match time_to_open(lab, packet)? {
                Some(d) => samples.push(d),
                None => failed += 1,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let window = started.elapsed().as_secs_f64();
        Ok(Round {
            samples,
            failed,
            reached: (diverted(lab)? - reached_before) as f64 / window,
            audit_bytes: (std::fs::metadata(&audit)?.len() - audit_before) as f64 / window,
            daemon_cpu: (cpu_seconds(pid)? - cpu_before) / window,
        })
    };
    let more = Arc::new(AtomicBool::new(true));
    let (during, rotated, sent, took) = std::thread::scope(|s| -> Result<_> {
        let flood = s.spawn(|| transmit(&lab, "transmit_spray", frames, 1 << 16, more.clone()));
        std::thread::sleep(Duration::from_millis(500));
        let during = round(&lab, knocks);
        // The operator's answer to a leaked tag key: rotate with a short
        // overlap; the refreshed device (here: a credential made after the
        // rotation) knocks on while the flood goes on unchanged.
        let rotated = match (&during, kind) {
            (Ok(_), Flood::LeakedTagKey) => Some((|| {
                lab.state_cli(&["rotate-key", "--overlap", "1s"])?;
                // The overlap ends, and the daemon looks every 2 s.
                std::thread::sleep(Duration::from_secs(4));
                let refreshed = lab.enroll("refreshed", &["--allow", "udp/5353"])?;
                round(&lab, build(&lab, &refreshed)?)
            })()),
            _ => None,
        };
        more.store(false, Ordering::Relaxed);
        let (sent, took) = flood.join().map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
        Ok((during?, rotated.transpose()?, sent, took))
    })?;
    let rss_after = rss_kib(pid)?;
    let stats = lab.cli_ok(&["stats", "--json"])?;
    let mpps = sent as f64 / took.as_secs_f64() / 1e6;
    println!("      flood {mpps:.2} Mpps for {took:.1?}");
    println!("      counters: {stats}");
    println!("      daemon resident memory {rss_before} KiB before, {rss_after} KiB after");
    drop(daemon);
    let label = kind.label();
    rows.push(Row {
        what: format!("spoofed flood ({label}), fresh source per packet"),
        value: mpps,
        unit: "Mpps",
        ratio: None,
    });
    if kind == Flood::LeakedTagKey {
        // The tags are valid: what reaches the daemon is bounded by the
        // sources' buckets and the CPUs' budgets, and real knocks compete
        // for the budget with the flood.
        let budget = 2000.0 * std::thread::available_parallelism()?.get() as f64;
        let opened = report(&during, "real knocks during the flood (tag key valid)", mpps);
        rows.push(Row {
            what: format!("knocks reaching the daemon/s vs the knock budget ({label})"),
            value: during.reached,
            unit: "knocks/s",
            ratio: Some((during.reached / budget, "<=", 1.05)),
        });
        rows.push(Row {
            what: format!("daemon CPU during the flood ({label})"),
            value: during.daemon_cpu * 100.0,
            unit: "% of a core",
            ratio: None,
        });
        rows.push(Row {
            what: format!("real knocks opened during the flood ({label})"),
            value: opened as f64,
            unit: "of 50",
            ratio: None,
        });
        let after = rotated.context("the rotation round did not run")?;
        report(&after, "real knocks after rotate-key", mpps);
        return round_rows(
            rows,
            &after,
            &format!("{label}, after rotate-key"),
            mpps,
            rss_before,
            rss_after,
        );
    }
    report(&during, "real knocks during the flood", mpps);
    round_rows(rows, &during, label, mpps, rss_before, rss_after)
}

/// Prints what a round met; returns how many real knocks opened.
fn report(round: &Round, name: &str, mpps: f64) -> usize {
    println!(
        "      {name}: {:.0} knocks/s reached the daemon (flood {mpps:.2} Mpps), daemon CPU {:.0}%, audit {:.0} bytes/s",
        round.reached,
        round.daemon_cpu * 100.0,
        round.audit_bytes
    );
    summarize(name, round.samples.clone(), round.failed);
    round.samples.len()
}

/// The rows of a round the flood must not disturb: everything is dropped
/// in the kernel, every real knock opens, quickly, and the daemon does
/// not grow.
fn round_rows(
    rows: &mut Vec<Row>,
    round: &Round,
    label: &str,
    mpps: f64,
    rss_before: u64,
    rss_after: u64,
) -> Result<()> {
    if round.samples.is_empty() {
        bail!(
            "no real knock opened during the flood ({label}; {} tried)",
            round.failed
        );
    }
    let mut sorted = round.samples.clone();
    sorted.sort();
    let p99 = percentile(&sorted, 0.99);
    let worst = sorted.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(p99);
    rows.push(Row {
        what: format!("knocks reaching the daemon/s vs the flood ({label})"),
        value: round.reached,
        unit: "knocks/s",
        ratio: Some((round.reached / (mpps * 1e6), "<=", 0.001)),
    });
    rows.push(Row {
        what: format!("real knocks opened during the flood ({label})"),
        value: round.samples.len() as f64,
        unit: "of 50",
        ratio: Some((round.samples.len() as f64 / 50.0, ">=", 1.0)),
    });
    rows.push(Row {
        what: format!("real knock p99 during the flood vs 100 ms ({label})"),
        value: p99,
        unit: "ms",
        ratio: Some((p99 / 100.0, "<=", 1.0)),
    });
    rows.push(Row {
        what: format!("slowest real knock during the flood vs 100 ms ({label})"),
        value: worst,
        unit: "ms",
        ratio: Some((worst / 100.0, "<=", 1.0)),
    });
    rows.push(Row {
        what: format!("daemon memory after the flood vs before ({label})"),
        value: rss_after as f64,
        unit: "KiB",
        ratio: Some((rss_after as f64 / rss_before as f64, "<=", 1.5)),
    });
    rows.push(Row {
        what: format!("audit written during the flood ({label})"),
        value: round.audit_bytes,
        unit: "bytes/s",
        ratio: None,
    });
    Ok(())
}
