//! `cargo xtask bench portal`: what authorizing inside the ClientHello is
//! worth, against the usual ways of running a TLS gateway, in one lab and
//! one run. Three servers in the gateway namespace, each on one core
//! (`taskset -c 1`, a single-threaded runtime), each relaying to the same
//! loopback echo service, all with the same ECDSA P-256 certificate:
//!
//! (a) the gatekeeper daemon's portal, clients knocking in the ClientHello
//!     (`PortalClient`, the code behind `gatekeeper portal`);
//! (b) rustls with mutual TLS: clients present an ECDSA P-256 certificate
//!     that rustls's WebPKI verifier checks against a CA;
//! (c) rustls with no client authentication.
//!
//! One operation is: TCP connect, TLS handshake, authorization, upstream
//! connect, one byte echoed end to end. Latency: p50/p99 of one operation
//! at a time, the three modes taking turns. Handshakes per second on one core: operations completed by 16
//! concurrent clients for a fixed time, divided by the CPU time the server
//! process used meanwhile (so the rate is the server's, even when the
//! client side, which shares this 2-vCPU machine, is the slower one).

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use gatekeeper::{
    knock::{credential::Credential, send::Knocker},
    portal::connector::PortalClient,
};
use gatekeeper_tests::{
    lab::{ChildGuard, Lab, Role, eventually},
    pki::LabCa,
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, copy_bidirectional},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tunnel::tls::{Fingerprint, Identity, Pinned};

use crate::Row;

const ECHO: u16 = 7000;
const KNOCK_PORT: u16 = 443;
const MTLS_PORT: u16 = 8444;
const PLAIN_PORT: u16 = 8445;
const WARMUP: usize = 50;
const LATENCY_SAMPLES: usize = 1000;
const CONCURRENCY: usize = 16;
const LOAD_TIME: Duration = Duration::from_secs(6);
/// The server core; the clients stay off it.
const SERVER_CPU: &str = "1";
const CLIENT_CPU: usize = 0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Knock,
    Mtls,
    Plain,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Knock => "(a) ClientHello knock (portal)",
            Mode::Mtls => "(b) mutual TLS, client cert verified",
            Mode::Plain => "(c) plain TLS, no client auth",
        }
    }
}

/// The client PKI for (b): a CA and one client certificate it signed, PEM.
struct ClientPki {
    ca: String,
    cert: String,
    key: String,
}

fn client_pki() -> Result<ClientPki> {
    let ca = LabCa::new("bench client CA")?;
    let issued = ca.issue(
        "bench-client",
        vec![rcgen::SanType::DnsName("bench-client".try_into()?)],
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    Ok(ClientPki {
        ca: ca.pem(),
        cert: issued.cert,
        key: issued.key,
    })
}

/// The baseline server, run as `bench portal-server MODE LISTEN UPSTREAM
/// CERT KEY [CA]` inside the gateway namespace.
pub fn serve_baseline(args: &[String]) -> Result<()> {
    let [mode, listen, upstream, cert, key, rest @ ..] = args else {
        bail!("usage: portal-server mtls|plain LISTEN UPSTREAM CERT KEY [CA]");
    };
    let chain = vec![CertificateDer::from_pem_file(cert)?];
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let config = match (mode.as_str(), rest) {
        ("plain", []) => builder.with_no_client_auth().with_single_cert(chain, key)?,
        ("mtls", [ca]) => {
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from_pem_file(ca)?)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
        _ => bail!("portal-server: unknown mode {mode:?} or wrong arguments"),
    };
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listen: SocketAddr = listen.parse()?;
    let upstream = upstream.clone();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = up.set_nodelay(true);
                let _ = copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    })
}

/// The CPU time a process (all its threads) has used.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_micros(ticks * 1_000_000 / hz))
}

fn pin_to(pid: u32) -> Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", SERVER_CPU, &pid.to_string()])
        .stdout(Stdio::null())
        .status()?;
    ensure!(status.success(), "taskset failed for pid {pid}");
    Ok(())
}

/// How a client of one mode opens its sessions.
enum Dialer {
    Knock(Arc<PortalClient>),
    Tls(TlsConnector, SocketAddr),
}

