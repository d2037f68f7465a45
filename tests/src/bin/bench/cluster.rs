//! `cargo xtask bench cluster`: three nodes behind one address, sharing
//! their state through a redis-server of the lab's own.
//!
//! 1. Grant propagation: 500 UDP knocks, each from a source port of its
//!    own, sent to node 1's address; the bench polls all three nodes'
//!    pinned whitelist maps (busy-polling, CPU 0) and takes, per knock,
//!    the time from the entry appearing on node 1 to it appearing on the
//!    other two. Target: p99 under 10 ms.
//! 2. Knock-to-open, the same knocks' time from sending to the entry on
//!    the node that verified it and on every node, against a lone
//!    gateway (the same daemon without `--cluster`) measured the same way
//!    in the same run.
//!    Then the client is revoked from node 3's CLI: the time from starting
//!    the command to its entries gone from every node's map (target 1 s).
//! 3. Knocks verified per second cluster-wide: three node-sized workers
//!    (one thread each, as three daemons would be), each verifying its
//!    third of 150,000 distinct knocks and claiming every nonce through
//!    the daemon's own link (claims that queue go in one script call, up
//!    to four calls in flight, 512 claims outstanding per worker), with
//!    the CPU time redis-server and the workers used. Target: 100,000/s.
//!    Then 3,000 of the nonces are claimed again from another link: all
//!    must come back as replays. Then the same on Sentinel, the primary
//!    killed once a third are claimed: the rate, and how many were claimed
//!    in the cluster rather than decided alone.
//! 4. Propagation during a Sentinel failover: the same knocks as in 1,
//!    with the cluster on a primary, a replica and three Sentinels, and
//!    the primary killed a third of the way through: how many grants
//!    reached every node within a second, and the slowest that did.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use gatekeeper::{
    daemon::cluster::{Claimed, Event, Link, SharedGrant},
    gate::Gate,
    knock::{send::Request, verify::Knock, wire::NONCE_LEN},
    spec::{PortRange, Proto, map_addr},
    store::redis_target::RedisTarget,
};
use gatekeeper_common::maps::WhitelistKey;
use gatekeeper_tests::{
    cluster::start_nodes,
    lab::{Lab, Role, cpu_time},
    redis::{RedisServer, Sentinels},
};

use crate::{
    Row,
    knock::{percentile, pin_to, verifier_and_knocks},
};

const KNOCK_PORT: u16 = 62201;
const NODES: u8 = 3;
const TRIALS: u16 = 500;
/// How long a grant may take to appear before the trial counts it missing.
const GIVE_UP: Duration = Duration::from_secs(1);
const BETWEEN_TRIALS: Duration = Duration::from_millis(2);

pub fn run(rows: &mut Vec<Row>) -> Result<()> {
    let alone = lone_gateway()?;
    let (cluster, revoked) = propagation(None)?;
    claim_rate(rows)?;
    let (failover, _) = propagation(Some(TRIALS / 3))?;
    report(rows, &alone, &cluster, &failover);
    if let Some(ms) = revoked {
        rows.push(Row {
            what: "revocation closed on every node, vs the 1 s target".into(),
            value: ms,
            unit: "ms",
            ratio: Some((ms / 1000.0, "<=", 1.0)),
        });
    }
    Ok(())
}

/// What one run of knocks measured, in ms.
struct Trials {
    /// Sending to the entry on the node that verified it.
    local: Vec<f64>,
    /// Sending to the entry on every node.
    everywhere: Vec<f64>,
    /// From the entry on the verifying node to the entry on every other.
    propagation: Vec<f64>,
    /// Knocks whose grant was not everywhere within [`GIVE_UP`].
    missed: usize,
}

fn tcp22(sport: u16) -> Request {
    Request {
        proto: Proto::Tcp,
        ports: PortRange { lo: 22, hi: 22 },
        source_port: Some(sport),
    }
}

