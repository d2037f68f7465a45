//! `cargo xtask bench gate`: what the gate costs, against baselines measured
//! in the same run on the same machine.
//!
//! 1. Program cost: `BPF_PROG_TEST_RUN` with repeats runs the gate and a
//!    bare XDP_DROP on the same frames; the kernel reports ns per frame.
//! 2. Lookup cost with 1k, 10k, 100k and 1M whitelist entries.
//! 3. Drop rate on a veth: an XDP_TX program driven by live frames pushes
//!    frames out of the client's veth into the gateway's, where the gate
//!    (native XDP), a bare XDP_DROP, iptables raw DROP or an nftables
//!    ingress drop receives them. Rate = frames the receiver saw / time.
//! 4. Whitelisted TCP throughput with iperf3, with and without the gate.

use std::{
    net::Ipv4Addr,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp, XdpMode},
};
use gatekeeper::{
    clock,
    gate::{Gate, loader},
};
use gatekeeper_common::{
    maps::{CFG_ANY_TCP, CFG_ANY_UDP, Config, WhitelistKey, WhitelistValue},
    parse::mapped_v4,
    proto,
};
use gatekeeper_tests::{
    frames::{ACK, FrameSpec, Rng, SYN, tcp},
    lab::{GW_IFACE, Lab, Pins, Role},
    traffic::{bench_object, transmit, xdp},
};

const GW: [u8; 4] = [10, 77, 0, 1];
const PROTECTED_PORT: u16 = 5201;

use crate::Row;

/// Runs the gate suite.
pub fn run(rows: &mut Vec<Row>) -> Result<()> {
    program_cost(rows)?;
    lookup_scaling(rows)?;
    drop_rates(rows)?;
    throughput(rows)
}

/// Rounds each program-cost figure is measured in; the median is kept, so
/// one round disturbed by the host does not move the figure.
const ROUNDS: usize = 7;

/// Nanoseconds per run of `prog` over `frames`, each repeated `repeat`
/// times: the median of [`ROUNDS`] rounds.
fn ns_per_frame(prog: &mut Xdp, frames: &[Vec<u8>], repeat: u32) -> Result<f64> {
    let mut rounds = (0..ROUNDS)
        .map(|_| mean_ns(prog, frames, repeat))
        .collect::<Result<Vec<_>>>()?;
    Ok(median(&mut rounds))
}

/// Mean nanoseconds per run of `prog` over `frames`, each repeated
/// `repeat` times.
fn mean_ns(prog: &mut Xdp, frames: &[Vec<u8>], repeat: u32) -> Result<f64> {
    let mut total = Duration::ZERO;
    for f in frames {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(f);
        opts.repeat = repeat;
        // The kernel reports the mean duration of one run.
        total += prog.test_run(opts)?.duration;
    }
    Ok(total.as_nanos() as f64 / frames.len() as f64)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn config() -> Config {
    Config {
        flags: CFG_ANY_TCP | CFG_ANY_UDP,
        idle_timeout_ns: 30_000_000_000,
        knock_rate_per_sec: 20,
        knock_burst: 40,
        ephemeral_lo: 32768,
        ephemeral_hi: 60999,
        ..Config::default()
    }
}

/// A gate loaded with private pins, protecting tcp/1-65535.
fn gate_with(entries: u32) -> Result<(Ebpf, Gate, Pins)> {
    let pins = Pins::new()?;
    let ebpf = loader::load_pinned(
        pins.dir(),
        entries.max(1024).next_power_of_two(),
        loader::Instance::default(),
    )?;
    let gate = Gate::open(pins.dir())?;
    gate.set_config(&config())?;
    gate.set_protected(&"tcp/1-65535".parse()?)?;
    Ok((ebpf, gate, pins))
}

fn stranger_syns(n: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(7);
    (0..n)
        .map(|_| {
            FrameSpec::v4(
                [198, 51, rng.below(256) as u8, rng.below(256) as u8],
                GW,
                tcp(40000, 22, SYN),
            )
            .build()
        })
        .collect()
}

/// Rounds of the program-cost comparison; each is a fraction of a second.
const COST_ROUNDS: usize = 21;

fn program_cost(rows: &mut Vec<Row>) -> Result<()> {
    println!(
        "[1/4] program cost through BPF_PROG_TEST_RUN (64 frames x 20000 repeats; {COST_ROUNDS} rounds on one \
         pinned CPU, each case between two runs of the baseline; medians of the per-round ratios)"
    );
    let syns = stranger_syns(64);
    let arps = vec![gatekeeper_tests::frames::arp(); 64];
    let mut bench = bench_object()?;
    let bare = xdp(&mut bench, "bare_drop")?;
    bare.load()?;
    let (mut ebpf, _gate, _pins) = gate_with(1024)?;
    let gate = loader::program(&mut ebpf)?;
    let (mut open_ebpf, open_gate, _open_pins) = gate_with(1024)?;
    open_gate.set_protected(&"tcp/23".parse()?)?;
    let open = loader::program(&mut open_ebpf)?;
    // The host's speed drifts by a third from one second to the next here,
    // so each case is divided by the baseline measured right before and
    // right after it, on the same CPU.
    let (mut bare_ns, mut cases) = (Vec::new(), [Vec::new(), Vec::new(), Vec::new()]);
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            crate::knock::pin_to(1)?;
            let mut before = mean_ns(bare, &syns, 20_000)?;
            for _ in 0..COST_ROUNDS {
                bare_ns.push(before);
                // The same SYNs to port 22 go to `open`, a gate that
                // protects only tcp/23.
                for (i, ratios) in cases.iter_mut().enumerate() {
                    let ns = match i {
                        0 => mean_ns(gate, &syns, 20_000)?,
                        1 => mean_ns(gate, &arps, 20_000)?,
                        _ => mean_ns(open, &syns, 20_000)?,
                    };
                    let after = mean_ns(bare, &syns, 20_000)?;
                    ratios.push(2.0 * ns / (before + after));
                    before = after;
                }
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))?
    })?;
    let bare_ns = median(&mut bare_ns);
    println!("      bare XDP_DROP {bare_ns:.1} ns/frame");
    rows.push(Row {
        what: "bare XDP_DROP, per frame".into(),
        value: bare_ns,
        unit: "ns",
        ratio: None,
    });
    for ((what, target), ratios) in [
        ("gate dropping a stranger's SYN, per frame", 2.5),
        ("gate passing ARP, per frame", 1.5),
        ("gate passing an unprotected port, per frame", 1.5),
    ]
    .into_iter()
    .zip(&mut cases)
    {
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        let ratio = median(ratios);
        println!("      {what}: {ratio:.2}x bare (rounds {lo:.2}x-{hi:.2}x)");
        rows.push(Row {
            what: what.into(),
            value: ratio * bare_ns,
            unit: "ns",
            ratio: Some((ratio, "<=", target)),
        });
    }
    Ok(())
}