impl Dialer {
    /// One operation; the time it took.
    async fn once(&self) -> Result<Duration> {
        let start = Instant::now();
        match self {
            Dialer::Knock(client) => echo(client.connect().await?).await?,
            Dialer::Tls(connector, to) => {
                let tcp = TcpStream::connect(to).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::IpAddress(to.ip().into());
                echo(connector.connect(name, tcp).await?).await?;
            }
        }
        Ok(start.elapsed())
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Result<()> {
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    ensure!(&b == b"x", "wrong echo");
    Ok(())
}

fn pin_this_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

struct Measured {
    per_core_sec: f64,
    wall_rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Latency for all modes, one operation of each in turn so that the
/// machine's drift hits them alike; then load, one mode after the other.
/// All from the client namespace, on the client core.
fn measure(lab: &Lab, modes: Vec<(Mode, u32, Dialer)>) -> Result<Vec<(Mode, Measured)>> {
    lab.in_ns(Role::Client, move || -> Result<Vec<(Mode, Measured)>> {
        pin_this_thread(CLIENT_CPU);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let modes: Vec<(Mode, u32, Arc<Dialer>)> = modes.into_iter().map(|(m, p, d)| (m, p, Arc::new(d))).collect();
            println!("latency, {LATENCY_SAMPLES} operations per mode, interleaved ...");
            let mut samples = vec![Vec::with_capacity(LATENCY_SAMPLES); modes.len()];
            for round in 0..WARMUP + LATENCY_SAMPLES {
                for ((_, _, dialer), samples) in modes.iter().zip(&mut samples) {
                    let took = dialer.once().await?;
                    if round >= WARMUP {
                        samples.push(took);
                    }
                }
            }
            let mut out = Vec::new();
            for ((mode, pid, dialer), mut samples) in modes.into_iter().zip(samples) {
                println!("load, {}: {CONCURRENCY} clients for {LOAD_TIME:?} ...", mode.label());
                samples.sort();
                let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
                let (p50, p99) = (pct(0.50), pct(0.99));
                let (per_core_sec, wall_rate) = load(pid, dialer).await?;
                out.push((
                    mode,
                    Measured {
                        per_core_sec,
                        wall_rate,
                        p50_ms: p50.as_secs_f64() * 1e3,
                        p99_ms: p99.as_secs_f64() * 1e3,
                    },
                ));
            }
            Ok(out)
        })
    })?
}

/// Operations per server CPU-second and per wall-clock second, with
/// `CONCURRENCY` clients for `LOAD_TIME`.
async fn load(server_pid: u32, dialer: Arc<Dialer>) -> Result<(f64, f64)> {
    let cpu_before = cpu_time(server_pid)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let dialer = dialer.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while started.elapsed() < LOAD_TIME {
                dialer.once().await?;
                done += 1;
            }
            Ok::<_, anyhow::Error>(done)
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await??;
    }
    let wall = started.elapsed();
    let cpu = cpu_time(server_pid)?.saturating_sub(cpu_before);
    ensure!(cpu > Duration::from_millis(100), "the server used no CPU: {cpu:?}");
    Ok((done as f64 / cpu.as_secs_f64(), done as f64 / wall.as_secs_f64()))
}

fn spawn_baseline(lab: &Lab, args: &[&str]) -> Result<ChildGuard> {
    let bench = std::env::current_exe()?;
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns(Role::Gateway)])
        .arg(bench)
        .arg("portal-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(ChildGuard::new(child))
}

fn listening(lab: &Lab, port: u16) -> Result<bool> {
    let out = lab.exec(Role::Gateway, &["ss", "-Htln", &format!("sport = :{port}")])?;
    Ok(!out.stdout.is_empty())
}

