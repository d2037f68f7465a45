//! The audit trail under load and under failure: every line whole whoever
//! writes it, refusals past the threshold summarized, the file rotated and
//! reopened, and a knock that opened nothing never called `accepted`.
//! Real daemon, real XDP, namespaces; needs root.

use std::{
    net::{TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gatekeeper_tests::lab::{Daemon, Lab, Role, eventually, gw, tcp_request};

const KNOCK_PORT: u16 = 62201;

/// Sends `packet` `count` times from the client, about 5,000 a second: a
/// pace even a debug build of the daemon keeps up with (the ring holds a
/// few thousand knocks; past that the kernel counts `knock_ring_full`).
fn send_many(lab: &Lab, packet: Vec<u8>, count: usize) -> Result<()> {
    lab.in_ns(Role::Client, move || -> Result<()> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        for i in 0..count {
            sock.send_to(&packet, gw(KNOCK_PORT))?;
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    })?
}

/// A knock of `cred`'s with a flipped ciphertext byte: it passes the
/// kernel's checks (an enrolled key id, an unseen nonce) and the daemon
/// refuses it as `bad_tag`, every time.
fn bad_tag_knock(lab: &Lab, cred: &Path) -> Result<Vec<u8>> {
    let mut k = lab.with_knocker(Role::Client, cred, |k, server| {
        Ok(k.build(server, &tcp_request(22), 0)?)
    })?;
    // Inside the sealed payload, whatever the knock's version.
    let n = k.len();
    k[n - 30] ^= 0x40;
    Ok(k)
}

/// Writes a second config (local keys only) and starts the daemon with it.
fn daemon_with(lab: &Lab, config: &str) -> Result<(Daemon, PathBuf)> {
    let path = lab.scratch().join("extra.toml");
    std::fs::write(&path, config)?;
    let daemon = lab.start_daemon(&["--protect", "tcp/22", "--config", path.to_str().context("utf-8 path")?])?;
    Ok((daemon, path))
}

/// Limits lifted so the daemon sees every knock the test sends.
const UNLIMITED_KNOCKS: &str =
    "[knock]\nrate = 1000000\nburst = 1000000\nkey_rate = 1000000\nkey_burst = 1000000\nbudget = 1000000\n";

#[test]
fn two_writers_under_load_leave_only_whole_lines() -> Result<()> {
    let lab = Lab::new()?;
    let alice = lab.enroll("alice", &["--allow", "tcp/22"])?;
    let (_daemon, _) = daemon_with(
        &lab,
        &format!("{UNLIMITED_KNOCKS}[audit]\nrefusals_per_sec = 1000000\n"),
    )?;
    // The client may reach the tunnel port, where each empty connection is
    // an agent session the tunnel gateway refuses and audits.
    lab.cli_ok(&["whitelist", "add", "10.77.0.2/tcp", "--ports", "7443", "--ttl", "10m"])?;
    let knock = bad_tag_knock(&lab, &alice)?;
    const KNOCKS: usize = 9000;
    const SESSIONS: usize = 3000;
    std::thread::scope(|s| -> Result<()> {
        let knocks = s.spawn(|| send_many(&lab, knock, KNOCKS));
        let sessions = s.spawn(|| {
            lab.in_ns(Role::Client, || -> Result<()> {
                for _ in 0..SESSIONS {
                    drop(TcpStream::connect_timeout(&gw(7443), Duration::from_secs(2))?);
                }
                Ok(())
            })?
        });
        knocks.join().map_err(|_| anyhow::anyhow!("knock sender panicked"))??;
        sessions
            .join()
            .map_err(|_| anyhow::anyhow!("session opener panicked"))??;
        Ok(())
    })?;
    let count = |lines: &[serde_json::Value]| {
        let knocks = lines.iter().filter(|l| l["reason"] == "bad_tag").count();
        let sessions = lines.iter().filter(|l| l["event"] == "agent_session").count();
        (knocks, sessions)
    };
    // `audit()` parses every line: one torn line fails it.
    let settled = eventually(Duration::from_secs(30), || {
        let (k, s) = count(&lab.audit()?);
        Ok(k + s >= 10_000 && s == SESSIONS)
    })?;
    let lines = lab.audit()?;
    let (knocks, sessions) = count(&lines);
    println!(
        "{} lines: {knocks} knock refusals, {sessions} agent sessions; gate counters {}",
        lines.len(),
        lab.cli_ok(&["stats", "--json"])?
    );
    ensure!(settled, "{knocks} knock lines and {sessions} session lines");
    assert!(knocks >= 2000 && sessions == SESSIONS);
    Ok(())
}

#[test]
fn a_knock_whose_entry_cannot_be_written_is_audited_as_failed() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let alice = lab.enroll("alice", &["--allow", "tcp/22"])?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    // The whitelist's pin gone (as a stray `rm` or a racing detach would
    // have it): the program still runs, but no entry can be written.
    std::fs::remove_file(lab.pin_dir().join(gatekeeper_common::maps::WHITELIST))?;
    let knock = lab.with_knocker(Role::Client, &alice, |k, server| {
        Ok(k.build(server, &tcp_request(22), 0)?)
    })?;
    send_many(&lab, knock, 1)?;
    ensure!(
        eventually(Duration::from_secs(5), || Ok(!lab.audit()?.is_empty()))?,
        "the knock was audited"
    );
    let line = lab.audit()?.remove(0);
    assert_eq!(
        (line["result"].as_str(), line["reason"].as_str()),
        (Some("failed"), Some("gate_write_failed")),
        "{line}"
    );
    assert!(line["opened"].is_null() && line["detail"].as_str().is_some_and(|d| d.contains("WHITELIST")));
    assert!(!lab.tcp_echo_works(Role::Client, gw(22), None)?, "and nothing opened");
    Ok(())
}

#[test]
fn refusals_past_the_threshold_are_summarized_rotated_and_reopened() -> Result<()> {
    // Enough rotated files that no line is lost however many seconds the
    // daemon takes over the refusals (each second writes up to 10 lines
    // and a summary).
    const KEEP: u32 = 9;
    let lab = Lab::new()?;
    let alice = lab.enroll("alice", &["--allow", "tcp/22"])?;
    let (mut daemon, _) = daemon_with(
        &lab,
        &format!("{UNLIMITED_KNOCKS}[audit]\nrefusals_per_sec = 10\nmax_size = \"2KiB\"\nkeep = {KEEP}\n"),
    )?;
    const KNOCKS: usize = 2000;
    send_many(&lab, bad_tag_knock(&lab, &alice)?, KNOCKS)?;
    // Every refusal is written or counted; the files stay small.
    let log = lab.state_dir().join("audit.log");
    let rotated = |i: u32| PathBuf::from(format!("{}.{i}", log.display()));
    let all = || -> Result<Vec<serde_json::Value>> {
        let mut lines = Vec::new();
        for path in (1..=KEEP).rev().map(rotated).chain([log.clone()]) {
            for l in std::fs::read_to_string(&path).unwrap_or_default().lines() {
                lines.push(serde_json::from_str(l).with_context(|| format!("a torn line in {}", path.display()))?);
            }
        }
        Ok(lines)
    };
    let told = |lines: &[serde_json::Value]| -> u64 {
        let written = lines.iter().filter(|l| l["reason"] == "bad_tag").count() as u64;
        let summarized: u64 = lines
            .iter()
            .filter(|l| l["event"] == "refusals_summarized")
            .map(|l| l["by_reason"]["bad_tag"].as_u64().unwrap_or(0))
            .sum();
        written + summarized
    };
    let diverted = || -> Result<u64> {
        let stats: serde_json::Value = serde_json::from_str(&lab.cli_ok(&["stats", "--json"])?)?;
        Ok(stats["knock_diverted"].as_u64().unwrap_or(0))
    };
    ensure!(
        eventually(Duration::from_secs(10), || Ok(
            told(&all()?) >= diverted()? && diverted()? > 0
        ))?,
        "every refusal the daemon saw is written or counted: {} told of {}",
        told(&all()?),
        diverted()?
    );
    let lines = all()?;
    let written = lines.iter().filter(|l| l["reason"] == "bad_tag").count();
    println!(
        "{} knocks reached the daemon; {written} written one by one, the rest in summaries",
        diverted()?
    );
    assert!(
        written < 200,
        "past 10 a second, refusals are counted, not written: {written}"
    );
    for path in [log.clone(), rotated(1)] {
        let size = std::fs::metadata(&path)?.len();
        assert!(size < 2 * 1024 + 4096, "{} is {size} bytes", path.display());
    }
    assert!(!rotated(KEEP + 1).exists(), "only `keep` rotated files stay");

    // logrotate moves the file away and sends SIGHUP: the daemon writes a new one.
    std::fs::rename(&log, lab.scratch().join("moved.log"))?;
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(daemon.pid().context("pid")? as i32, libc::SIGHUP) };
    daemon.wait_for("reopening the audit log", Duration::from_secs(5))?;
    let good = lab.with_knocker(Role::Client, &alice, |k, server| {
        Ok(k.build(server, &tcp_request(22), 0)?)
    })?;
    send_many(&lab, good, 1)?;
    ensure!(
        eventually(Duration::from_secs(5), || Ok(std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("\"accepted\"")))?,
        "the knock after SIGHUP went to a new audit.log"
    );
    Ok(())
}