fn lookup_scaling(rows: &mut Vec<Row>) -> Result<()> {
    println!("[2/4] whitelisted-frame cost with 1k to 1M entries");
    let mut first = None;
    for n in [1_000u32, 10_000, 100_000, 1_000_000] {
        let (mut ebpf, gate, _pins) = gate_with(n)?;
        let now = clock::now_ns();
        let value = WhitelistValue {
            last_seen_ns: now,
            ..WhitelistValue::new(now + 3_600_000_000_000, 1, 65535, 0, 0)
        };
        let addr_of = |i: u32| mapped_v4([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        let started = Instant::now();
        for i in 0..n {
            gate.whitelist_insert(&WhitelistKey::new(addr_of(i), 0, proto::TCP), &value)?;
        }
        let fill = started.elapsed();
        let mut rng = Rng::new(n as u64);
        let frames: Vec<Vec<u8>> = (0..256)
            .map(|_| {
                let a = addr_of(rng.below(n as u64) as u32);
                FrameSpec::v4([a[12], a[13], a[14], a[15]], GW, tcp(40000, 22, ACK)).build()
            })
            .collect();
        let ns = ns_per_frame(loader::program(&mut ebpf)?, &frames, 2_000)?;
        let base = *first.get_or_insert(ns);
        println!("      {n:>8} entries: {ns:.1} ns/frame (filled in {fill:.1?})");
        rows.push(Row {
            what: format!("whitelisted frame, {n} entries"),
            value: ns,
            unit: "ns",
            ratio: (n > 1_000).then_some((ns / base, "<=", 1.5)),
        });
    }
    Ok(())
}

/// Frames the gateway's veth received through its XDP receive path.
fn veth_rx(lab: &Lab) -> Result<u64> {
    let out = lab.exec(Role::Gateway, &["ethtool", "-S", GW_IFACE])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("rx_queue_") && l.contains("_xdp_packets:"))
        .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
        .sum())
}

fn measure_drop(lab: &Lab, frame: &[u8], count: u32) -> Result<f64> {
    let before = veth_rx(lab)?;
    let (_, took) = transmit(
        lab,
        "transmit",
        vec![frame.to_vec()],
        count,
        Arc::new(AtomicBool::new(false)),
    )?;
    std::thread::sleep(Duration::from_millis(100));
    let got = veth_rx(lab)? - before;
    Ok(got as f64 / took.as_secs_f64() / 1e6)
}

