//! `gatekeeper status`: what the running daemon is doing, from its control
//! socket.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use clap::Args;
use gatekeeper::{
    clock::rfc3339,
    control::{self, ControlError, Reply, Request, Status},
};

use super::StateArg;

/// Show the running daemon: its gate, clients, tunnels, portal, audit
/// trail and counters, and every record in the state it had to skip.
///
/// Exits with 3 when no daemon is running for the state directory, so
/// scripts can tell that apart from an error.
///
/// Example: gatekeeper status --json | jq .clients.problems
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One JSON object for scripts.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    state: StateArg,
}

pub fn status(args: StatusArgs) -> Result<()> {
    let socket = args.state.local().control_socket();
    let status = match control::ask(&socket, &Request::Status) {
        Ok(Reply::Status(status)) => status,
        Ok(_) => bail!(
            "the daemon on {} answered something other than its status",
            socket.display()
        ),
        Err(ControlError::NoDaemon(_)) => {
            eprintln!(
                "no daemon is running for {}: start one with `gatekeeper run --iface IFACE --protect PORTS --state-dir {}`",
                args.state.state_dir.display(),
                args.state.state_dir.display()
            );
            std::process::exit(3);
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print(&status);
    }
    Ok(())
}

fn print(s: &Status) {
    println!(
        "gatekeeper {} (pid {}), up since {}",
        s.version,
        s.pid,
        rfc3339(s.started)
    );
    println!("gate:     {}, {} mode, pins {}", s.gate, s.mode, s.pin_dir);
    for i in &s.interfaces {
        let busy = busy(&i.counters);
        println!(
            "  {:<16} {}; {}",
            i.name,
            i.attachment,
            if busy.is_empty() { "no traffic yet".into() } else { busy }
        );
    }
    for name in &s.uncovered {
        println!(
            "  {name:<16} NOT GATED: receives traffic for this host; protected ports are reachable through it (`gatekeeper attach {name} --gate {}`)",
            s.gate
        );
    }
    println!("protects: {}", s.protect);
    println!("entries:  {} in the whitelist at the last sweep", s.entries);
    println!("state:    {}", s.state_dir);
    if s.knocks {
        println!(
            "clients:  {} enrolled, {} allowed to knock",
            s.clients.enrolled, s.clients.allowed
        );
        let k = &s.knock_totals;
        println!(
            "knocks:   {} accepted, {} refused, {} failed to open since the start (more refused by the gate itself: counters)",
            k.accepted, k.rejected, k.failed
        );
    } else {
        println!("clients:  knocks are not verified (the state is not initialised)");
    }
    for p in &s.clients.problems {
        println!("  skipped {}: {}", p.path, p.reason);
    }
    if let Some(port) = s.tunnel_port {
        println!("tunnels:  agents dial tcp/{port}; {} connected", s.tunnels.len());
        for t in &s.tunnels {
            println!(
                "  {:<20} since {}  {} connections, {} bytes in, {} out, {} open streams",
                t.name,
                t.since.map(rfc3339).unwrap_or_default(),
                t.connections,
                t.bytes_in,
                t.bytes_out,
                t.streams
            );
        }
    }
    match &s.portal {
        Some(listen) => println!("portal:   {listen}"),
        None => println!("portal:   off"),
    }
    for c in &s.certificates {
        let renews = c.renews_at.map_or_else(
            || "not renewed by the gateway".into(),
            |at| format!("renews {}", rfc3339(at)),
        );
        println!(
            "cert:     {} ({}): {}, issued by {}, expires {}, {renews}",
            c.serves.join(" and "),
            c.source,
            c.subject,
            c.issuer,
            rfc3339(c.not_after)
        );
        println!("  key pin {}", c.pin);
        if let Some(problem) = &c.problem {
            println!("  PROBLEM: {problem}");
        }
    }
    let a = &s.audit;
    if !a.path.is_empty() {
        println!(
            "audit:    {} ({} lines, {} refusals summarized, {} lost, {} rotations, {} write errors)",
            a.path, a.lines, a.summarized, a.dropped, a.rotations, a.write_errors
        );
    }
    if let Some(c) = &s.cluster {
        println!("cluster:  node {} of {}", c.node, c.location);
        for n in &c.nodes {
            let at = n.report.advertise.map(|a| format!(", at {a}")).unwrap_or_default();
            let tunnels = if n.report.tunnels.is_empty() {
                String::new()
            } else {
                format!(", tunnels {}", n.report.tunnels.join(","))
            };
            println!(
                "  {:<20} {:<8} records v{}, release {}, pid {}, up since {}{at}{tunnels}",
                n.report.name,
                if n.live { "running" } else { "silent" },
                n.report.applied,
                n.report.release,
                n.report.pid,
                rfc3339(n.report.started)
            );
        }
    }
    let busy = busy(&s.counters);
    println!("counters: {}", if busy.is_empty() { "all zero".into() } else { busy });
}

/// The nonzero counters, `name=value` separated by spaces.
fn busy(counters: &BTreeMap<String, u64>) -> String {
    let busy: Vec<String> = counters
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    busy.join(" ")
}