/// Sends one knock per trial from its own source port to `to`, and polls
/// `gates` until each holds the grant; `gates[0]` is the node knocked.
/// With `kill_at`, calls `kill` before that trial.
fn knock_trials(
    lab: &Lab,
    cred: &Path,
    to: SocketAddr,
    gates: Vec<Gate>,
    first_port: u16,
    mut kill: Option<(u16, Box<dyn FnMut() + Send>)>,
) -> Result<Trials> {
    let server = lab_server();
    let knocks: Vec<(u16, Vec<u8>)> = lab.with_knocker(Role::Client, cred, move |k, _| {
        (0..TRIALS)
            .map(|i| {
                let sport = first_port + i;
                Ok((sport, k.build(server, &tcp22(sport), sport)?))
            })
            .collect()
    })?;
    let client: IpAddr = Role::Client.addr().into();
    lab.in_ns(Role::Client, move || -> Result<Trials> {
        pin_to(0)?;
        let mut t = Trials {
            local: Vec::new(),
            everywhere: Vec::new(),
            propagation: Vec::new(),
            missed: 0,
        };
        for (i, (sport, packet)) in knocks.into_iter().enumerate() {
            if let Some((at, f)) = kill.as_mut()
                && usize::from(*at) == i
            {
                f();
            }
            let key = WhitelistKey::new(map_addr(client), sport, Proto::Tcp.number());
            let sock = UdpSocket::bind(("0.0.0.0", sport))?;
            let start = Instant::now();
            sock.send_to(&packet, to)?;
            let mut seen: Vec<Option<Duration>> = vec![None; gates.len()];
            while start.elapsed() < GIVE_UP && seen.iter().any(Option::is_none) {
                for (g, at) in gates.iter().zip(seen.iter_mut()) {
                    if at.is_none() && g.whitelist_get(&key)?.is_some() {
                        *at = Some(start.elapsed());
                    }
                }
            }
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            match (seen[0], seen.iter().skip(1).copied().collect::<Option<Vec<_>>>()) {
                (Some(local), Some(others)) => {
                    let last = others.iter().copied().max().unwrap_or(local).max(local);
                    t.local.push(ms(local));
                    t.everywhere.push(ms(last));
                    t.propagation.push(ms(last.saturating_sub(local)));
                }
                _ => t.missed += 1,
            }
            std::thread::sleep(BETWEEN_TRIALS);
        }
        Ok(t)
    })?
}

/// The address knocks are sealed for: the shared one.
fn lab_server() -> IpAddr {
    gatekeeper_tests::lab::SHARED_ADDR.into()
}

fn lone_gateway() -> Result<Trials> {
    println!("[1/4] a lone gateway: {TRIALS} knocks, sending to the entry in its map");
    let mut lab = Lab::cluster(1)?;
    // The same daemon, its records in its state directory.
    let shared = lab_server().to_string();
    lab.state_cli_on(Role::Node(1), &["init", "--public-addr", &shared])?;
    let cred = lab.scratch().join("laptop.credential.toml");
    let cred_arg = cred.to_string_lossy().into_owned();
    lab.state_cli_on(
        Role::Node(1),
        &["client", "add", "laptop", "--allow", "tcp/22", "--out", &cred_arg],
    )?;
    lab.serve_tcp_echo(Role::Node(1), 22)?;
    std::fs::write(
        lab.state_dir_of(Role::Node(1)).join("gatekeeper.toml"),
        format!(
            "public_addrs = [\"{shared}\"]\n\n\
             [knock]\nrate = 100000\nburst = 100000\nkey_rate = 100000\nkey_burst = 100000\n"
        ),
    )?;
    let _daemon = lab.start_daemon_on(Role::Node(1), &["--protect", "tcp/22"])?;
    let gates = vec![Gate::open(&lab.pin_dir_of(Role::Node(1)))?];
    let to = SocketAddr::new(Role::Node(1).addr().into(), KNOCK_PORT);
    let t = knock_trials(&lab, &cred, to, gates, 20000, None)?;
    print_trials("lone gateway", &t);
    Ok(t)
}