/// `gatekeeper audit ARGS --state-dir <lab state>`: reading files needs no
/// namespace.
fn audit_cli(lab: &Lab, args: &[&str]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(gatekeeper_tests::lab::gatekeeper_bin()?)
        .arg("audit")
        .args(args)
        .arg("--state-dir")
        .arg(lab.state_dir())
        .output()?)
}

/// The JSON lines `gatekeeper audit ARGS --json` prints.
fn audit_json(lab: &Lab, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let mut full = args.to_vec();
    full.push("--json");
    let out = audit_cli(lab, &full)?;
    ensure!(
        out.status.success(),
        "audit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

#[test]
fn the_trail_is_searched_across_rotations_and_joined_with_the_device_journal() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let alice = lab.enroll("alice", &["--allow", "tcp/22"])?;
    let bob = lab.enroll("bob", &["--allow", "tcp/22"])?;
    // Small files: the lines below span several rotations.
    let (_daemon, _) = daemon_with(&lab, "[audit]\nmax_size = \"2KiB\"\nkeep = 9\n")?;

    const ALICE: u16 = 6;
    for i in 0..ALICE {
        let out = lab.udp_knock(Role::Client, &alice, 22, Some(41000 + i), &[])?;
        ensure!(out.status.success(), "{out:?}");
    }
    for i in 0..3 {
        let out = lab.udp_knock(Role::Client, &bob, 22, Some(42000 + i), &[])?;
        ensure!(out.status.success(), "{out:?}");
    }
    // A knock of alice's that goes nowhere: in her journal, not the trail.
    let lost = lab.exec(
        Role::Client,
        &[
            gatekeeper_tests::lab::gatekeeper_bin()?.to_str().context("utf-8")?,
            "knock",
            "--credential",
            alice.to_str().context("utf-8")?,
            "--server",
            "10.77.0.250",
            "--proto",
            "tcp",
            "--port",
            "22",
            "--via",
            "udp",
        ],
    )?;
    ensure!(lost.status.success(), "{lost:?}");
    send_many(&lab, bad_tag_knock(&lab, &alice)?, 1)?;
    ensure!(
        eventually(Duration::from_secs(5), || Ok(audit_json(&lab, &["--event", "knock"])?
            .len()
            == ALICE as usize + 4))?,
        "every knock that reached the daemon is in the trail: {:?}",
        audit_json(&lab, &[])
    );
    let log = lab.state_dir().join("audit.log");
    ensure!(
        PathBuf::from(format!("{}.2", log.display())).exists(),
        "the trail was rotated at least twice"
    );

    let accepted = audit_json(&lab, &["--client", "alice", "--result", "accepted"])?;
    assert_eq!(accepted.len(), ALICE as usize, "{accepted:?}");
    let ports: Vec<u64> = accepted
        .iter()
        .filter_map(|l| l["request"]["local_port"].as_u64())
        .collect();
    assert_eq!(ports, (41000..41000 + ALICE as u64).collect::<Vec<_>>(), "oldest first");
    let forged = audit_json(&lab, &["--reason", "bad_tag"])?;
    assert!(forged.len() == 1 && forged[0]["result"] == "rejected", "{forged:?}");
    assert_eq!(audit_json(&lab, &["--client", "bob"])?.len(), 3);
    assert_eq!(
        audit_json(&lab, &["--since", "1h", "--event", "knock"])?.len(),
        ALICE as usize + 4
    );
    assert!(audit_json(&lab, &["--since", "2999-01-01"])?.is_empty());

    // The device's journal names each knock by the id the gateway audits.
    let journal = alice.with_extension("knocks.jsonl");
    let sent: Vec<serde_json::Value> = std::fs::read_to_string(&journal)
        .with_context(|| format!("reading the journal {}", journal.display()))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(sent.len(), ALICE as usize + 1, "{sent:?}");
    let first_id = sent[0]["knock_id"].as_str().context("knock_id")?;
    let one = audit_json(&lab, &["--knock-id", first_id])?;
    assert!(one.len() == 1 && one[0]["request"]["local_port"] == 41000, "{one:?}");

    // merge: what alice sent beside what the gateway decided.
    let out = audit_cli(&lab, &["merge", journal.to_str().context("utf-8")?, "--json"])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let merged: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(merged.len(), ALICE as usize + 1);
    for m in &merged[..ALICE as usize] {
        assert_eq!(m["sent"]["outcome"], "sent", "{m}");
        assert_eq!(m["gateway"][0]["result"], "accepted", "{m}");
        assert_eq!(m["gateway"][0]["knock_id"], m["sent"]["knock_id"], "{m}");
    }
    let nowhere = &merged[ALICE as usize];
    assert!(
        nowhere["sent"]["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("10.77.0.250:"))
            && nowhere["gateway"].as_array().is_some_and(|g| g.is_empty()),
        "{nowhere}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 7 knocks have no gateway line"));

    // A torn line (a crash mid-write, a hand edit) is named and skipped.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"time\": \"2026-"))?;
    let out = audit_cli(&lab, &["--client", "bob"])?;
    ensure!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout)?.lines().count(), 3);
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped 1 line(s) that are not audit JSON"));

    // Bad input is named, with the forms that work.
    let out = audit_cli(&lab, &["--since", "yesterday"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("\"yesterday\"") && err.contains("30m"),
        "{err}"
    );
    let out = audit_cli(&lab, &["merge", log.to_str().context("utf-8")?])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("holds no knocks"), "{err}");
    Ok(())
}