pub fn run(rows: &mut Vec<Row>) -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, ECHO)?;
    let cred = lab.enroll("bench", &["--allow", &format!("tcp/{KNOCK_PORT}")])?;
    let state = lab.state_dir();
    let (cert, key) = (state.join("gateway.crt"), state.join("gateway.key"));
    let pki = client_pki()?;
    let scratch = lab.scratch().to_path_buf();
    let path = |name: &str, text: &str| -> Result<String> {
        let p = scratch.join(name);
        std::fs::write(&p, text)?;
        Ok(p.to_str().context("utf-8 path")?.to_string())
    };
    let ca = path("client-ca.pem", &pki.ca)?;
    let (cert_s, key_s) = (
        cert.to_str().context("utf-8")?.to_string(),
        key.to_str().context("utf-8")?.to_string(),
    );
    let upstream = format!("127.0.0.1:{ECHO}");
    let gw = Role::Gateway.addr();
    let portal = format!("{gw}:{KNOCK_PORT}");
    // Every client runs from one address: lift the per-source limits that
    // would otherwise (rightly) refuse a benchmark's rate.
    let limits = path(
        "limits.toml",
        "[portal]\nsessions_per_source = 100000\nnew_sessions_per_sec = 1000000\n",
    )?;
    let mut daemon = lab.start_daemon(&[
        "--protect",
        "all",
        "--portal",
        &portal,
        "--portal-upstream",
        &upstream,
        "--config",
        &limits,
    ])?;
    daemon.wait_for("portal listening", Duration::from_secs(20))?;
    let daemon_pid = daemon.pid().context("daemon pid")?;
    let mtls = spawn_baseline(
        &lab,
        &["mtls", &format!("{gw}:{MTLS_PORT}"), &upstream, &cert_s, &key_s, &ca],
    )?;
    let plain = spawn_baseline(
        &lab,
        &["plain", &format!("{gw}:{PLAIN_PORT}"), &upstream, &cert_s, &key_s],
    )?;
    ensure!(
        eventually(Duration::from_secs(20), || Ok(
            listening(&lab, MTLS_PORT)? && listening(&lab, PLAIN_PORT)?
        ))?,
        "the baseline servers did not come up"
    );
    // The gate protects everything but the portal: let the client reach the baselines.
    lab.cli_ok(&["allow", "add", &format!("{}/32", Role::Client.addr()), "--ttl", "1h"])?;
    for pid in [daemon_pid, mtls.id().context("pid")?, plain.id().context("pid")?] {
        pin_to(pid)?;
    }

    let credential = Credential::load(&cred)?;
    let pin: Fingerprint = credential.tls_fingerprint.clone().context("no fingerprint")?.parse()?;
    let identity_pin = Identity::from_pem(&std::fs::read_to_string(&cert)?, &std::fs::read_to_string(&key)?)?.pin();
    ensure!(
        pin == identity_pin,
        "all three servers present the gateway's certificate"
    );
    let knock = Dialer::Knock(Arc::new(PortalClient::new(
        Knocker::new(credential)?,
        portal.parse()?,
        pin,
        None,
    )?));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mtls_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned::new(pin)))
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(pki.cert.as_bytes())?],
            PrivateKeyDer::from_pem_slice(pki.key.as_bytes())?,
        )?;
    let mtls_dialer = Dialer::Tls(
        TlsConnector::from(Arc::new(mtls_config)),
        SocketAddr::new(gw.into(), MTLS_PORT),
    );
    let plain_dialer = Dialer::Tls(
        TlsConnector::from(tunnel::tls::client_config(pin)?),
        SocketAddr::new(gw.into(), PLAIN_PORT),
    );

    let results = measure(
        &lab,
        vec![
            (Mode::Knock, daemon_pid, knock),
            (Mode::Mtls, mtls.id().context("pid")?, mtls_dialer),
            (Mode::Plain, plain.id().context("pid")?, plain_dialer),
        ],
    )?;
    for (mode, m) in &results {
        println!(
            "  {}: {:.0} handshakes per server core-second ({:.0}/s wall), p50 {:.3} ms, p99 {:.3} ms",
            mode.label(),
            m.per_core_sec,
            m.wall_rate,
            m.p50_ms,
            m.p99_ms
        );
    }
    let accepted = lab
        .audit()?
        .iter()
        .filter(|l| l["event"] == "portal" && l["result"] == "accepted")
        .count();
    ensure!(
        accepted >= LATENCY_SAMPLES,
        "the portal runs were authorized knocks ({accepted} accepted in the audit log)"
    );
    let get = |mode| {
        results
            .iter()
            .find(|(m, _)| *m == mode)
            .map(|(_, r)| r)
            .context("missing mode")
    };
    let (a, b, c) = (get(Mode::Knock)?, get(Mode::Mtls)?, get(Mode::Plain)?);
    for (mode, m) in &results {
        let vs_b = (*mode == Mode::Knock).then_some((m.per_core_sec / b.per_core_sec, ">=", 1.3));
        rows.push(Row {
            what: format!("{} handshakes/core-s", mode.label()),
            value: m.per_core_sec,
            unit: "1/s",
            ratio: vs_b,
        });
        let lat = |x: f64, y: f64| (*mode == Mode::Knock).then_some((x / y, "<=", 1.0));
        rows.push(Row {
            what: format!("{} p50", mode.label()),
            value: m.p50_ms,
            unit: "ms",
            ratio: lat(m.p50_ms, b.p50_ms),
        });
        rows.push(Row {
            what: format!("{} p99", mode.label()),
            value: m.p99_ms,
            unit: "ms",
            ratio: lat(m.p99_ms, b.p99_ms),
        });
    }
    rows.push(Row {
        what: "(a) handshakes/core-s against (c) plain TLS".into(),
        value: a.per_core_sec,
        unit: "1/s",
        ratio: Some((a.per_core_sec / c.per_core_sec, ">=", 0.8)),
    });
    Ok(())
}