/// Three nodes on one Redis, or (with `kill_at`) on Sentinel with the
/// primary killed before that trial.
fn propagation(kill_at: Option<u16>) -> Result<(Trials, Option<f64>)> {
    let mut lab = Lab::cluster(NODES)?;
    let mut primary = RedisServer::start(&lab, Role::Store)?;
    let (url, _replica, _sentinels) = match kill_at {
        None => {
            println!("[2/4] three nodes: {TRIALS} knocks to node 1, its map and the others' polled");
            (primary.url(), None, None)
        }
        Some(at) => {
            println!("[4/4] three nodes on Sentinel, the primary killed before knock {at} of {TRIALS}");
            let replica = RedisServer::replica_of(&lab, &primary, 6380)?;
            let sentinels = Sentinels::start(&lab, &primary, 3)?;
            (sentinels.url(), Some(replica), Some(sentinels))
        }
    };
    let (_daemons, cred) = start_nodes(&mut lab, &url, NODES)?;
    let gates = (1..=NODES)
        .map(|n| Ok(Gate::open(&lab.pin_dir_of(Role::Node(n)))?))
        .collect::<Result<Vec<_>>>()?;
    let to = SocketAddr::new(Role::Node(1).addr().into(), KNOCK_PORT);
    // The primary is either the failover's to kill or kept running.
    let (kill, _kept) = match kill_at {
        Some(at) => {
            let f: Box<dyn FnMut() + Send> = Box::new(move || primary.stop());
            (Some((at, f)), None)
        }
        None => (None, Some(primary)),
    };
    let t = knock_trials(&lab, &cred, to, gates, 21000, kill)?;
    print_trials(
        if kill_at.is_some() {
            "during a failover"
        } else {
            "three nodes"
        },
        &t,
    );
    let revoked = match kill_at {
        None => Some(revocation(&lab, &url)?),
        Some(_) => None,
    };
    Ok((t, revoked))
}

