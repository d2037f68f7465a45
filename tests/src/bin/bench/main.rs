//! `cargo xtask bench SUITE`: measurements against baselines taken in the
//! same run, on the same machine, reported as ratios.
//!
//! - `gate`: the XDP program's cost and drop rate, lookup scaling, and
//!   whitelisted throughput (see `gate.rs`).
//! - `knock`: verification rate, and knock-to-open latency against fwknopd
//!   (see `knock.rs`).
//! - `tunnel`: throughput, new-connection latency and memory against the
//!   direct path and rathole (see `tunnel.rs`).
//! - `cluster`: grant propagation across three nodes, knock-to-open
//!   against a lone gateway, knocks claimed per second through the shared
//!   replay cache, and the same during a Sentinel failover (see
//!   `cluster.rs`).
//! - `portal`: handshakes per core-second and latency of the ClientHello
//!   knock against mutual TLS and plain TLS (see `portal.rs`).
//! - `channel`: channels under each cipher policy against stunnel4 and
//!   the direct path: throughput and new-connection latency (see
//!   `channel.rs`).
//! - `relay`: HTTP through Redis against the TLS tunnel and the direct
//!   path: small-request latency and rate with wrk, a 1 GiB download, and
//!   memory (see `relay.rs`).

mod channel;
mod cluster;
mod gate;
mod knock;
mod portal;
mod relay;
mod tunnel;

use std::path::PathBuf;

use anyhow::{Result, bail};

/// One line of a report. `ratio` is (value against its baseline, `>=` or
/// `<=`, target).
pub struct Row {
    pub what: String,
    pub value: f64,
    pub unit: &'static str,
    pub ratio: Option<(f64, &'static str, f64)>,
}

fn main() -> Result<()> {
    let suite = std::env::args().nth(1).unwrap_or_else(|| "gate".into());
    if suite == "portal-server" {
        // A baseline server of the portal suite, started by that suite.
        let args: Vec<String> = std::env::args().skip(2).collect();
        return portal::serve_baseline(&args);
    }
    let mut rows = Vec::new();
    println!("{suite} benchmark: every ratio is against a baseline measured in this run\n");
    match suite.as_str() {
        "gate" => gate::run(&mut rows)?,
        "knock" => knock::run(&mut rows)?,
        "tunnel" => tunnel::run(&mut rows)?,
        "portal" => portal::run(&mut rows)?,
        "cluster" => cluster::run(&mut rows)?,
        "relay" => relay::run(&mut rows)?,
        "channel" => channel::run(&mut rows)?,
        other => {
            bail!(
                "unknown benchmark suite {other:?}: the suites are `gate`, `knock`, `tunnel`, `portal`, `cluster`, `relay` and `channel`"
            )
        }
    }
    report(&suite, &rows)
}

fn report(suite: &str, rows: &[Row]) -> Result<()> {
    println!("\n{:<58} {:>14}  {:<10} ratio (target)", "measurement", "value", "unit");
    for r in rows {
        let ratio = r
            .ratio
            .map(|(x, cmp, target)| {
                let met = if cmp == ">=" { x >= target } else { x <= target };
                format!("{x:.2}x ({cmp} {target}: {})", if met { "met" } else { "NOT met" })
            })
            .unwrap_or_default();
        println!("{:<58} {:>14.2}  {:<10} {ratio}", r.what, r.value, r.unit);
    }
    let json: Vec<_> = rows
        .iter()
        .map(|r| serde_json::json!({"what": r.what, "value": r.value, "unit": r.unit, "ratio": r.ratio.map(|x| x.0), "target": r.ratio.map(|x| format!("{} {}", x.1, x.2))}))
        .collect();
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/bench-{suite}.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    println!("\nwritten to {}", out.display());
    Ok(())
}
