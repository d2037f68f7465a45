//! `gatekeeper whitelist|allow|stats`: the operator's view of the pinned maps.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use gatekeeper::{
    clock,
    gate::{EntryView, Gate, spans_text},
    spec::{self, PortRange, Prefix, Tuple, format_duration},
};
use gatekeeper_common::{
    decide::Reason,
    maps::{AllowValue, FLAG_OPERATOR},
};
use serde_json::json;

use super::{StateArg, Target};

/// How long `whitelist list --all-nodes` waits for the nodes' answers.
const ALL_NODES_WAIT: Duration = Duration::from_secs(2);

/// Inspect and change who may pass the gate.
///
/// An entry lets one source tuple reach a destination-port range until its
/// TTL runs out; a flow that is still active keeps passing after that until
/// it has been idle for the daemon's idle timeout.
#[derive(Subcommand, Debug)]
pub enum Whitelist {
    /// List entries: address, source port (or any), protocol, port range,
    /// remaining TTL and idle time.
    List {
        #[command(flatten)]
        target: Target,
        /// One JSON array for scripts (with --all-nodes: one object, each
        /// node's entries under "nodes", the silent ones under "silent").
        #[arg(long)]
        json: bool,
        /// Every running cluster node's map instead of this host's: asked
        /// through the cluster's Redis (--cluster, or `[cluster] url`),
        /// each node answers within 2 s; the silent ones are named.
        #[arg(long)]
        all_nodes: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// Let a tuple in: ADDR[:SRCPORT]/PROTO, e.g. 10.0.0.2/tcp (any source
    /// port), 10.0.0.2:40000/tcp, [2001:db8::2]:5353/udp.
    ///
    /// Adding a tuple again adds its ports to the same entry (up to four
    /// ranges; the oldest gives way) and keeps it open at least --ttl.
    Add {
        tuple: Tuple,
        /// Destination ports: PORT or LOW-HIGH.
        #[arg(long, value_name = "PORTS")]
        ports: PortRange,
        /// How long the entry lets new flows in: 1500ms, 60s, 5m, 1h, 30d.
        #[arg(long, value_name = "DURATION", value_parser = spec::duration)]
        ttl: Duration,
        #[command(flatten)]
        target: Target,
    },
    /// Remove one entry, named as it was added.
    Del {
        tuple: Tuple,
        #[command(flatten)]
        target: Target,
    },
    /// Remove every entry: only the allowlist and unprotected ports stay open.
    Flush {
        #[command(flatten)]
        target: Target,
    },
}

/// The operator allowlist: address prefixes that pass to every port.
#[derive(Subcommand, Debug)]
pub enum Allow {
    /// List prefixes with their remaining TTL.
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Allow a prefix (10.0.0.0/24, 2001:db8::/32, or one address) for a while.
    Add {
        prefix: Prefix,
        #[arg(long, value_name = "DURATION", value_parser = spec::duration)]
        ttl: Duration,
        #[command(flatten)]
        target: Target,
    },
    /// Remove one prefix.
    Del {
        prefix: Prefix,
        #[command(flatten)]
        target: Target,
    },
    /// Remove every prefix.
    Flush {
        #[command(flatten)]
        target: Target,
    },
}

/// Show the gate's counters, summed over CPUs: the total, and each
/// interface's when the gate spans more than one.
#[derive(Args, Debug)]
pub struct Stats {
    #[command(flatten)]
    target: Target,
    /// One JSON object: counter name to total, and under "interfaces" each
    /// interface's counters.
    #[arg(long)]
    json: bool,
}

fn open(target: &Target) -> Result<Gate> {
    Ok(Gate::open(&target.resolve()?)?)
}

pub fn whitelist(cmd: Whitelist) -> Result<()> {
    match cmd {
        Whitelist::List {
            target,
            json,
            all_nodes: false,
            ..
        } => {
            let gate = open(&target)?;
            let now = clock::now_ns();
            let views: Vec<EntryView> = gate.whitelist()?.iter().map(|e| e.view(now)).collect();
            if json {
                println!("{}", serde_json::to_string(&views)?);
            } else {
                print_entries(&views);
            }
        }
        Whitelist::List {
            json,
            all_nodes: true,
            state,
            ..
        } => {
            let cluster = state.cluster()?.context(
                "--all-nodes asks a cluster's nodes: pass --cluster URL, or set [cluster] url in gatekeeper.toml",
            )?;
            let answers = cluster.ask("whitelist", ALL_NODES_WAIT)?;
            let mut nodes: Vec<(String, Vec<EntryView>)> = Vec::new();
            for a in answers.answered {
                match serde_json::from_value(a.answer) {
                    Ok(entries) => nodes.push((a.node, entries)),
                    Err(e) => eprintln!("{} answered something that is not a whitelist ({e}); left out", a.node),
                }
            }
            if json {
                let nodes: Vec<_> = nodes
                    .iter()
                    .map(|(node, entries)| json!({"node": node, "entries": entries}))
                    .collect();
                println!("{}", json!({"nodes": nodes, "silent": answers.silent}));
            } else {
                if nodes.is_empty() && answers.silent.is_empty() {
                    println!("no cluster node is running");
                }
                for (node, entries) in &nodes {
                    println!("{node}: {} entries", entries.len());
                    print_entries(entries);
                    println!();
                }
            }
            if !answers.silent.is_empty() {
                eprintln!(
                    "no answer within {ALL_NODES_WAIT:?} from: {}",
                    answers.silent.join(", ")
                );
            }
        }
        Whitelist::Add {
            tuple,
            ports,
            ttl,
            target,
        } => {
            if tuple.proto == spec::Proto::Icmp && ports != PortRange::ALL {
                anyhow::bail!("icmp has no ports: use --ports 1-65535 for {tuple}");
            }
            let entry = open(&target)?.whitelist_add(&tuple, ports, ttl, FLAG_OPERATOR, 0)?;
            println!(
                "added {tuple} -> ports {ports} for {}; its entry is open to {}",
                format_duration(ttl),
                spans_text(&entry)
            );
        }
        Whitelist::Del { tuple, target } => {
            open(&target)?.whitelist_del(&tuple)?;
            println!("removed {tuple}");
        }
        Whitelist::Flush { target } => {
            let n = open(&target)?.whitelist_flush()?;
            println!("removed {n} whitelist entries");
        }
    }
    Ok(())
}

fn remaining(until_ns: u64, now: u64) -> Option<Duration> {
    (until_ns > now).then(|| Duration::from_nanos(until_ns - now))
}

fn print_entries(entries: &[EntryView]) {
    if entries.is_empty() {
        println!("no whitelist entries");
        return;
    }
    println!(
        "{:<40} {:>8} {:<5} {:<11} {:>10} {:>10}  BY",
        "ADDRESS", "SRC-PORT", "PROTO", "PORTS", "TTL", "IDLE"
    );
    for e in entries {
        let ttl = if e.expired {
            "expired".to_string()
        } else {
            format_duration(Duration::from_millis(e.ttl_ms))
        };
        let idle = e
            .idle_ms
            .map_or_else(|| "never".to_string(), |ms| format_duration(Duration::from_millis(ms)));
        println!(
            "{:<40} {:>8} {:<5} {:<11} {:>10} {:>10}  {}",
            e.address.as_deref().unwrap_or("?"),
            e.src_port.map_or_else(|| "any".to_string(), |p| p.to_string()),
            e.proto.as_deref().unwrap_or("?"),
            e.ports.join(","),
            ttl,
            idle,
            if e.operator { "operator" } else { "knock" },
        );
    }
}

pub fn allow(cmd: Allow) -> Result<()> {
    match cmd {
        Allow::List { target, json } => {
            let gate = open(&target)?;
            let now = clock::now_ns();
            let prefixes = gate.allowlist()?;
            if json {
                let rows: Vec<_> = prefixes.iter().map(|(p, v)| prefix_json(p, v, now)).collect();
                println!("{}", serde_json::Value::Array(rows));
            } else if prefixes.is_empty() {
                println!("no allowlist prefixes");
            } else {
                println!("{:<44} {:>10}", "PREFIX", "TTL");
                for (p, v) in &prefixes {
                    let ttl = remaining(v.expires_ns, now)
                        .map(format_duration)
                        .unwrap_or_else(|| "expired".into());
                    println!("{:<44} {:>10}", p.to_string(), ttl);
                }
            }
        }
        Allow::Add { prefix, ttl, target } => {
            open(&target)?.allow_add(&prefix, ttl)?;
            println!("allowed {prefix} for {}", format_duration(ttl));
        }
        Allow::Del { prefix, target } => {
            open(&target)?.allow_del(&prefix)?;
            println!("removed {prefix}");
        }
        Allow::Flush { target } => {
            let n = open(&target)?.allow_remove_all(None)?.len();
            println!("removed {n} allowlist prefixes");
        }
    }
    Ok(())
}

fn prefix_json(p: &Prefix, v: &AllowValue, now: u64) -> serde_json::Value {
    json!({
        "prefix": p.to_string(),
        "ttl_ms": remaining(v.expires_ns, now).map(|d| d.as_millis() as u64).unwrap_or(0),
        "expired": v.expires_ns <= now,
    })
}

pub fn stats(s: Stats) -> Result<()> {
    let gate = open(&s.target)?;
    let counters = gate.stats()?;
    let by_iface = gate.stats_by_iface()?;
    if s.json {
        let named = |c: &[(Reason, u64)]| -> serde_json::Map<String, serde_json::Value> {
            c.iter().map(|(r, v)| (r.name().to_string(), json!(v))).collect()
        };
        let mut obj = named(&counters);
        let ifaces: serde_json::Map<String, serde_json::Value> = by_iface
            .iter()
            .map(|(name, c)| (name.clone(), serde_json::Value::Object(named(c))))
            .collect();
        obj.insert("interfaces".into(), serde_json::Value::Object(ifaces));
        println!("{}", serde_json::Value::Object(obj));
    } else if by_iface.len() > 1 {
        let mut header = format!("{:<24} {:>14}", "", "total");
        for (name, _) in &by_iface {
            header.push_str(&format!(" {name:>14}"));
        }
        println!("{header}");
        for (i, (r, v)) in counters.iter().enumerate() {
            let mut line = format!("{:<24} {v:>14}", r.name());
            for (_, c) in &by_iface {
                line.push_str(&format!(" {:>14}", c.get(i).map_or(0, |(_, n)| *n)));
            }
            println!("{line}");
        }
    } else {
        for (r, v) in counters {
            println!("{:<24} {v:>14}", r.name());
        }
    }
    Ok(())
}