/// From starting `client revoke` on node 3's CLI to the client's entries
/// gone from every node's map, in ms.
fn revocation(lab: &Lab, url: &str) -> Result<f64> {
    let gates = (1..=NODES)
        .map(|n| Ok(Gate::open(&lab.pin_dir_of(Role::Node(n)))?))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        gates.iter().all(|g| g.whitelist().is_ok_and(|w| !w.is_empty())),
        "every node holds the client's entries before the revocation"
    );
    let start = Instant::now();
    let cli = std::thread::scope(|s| -> Result<Option<Duration>> {
        let revoke = s.spawn(|| lab.state_cli_on(Role::Node(3), &["client", "revoke", "laptop", "--cluster", url]));
        let mut closed = None;
        while start.elapsed() < Duration::from_secs(5) {
            if gates.iter().all(|g| g.whitelist().is_ok_and(|w| w.is_empty())) {
                closed = Some(start.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        revoke
            .join()
            .map_err(|_| anyhow::anyhow!("the CLI thread panicked"))??;
        Ok(closed)
    })?;
    let ms = cli
        .context("the revoked client's entries stayed for 5 s")?
        .as_secs_f64()
        * 1e3;
    println!("      revocation from node 3's CLI: the client's entries gone from every node after {ms:.1} ms");
    Ok(ms)
}

fn print_trials(name: &str, t: &Trials) {
    let p = |v: &[f64], q| {
        if v.is_empty() {
            f64::NAN
        } else {
            sorted_percentile(v, q)
        }
    };
    println!(
        "      {name}: to the verifying node p50 {:.3} / p99 {:.3} ms; everywhere p50 {:.3} / p99 {:.3} ms; \
         propagation p50 {:.3} / p99 {:.3} / max {:.3} ms; {} of {TRIALS} not everywhere within {GIVE_UP:?}",
        p(&t.local, 0.5),
        p(&t.local, 0.99),
        p(&t.everywhere, 0.5),
        p(&t.everywhere, 0.99),
        p(&t.propagation, 0.5),
        p(&t.propagation, 0.99),
        p(&t.propagation, 1.0),
        t.missed
    );
}

fn sorted_percentile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<Duration> = v.iter().map(|ms| Duration::from_secs_f64(ms / 1e3)).collect();
    s.sort();
    percentile(&s, q)
}

/// Claims per second through three links at once, each behind its own
/// verifier; then the same through a Sentinel failover.
fn claim_rate(rows: &mut Vec<Row>) -> Result<()> {
    println!("[3/4] {CLAIMS} distinct knocks verified and claimed by three node workers at once");
    let mut lab = Lab::new()?;
    lab.add_host(Role::Store)?;
    let redis = RedisServer::start(&lab, Role::Store)?;
    let redis_pid = redis.pid().context("redis-server's pid")?;
    let run = claims(&lab, &redis.url(), None, Some(redis_pid))?;
    ensure!(
        run.fresh == CLAIMS,
        "{} of {CLAIMS} distinct knocks claimed as fresh",
        run.fresh
    );
    let rate = CLAIMS as f64 / run.elapsed.as_secs_f64();
    println!(
        "      {rate:.0} knocks/s cluster-wide, all {CLAIMS} claimed fresh, in {:.2?}; CPU used: redis-server {:.2?}, the three workers {:.2?}",
        run.elapsed,
        run.redis_cpu.unwrap_or_default(),
        run.workers_cpu
    );
    // Some of each worker's nonces, claimed again by another link: all replays.
    let target = RedisTarget::parse(&redis.url())?;
    let again: Vec<[u8; NONCE_LEN]> = run.nonces.into_iter().flatten().take(3000).collect();
    let replays = lab.in_ns(Role::Client, move || -> Result<usize> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let (link, mut events) = Link::start(target, "again").await?;
            let grant = bench_grant("again", 1);
            for (id, n) in again.iter().enumerate() {
                link.claim(
                    id as u64,
                    n,
                    gatekeeper::clock::unix_now() + 120,
                    std::slice::from_ref(&grant),
                );
            }
            let mut taken = 0;
            let mut answered = 0;
            while answered < again.len() {
                match events.recv().await {
                    Some(Event::Claimed { claimed, .. }) => {
                        answered += 1;
                        taken += usize::from(matches!(claimed, Claimed::Taken));
                    }
                    Some(_) => {}
                    None => bail!("the link closed"),
                }
            }
            Ok(taken)
        })
    })??;
    ensure!(
        replays == 3000,
        "only {replays} of 3000 knocks claimed again were replays"
    );
    println!("      3000 of them claimed again from another node: all replays");
    rows.push(Row {
        what: "knocks verified and claimed/s, three nodes, one Redis".into(),
        value: rate,
        unit: "knocks/s",
        ratio: Some((rate / 100_000.0, ">=", 1.0)),
    });

    println!("      the same on Sentinel, the primary killed a third of the way through");
    let mut lab = Lab::new()?;
    lab.add_host(Role::Store)?;
    let primary = RedisServer::start(&lab, Role::Store)?;
    let _replica = RedisServer::replica_of(&lab, &primary, 6380)?;
    let sentinels = Sentinels::start(&lab, &primary, 3)?;
    let run = claims(&lab, &sentinels.url(), Some(primary), None)?;
    let rate = CLAIMS as f64 / run.elapsed.as_secs_f64();
    println!(
        "      {rate:.0} knocks/s through the failover: {} claimed in the cluster, {} decided alone (Redis unreachable)",
        run.fresh,
        CLAIMS - run.fresh
    );
    rows.push(Row {
        what: "during a failover: knocks verified/s (claimed or decided alone)".into(),
        value: rate,
        unit: "knocks/s",
        ratio: None,
    });
    rows.push(Row {
        what: "during a failover: of them claimed in the cluster".into(),
        value: run.fresh as f64,
        unit: "knocks",
        ratio: None,
    });
    Ok(())
}

const CLAIMS: usize = 150_000;

/// What one run of [`claims`] found.
struct ClaimRun {
    elapsed: Duration,
    /// CPU time the workers used (the bench process, while they ran).
    workers_cpu: Duration,
    /// CPU time redis-server used meanwhile, if asked.
    redis_cpu: Option<Duration>,
    /// Claimed fresh in Redis (the rest: decided alone, Redis unreachable).
    fresh: usize,
    nonces: Vec<Nonces>,
}