fn drop_rates(rows: &mut Vec<Row>) -> Result<()> {
    const FRAMES: u32 = 5_000_000;
    println!("[3/4] drop rate on a veth pair, {FRAMES} frames each (XDP_TX live frames as the source)");
    let frame = FrameSpec::v4(Role::Client.addr().octets(), GW, tcp(40000, PROTECTED_PORT, SYN)).build();

    let lab = Lab::direct()?;
    let daemon = lab.start_daemon(&["--protect", "tcp/1-65535", "--xdp-mode", "driver"])?;
    let gate = measure_drop(&lab, &frame, FRAMES)?;
    drop(daemon);
    lab.cli_ok(&["detach"])?;

    let bare = with_attached(&lab, "bare_drop", XdpMode::Driver, || {
        measure_drop(&lab, &frame, FRAMES)
    })?;

    // Without an XDP program the veth only takes XDP_TX frames with GRO on.
    lab.exec(Role::Gateway, &["ethtool", "-K", GW_IFACE, "gro", "on"])?;
    lab.exec(
        Role::Gateway,
        &[
            "iptables",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-i",
            GW_IFACE,
            "-j",
            "DROP",
        ],
    )?;
    let iptables = measure_drop(&lab, &frame, FRAMES)?;
    lab.exec(Role::Gateway, &["iptables", "-t", "raw", "-F", "PREROUTING"])?;

    let rules = format!(
        "table netdev gkbench {{\n chain in {{\n  type filter hook ingress device {GW_IFACE} priority 0;\n  drop\n }}\n}}\n"
    );
    let rules_file = lab.scratch().join("drop.nft");
    std::fs::write(&rules_file, rules)?;
    lab.exec(
        Role::Gateway,
        &["nft", "-f", rules_file.to_str().context("utf-8 path")?],
    )?;
    let nft = measure_drop(&lab, &frame, FRAMES)?;

    for (what, mpps, ratio) in [
        ("bare XDP_DROP (native)", bare, None),
        ("gate (native), stranger's SYN", gate, Some((gate / bare, ">=", 0.75))),
        ("iptables raw DROP", iptables, None),
        ("nftables ingress drop", nft, None),
    ] {
        println!("      {what}: {mpps:.2} Mpps");
        rows.push(Row {
            what: format!("drop rate: {what}"),
            value: mpps,
            unit: "Mpps",
            ratio,
        });
    }
    rows.push(Row {
        what: "drop rate: gate vs iptables raw".into(),
        value: gate,
        unit: "Mpps",
        ratio: Some((gate / iptables, ">=", 2.5)),
    });
    rows.push(Row {
        what: "drop rate: gate vs nftables ingress".into(),
        value: gate,
        unit: "Mpps",
        ratio: Some((gate / nft, ">=", 1.0)),
    });
    Ok(())
}

/// Runs `f` while the bench program `name` is attached to the gateway's
/// veth in `mode`.
fn with_attached<T>(lab: &Lab, name: &str, mode: XdpMode, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let mut bench = bench_object()?;
    let prog = xdp(&mut bench, name)?;
    prog.load()?;
    // Attach from inside the gateway's namespace, where gw0 resolves.
    let path = format!("/run/netns/{}", lab.ns(Role::Gateway));
    let id = std::thread::scope(|s| {
        s.spawn(|| -> Result<_> {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on this scoped thread only.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(prog.attach(GW_IFACE, mode)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("attach thread panicked"))?
    })?;
    let out = f();
    prog.detach(id)?;
    out
}

/// iperf3 from the client to the gateway for `secs`; Gbit/s received.
fn iperf(lab: &Lab, secs: u32) -> Result<f64> {
    let server_ns = lab.ns(Role::Gateway);
    let mut server = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &server_ns,
            "iperf3",
            "-s",
            "-1",
            "-p",
            &PROTECTED_PORT.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.exec(
        Role::Client,
        &[
            "iperf3",
            "-c",
            &Ipv4Addr::from(GW).to_string(),
            "-p",
            &PROTECTED_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out?.stdout)?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no throughput")?;
    Ok(bps / 1e9)
}

fn throughput(rows: &mut Vec<Row>) -> Result<()> {
    const SECS: u32 = 5;
    println!(
        "[4/4] whitelisted TCP throughput, iperf3 {SECS}s each: no program, a bare XDP_PASS, the gate; native and generic"
    );
    let lab = Lab::direct()?;
    let none = iperf(&lab, SECS)?;
    let port = PROTECTED_PORT.to_string();
    let mut results = Vec::new();
    for (mode, flag) in [(XdpMode::Driver, "driver"), (XdpMode::Skb, "skb")] {
        let bare = with_attached(&lab, "bare_pass", mode, || iperf(&lab, SECS))?;
        let daemon = lab.start_daemon(&["--protect", &format!("tcp/{port}"), "--xdp-mode", flag])?;
        lab.cli_ok(&["whitelist", "add", "10.77.0.2/tcp", "--ports", &port, "--ttl", "10m"])?;
        let gate = iperf(&lab, SECS)?;
        drop(daemon);
        lab.cli_ok(&["detach"])?;
        println!("      {flag}: bare XDP_PASS {bare:.2} Gbit/s, gate {gate:.2} Gbit/s (no program: {none:.2})");
        results.push((flag, bare, gate));
    }
    rows.push(Row {
        what: "iperf3 TCP, no XDP program".into(),
        value: none,
        unit: "Gbit/s",
        ratio: None,
    });
    for (flag, bare, gate) in results {
        // What any XDP program costs a veth is the kernel's, not the gate's:
        // shown, not targeted.
        rows.push(Row {
            what: format!("iperf3 TCP, bare XDP_PASS ({flag})"),
            value: bare,
            unit: "Gbit/s",
            ratio: None,
        });
        rows.push(Row {
            what: format!("iperf3 TCP, gate vs bare XDP_PASS ({flag})"),
            value: gate,
            unit: "Gbit/s",
            ratio: Some((gate / bare, ">=", 0.97)),
        });
    }
    Ok(())
}
