//! Metrics as an operator gets them: Debian's Prometheus server, started
//! by the test inside the gateway's namespace with a scratch database,
//! scrapes the daemon's `/metrics` and the test reads the series back
//! through Prometheus's HTTP API. Real daemon, real XDP; needs root.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use gatekeeper_tests::lab::{ChildGuard, Lab, Role, eventually, gw, tcp_request};
use serde_json::Value;

const METRICS: &str = "127.0.0.1:9477";
const PROMETHEUS: &str = "127.0.0.1:9090";

/// Debian's Prometheus in the gateway's namespace, scraping the daemon
/// every second into a database in the lab's scratch directory.
fn prometheus(lab: &Lab) -> Result<ChildGuard> {
    let dir = lab.scratch().join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: gatekeeper\n    static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns(Role::Gateway), "prometheus"])
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting prometheus (Debian's `prometheus` package; `cargo xtask setup` installs it)")?;
    Ok(ChildGuard::new(child))
}

/// curl ARGS in the gateway's namespace, where both servers listen.
fn curl(lab: &Lab, args: &[&str]) -> Result<std::process::Output> {
    let mut full = vec!["curl", "-sS", "--max-time", "3"];
    full.extend_from_slice(args);
    lab.exec(Role::Gateway, &full)
}

/// `query` through Prometheus's HTTP API: each series' labels and value.
fn query(lab: &Lab, query: &str) -> Result<Vec<(Value, f64)>> {
    let out = curl(
        lab,
        &[
            "--get",
            "--data-urlencode",
            &format!("query={query}"),
            &format!("http://{PROMETHEUS}/api/v1/query"),
        ],
    )?;
    if !out.status.success() {
        // Not up yet.
        return Ok(Vec::new());
    }
    let answer: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("Prometheus answered {}", String::from_utf8_lossy(&out.stdout)))?;
    ensure!(answer["status"] == "success", "Prometheus refused {query}: {answer}");
    let Some(series) = answer["data"]["result"].as_array() else {
        bail!("no result in {answer}");
    };
    series
        .iter()
        .map(|s| {
            let v = s["value"][1].as_str().context("a sample value")?.parse::<f64>()?;
            Ok((s["metric"].clone(), v))
        })
        .collect()
}

/// Waits (bounded) until `q` gives one series whose value `ok` accepts;
/// the value, or an error showing what Prometheus had.
fn scraped(lab: &Lab, q: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
    let mut last = Vec::new();
    let found = eventually(Duration::from_secs(30), || {
        last = query(lab, q)?;
        Ok(last.len() == 1 && ok(last[0].1))
    })?;
    ensure!(
        found,
        "Prometheus never had the expected value for {q}; last answer {last:?}"
    );
    Ok(last[0].1)
}

#[test]
fn prometheus_scrapes_knocks_refusals_latency_and_the_gate() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let alice = lab.enroll("alice", &["--allow", "tcp/22"])?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22", "--metrics", METRICS])?;
    let _prometheus = prometheus(&lab)?;

    // The intruder is dropped; alice knocks and gets in; a forged knock
    // of hers (one flipped ciphertext byte) is refused.
    ensure!(!lab.tcp_echo_works(Role::Intruder, gw(22), None)?);
    let knocked = lab.udp_knock(Role::Client, &alice, 22, Some(40022), &[])?;
    ensure!(knocked.status.success(), "{knocked:?}");
    ensure!(eventually(Duration::from_secs(3), || lab.tcp_echo_works(
        Role::Client,
        gw(22),
        Some(40022)
    ))?);
    let mut forged = lab.with_knocker(Role::Client, &alice, |k, server| {
        Ok(k.build(server, &tcp_request(22), 0)?)
    })?;
    // Inside the sealed payload, whatever the knock's version.
    let n = forged.len();
    forged[n - 30] ^= 0x40;
    lab.send_udp(Role::Client, gw(62201), forged)?;

    scraped(&lab, r#"up{job="gatekeeper"}"#, |v| v == 1.0)?;
    scraped(
        &lab,
        r#"gatekeeper_knocks_total{carrier="udp",result="accepted"}"#,
        |v| v == 1.0,
    )?;
    scraped(
        &lab,
        r#"gatekeeper_knocks_total{result="rejected",reason="bad_tag"}"#,
        |v| v == 1.0,
    )?;
    // Knock to open gate: one observation, well under a second.
    scraped(&lab, "gatekeeper_knock_open_seconds_count", |v| v == 1.0)?;
    let secs = scraped(&lab, "gatekeeper_knock_open_seconds_sum", |v| v > 0.0)?;
    ensure!(secs < 1.0, "a knock took {secs} s to open the gate");
    // The gate's own counters: the intruder's SYNs dropped on gw0, the
    // client's packets passed as whitelisted, the knock diverted.
    scraped(
        &lab,
        r#"sum(gatekeeper_xdp_packets_total{interface="gw0",outcome="drop_not_allowed"})"#,
        |v| v >= 1.0,
    )?;
    scraped(
        &lab,
        r#"sum(gatekeeper_xdp_packets_total{outcome="pass_whitelisted"})"#,
        |v| v >= 1.0,
    )?;
    scraped(
        &lab,
        r#"sum(gatekeeper_xdp_packets_total{outcome="knock_diverted"})"#,
        |v| v == 2.0,
    )?;
    scraped(&lab, "gatekeeper_whitelist_entries", |v| v == 1.0)?;
    scraped(&lab, "gatekeeper_clients_enrolled", |v| v == 1.0)?;
    scraped(&lab, r#"gatekeeper_build_info{gate="gw0",mode="enforce"}"#, |v| {
        v == 1.0
    })?;
    // `status` reads the same counts.
    let status: Value = serde_json::from_str(&lab.state_cli(&["status", "--json"])?)?;
    assert_eq!(
        (&status["knock_totals"]["accepted"], &status["knock_totals"]["rejected"]),
        (&Value::from(1), &Value::from(1)),
        "{status}"
    );

    // Revoking alice is an audited event, counted as it happens.
    lab.state_cli(&["client", "revoke", "alice"])?;
    scraped(&lab, "gatekeeper_clients_allowed", |v| v == 0.0)?;
    scraped(
        &lab,
        r#"gatekeeper_audit_events_total{event="client_closed",result="revoked"}"#,
        |v| v >= 1.0,
    )?;
    Ok(())
}

#[test]
fn the_endpoint_serves_only_metrics() -> Result<()> {
    let lab = Lab::new()?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22", "--metrics", METRICS])?;
    let get = |path: &str| -> Result<String> {
        let out = curl(
            &lab,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{content_type}",
                &format!("http://{METRICS}{path}"),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ensure!(
        get("/metrics")? == "200 application/openmetrics-text; version=1.0.0; charset=utf-8",
        "{}",
        get("/metrics")?
    );
    ensure!(get("/")?.starts_with("404"), "{}", get("/")?);
    // Uninitialised state: no knocks are verified, the gate's figures
    // are there all the same.
    let body = curl(&lab, &[&format!("http://{METRICS}/metrics")])?;
    let body = String::from_utf8_lossy(&body.stdout);
    ensure!(body.contains("gatekeeper_whitelist_entries 0"), "{body}");
    ensure!(body.ends_with("# EOF\n"), "{body}");
    Ok(())
}