/// [`CLAIMS`] distinct knocks verified and claimed by three workers on
/// `url`; with `kill`, that server is killed once a third are claimed;
/// with `redis_pid`, that process's CPU time is taken too.
fn claims(lab: &Lab, url: &str, kill: Option<RedisServer>, redis_pid: Option<u32>) -> Result<ClaimRun> {
    const IN_FLIGHT: usize = 512;
    let target = RedisTarget::parse(url)?;
    let (verifier, knocks, _dir) = verifier_and_knocks(CLAIMS, 1)?;
    let verifier = std::sync::Arc::new(verifier);
    let shares: Vec<Vec<Knock>> = (0..usize::from(NODES))
        .map(|w| knocks.iter().skip(w).step_by(usize::from(NODES)).cloned().collect())
        .collect();
    let progress = std::sync::Arc::new(AtomicUsize::new(0));
    let killer = kill.map(|mut primary| {
        let progress = progress.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(30);
            while progress.load(Ordering::Relaxed) < CLAIMS / 3 && Instant::now() < until {
                std::thread::sleep(Duration::from_micros(100));
            }
            primary.stop();
        })
    });
    let redis_before = redis_pid.map(cpu_time).transpose()?;
    let own_before = cpu_time(std::process::id())?;
    let mut run = lab.in_ns(Role::Client, move || -> Result<ClaimRun> {
        let started = Instant::now();
        let workers: Vec<_> = shares
            .into_iter()
            .enumerate()
            .map(|(w, share)| {
                let (verifier, target, progress) = (verifier.clone(), target.clone(), progress.clone());
                std::thread::spawn(move || node_worker(w, target, &verifier, share, IN_FLIGHT, &progress))
            })
            .collect();
        let mut fresh = 0;
        let mut nonces = Vec::new();
        for w in workers {
            let (f, n) = w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))??;
            fresh += f;
            nonces.push(n);
        }
        Ok(ClaimRun {
            elapsed: started.elapsed(),
            workers_cpu: Duration::ZERO,
            redis_cpu: None,
            fresh,
            nonces,
        })
    })??;
    run.workers_cpu = cpu_time(std::process::id())?.saturating_sub(own_before);
    if let (Some(pid), Some(before)) = (redis_pid, redis_before) {
        run.redis_cpu = Some(cpu_time(pid)?.saturating_sub(before));
    }
    if let Some(k) = killer {
        k.join().map_err(|_| anyhow::anyhow!("the killer thread panicked"))?;
    }
    Ok(run)
}

fn bench_grant(node: &str, sport: u16) -> SharedGrant {
    let key = WhitelistKey::new(map_addr(Role::Client.addr().into()), sport, Proto::Tcp.number());
    SharedGrant::new(
        node,
        &key,
        PortRange { lo: 22, hi: 22 },
        gatekeeper::clock::unix_now_ms() + 30_000,
        1,
    )
}

/// The nonces one worker claimed.
type Nonces = Vec<[u8; NONCE_LEN]>;

/// One node's share: verify with a local replay set, then claim.
/// Returns how many were fresh, and the nonces.
fn node_worker(
    w: usize,
    target: RedisTarget,
    verifier: &gatekeeper::knock::verify::Verifier,
    share: Vec<Knock>,
    in_flight_max: usize,
    progress: &AtomicUsize,
) -> Result<(usize, Nonces)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let node = format!("bench-{w}");
    rt.block_on(async {
        let (link, mut events) = Link::start(target, &node).await?;
        let now = gatekeeper::clock::unix_now();
        let mut local = HashSet::with_capacity(share.len());
        let mut nonces = Vec::with_capacity(share.len());
        let (mut in_flight, mut fresh) = (0usize, 0usize);
        let settle = async |events: &mut tokio::sync::mpsc::Receiver<Event>| -> Result<usize> {
            loop {
                match events.recv().await {
                    Some(Event::Claimed { claimed, .. }) => return Ok(usize::from(matches!(claimed, Claimed::Fresh))),
                    Some(_) => {}
                    None => bail!("the link closed"),
                }
            }
        };
        for (id, knock) in share.iter().enumerate() {
            let mut recorded = None;
            let checked = verifier.check(knock, now, |n, until| {
                let fresh = local.insert(*n);
                if fresh {
                    recorded = Some((*n, until));
                }
                Ok(fresh)
            });
            let (Ok(grant), Some((nonce, until))) = (checked.outcome, recorded) else {
                bail!("knock {id} of worker {w} did not verify");
            };
            let shared = SharedGrant::new(
                &node,
                &grant.key,
                grant.ports,
                gatekeeper::clock::unix_now_ms() + 30_000,
                grant.client_id,
            );
            link.claim(id as u64, &nonce, until, std::slice::from_ref(&shared));
            progress.fetch_add(1, Ordering::Relaxed);
            nonces.push(nonce);
            in_flight += 1;
            while in_flight >= in_flight_max {
                fresh += settle(&mut events).await?;
                in_flight -= 1;
            }
        }
        while in_flight > 0 {
            fresh += settle(&mut events).await?;
            in_flight -= 1;
        }
        Ok((fresh, nonces))
    })
}

fn report(rows: &mut Vec<Row>, alone: &Trials, cluster: &Trials, failover: &Trials) {
    let p = |v: &[f64], q| {
        if v.is_empty() {
            f64::NAN
        } else {
            sorted_percentile(v, q)
        }
    };
    let prop99 = p(&cluster.propagation, 0.99);
    rows.push(Row {
        what: "grant propagation p50, verifying node to the other two".into(),
        value: p(&cluster.propagation, 0.5),
        unit: "ms",
        ratio: None,
    });
    rows.push(Row {
        what: "grant propagation p99, vs the 10 ms target".into(),
        value: prop99,
        unit: "ms",
        ratio: Some((prop99 / 10.0, "<=", 1.0)),
    });
    let (a50, a99) = (p(&alone.local, 0.5), p(&alone.local, 0.99));
    rows.push(Row {
        what: "knock-to-open p50, lone gateway".into(),
        value: a50,
        unit: "ms",
        ratio: None,
    });
    rows.push(Row {
        what: "knock-to-open p99, lone gateway".into(),
        value: a99,
        unit: "ms",
        ratio: None,
    });
    // What the cluster adds: the claim's round trip before the verifying
    // node opens, and the grant's way to the others.
    for (what, v, base) in [
        ("added by the cluster, p50, verifying node", p(&cluster.local, 0.5), a50),
        (
            "added by the cluster, p99, verifying node",
            p(&cluster.local, 0.99),
            a99,
        ),
        (
            "added by the cluster, p50, every node",
            p(&cluster.everywhere, 0.5),
            a50,
        ),
        (
            "added by the cluster, p99, every node",
            p(&cluster.everywhere, 0.99),
            a99,
        ),
    ] {
        rows.push(Row {
            what: what.into(),
            value: v - base,
            unit: "ms",
            ratio: None,
        });
    }
    let every99 = p(&cluster.everywhere, 0.99);
    rows.push(Row {
        what: "knock-to-open p99, every node, vs the 2 ms knock target".into(),
        value: every99,
        unit: "ms",
        ratio: Some((every99 / 2.0, "<=", 1.0)),
    });
    rows.push(Row {
        what: "during a failover: grants everywhere within 1 s".into(),
        value: (usize::from(TRIALS) - failover.missed) as f64,
        unit: "knocks",
        ratio: None,
    });
    rows.push(Row {
        what: "during a failover: knock-to-open p99, every node".into(),
        value: p(&failover.everywhere, 0.99),
        unit: "ms",
        ratio: None,
    });
    rows.push(Row {
        what: "during a failover: propagation p99".into(),
        value: p(&failover.propagation, 0.99),
        unit: "ms",
        ratio: None,
    });
    rows.push(Row {
        what: "during a failover: slowest knock-to-everywhere".into(),
        value: p(&failover.everywhere, 1.0),
        unit: "ms",
        ratio: None,
    });
}
