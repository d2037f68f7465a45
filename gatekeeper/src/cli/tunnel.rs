//! `gatekeeper tunnel`: the gateway's side of published services (the
//! private network's side is `gatekeeper agent`).

use std::{net::IpAddr, time::Duration};

use anyhow::{Result, bail};
use clap::Subcommand;
use gatekeeper::{
    clock::{rfc3339, unix_now},
    control::{self, Reply, Request, TunnelStatus},
    spec,
    store::cluster::NodeReport,
    tunnels::manage::{self, NewTunnel},
};
use serde_json::json;

use super::{Confirmed, StateArg, confirm};

/// Publish services from private networks through this gateway.
#[derive(Subcommand, Debug)]
pub enum Tunnel {
    /// Issue a tunnel and print its token for the private network's operator.
    ///
    /// The token holds the gateway's addresses and tunnel port, its
    /// certificate fingerprint, a knock credential for the agent, and the
    /// tunnel secret (the gateway keeps only its hash). Treat it as a secret.
    /// In a cluster it also names every node that runs with --advertise:
    /// the agent keeps a session to each, so any node serves visitors.
    ///
    /// Example: gatekeeper tunnel issue web --owner ops --allow laptop,phone
    Issue {
        name: String,
        /// Who is responsible for the published service (for the audit log).
        #[arg(long)]
        owner: String,
        /// Enrolled clients that may knock for the published port.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
        /// The public port [default: the first free one of [tunnel] ports].
        #[arg(long)]
        public_port: Option<u16>,
        #[arg(long, value_name = "DURATION", value_parser = spec::duration)]
        expires: Option<Duration>,
        #[command(flatten)]
        state: StateArg,
    },
    /// List tunnels: owner, port, whether an agent is connected and since
    /// when, connections and bytes (from the running daemon); in a
    /// cluster, the running nodes its agent holds a session with.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// Revoke a tunnel: the running daemon closes its port and live
    /// connections and tells its agent to stop, and says when it has.
    Revoke {
        name: String,
        #[command(flatten)]
        state: StateArg,
    },
    /// Pause a tunnel: the running daemon closes its public port and cuts
    /// its connections; the agent stays connected, is told, and keeps the port.
    ///
    /// Example: gatekeeper tunnel pause web
    Pause {
        name: String,
        #[command(flatten)]
        state: StateArg,
    },
    /// Resume a paused tunnel: its port opens again.
    Resume {
        name: String,
        #[command(flatten)]
        state: StateArg,
    },
    /// Change who may knock for a tunnel's port, or who answers for it;
    /// applied to knocks and connections from now on.
    ///
    /// Example: gatekeeper tunnel update web --allow laptop,tablet --owner web-team
    Update {
        name: String,
        /// The enrolled clients that may knock for the published port (replaces the list).
        #[arg(long, value_delimiter = ',')]
        allow: Option<Vec<String>>,
        #[arg(long)]
        owner: Option<String>,
        #[command(flatten)]
        state: StateArg,
    },
    /// Give a tunnel a new token (and its agent a new knock key). The old
    /// token is accepted for --overlap, then its session is ended; with no
    /// overlap, at once.
    ///
    /// Example: gatekeeper tunnel reissue web --overlap 1h > web.token
    Reissue {
        name: String,
        /// How long the old token (and its agent's knock key) stay accepted [default: not at all].
        #[arg(long, value_name = "DURATION", value_parser = spec::duration)]
        overlap: Option<Duration>,
        #[command(flatten)]
        state: StateArg,
    },
}

pub fn tunnel(cmd: Tunnel) -> Result<()> {
    match cmd {
        Tunnel::Issue {
            name,
            owner,
            allow,
            public_port,
            expires,
            state,
        } => {
            let store = state.store()?;
            let nodes = advertised_nodes(&state)?;
            let (rec, token) = manage::issue(
                &*store,
                &NewTunnel {
                    name,
                    owner,
                    allow,
                    public_port,
                    expires_in: expires,
                    nodes,
                },
            )?;
            eprintln!(
                "issued tunnel {} (owner {}), public port {}; allowed: {}",
                rec.name,
                rec.owner,
                rec.public_port,
                if rec.allow.is_empty() {
                    "nobody yet".into()
                } else {
                    rec.allow.join(", ")
                }
            );
            eprintln!("give this token to the private network's operator, privately:");
            println!("{}", token.encode());
        }
        Tunnel::List { json, state } => {
            let store = state.store()?;
            let snapshot = store.snapshot()?;
            // Live sessions are the running daemon's to tell; in a cluster,
            // each running node also reports the tunnels it serves.
            let live: Vec<TunnelStatus> = match control::ask(&state.local().control_socket(), &Request::Status) {
                Ok(Reply::Status(s)) => s.tunnels,
                _ => Vec::new(),
            };
            let now_ms = gatekeeper::clock::unix_now_ms();
            let nodes: Option<Vec<NodeReport>> = state
                .cluster()?
                .map(|c| c.nodes())
                .transpose()?
                .map(|all| all.into_iter().filter(|n| n.live_at(now_ms)).collect());
            let serving = |name: &str| -> Option<Vec<String>> {
                nodes.as_ref().map(|all| {
                    all.iter()
                        .filter(|n| n.tunnels.iter().any(|t| t == name))
                        .map(|n| n.name.clone())
                        .collect()
                })
            };
            let now = unix_now();
            let rows: Vec<serde_json::Value> = snapshot
                .tunnels
                .iter()
                .map(|r| {
                    let s = live.iter().find(|t| t.name == r.name);
                    let on = serving(&r.name);
                    let connected = s.is_some() || on.as_ref().is_some_and(|n| !n.is_empty());
                    let mut row = json!({"name": r.name, "owner": r.owner, "port": r.public_port, "allow": r.allow, "revoked": r.revoked, "live": r.live_at(now), "paused": r.paused,
                           "connected": connected, "since": s.and_then(|s| s.since), "connections": s.map_or(0, |s| s.connections),
                           "bytes_in": s.map_or(0, |s| s.bytes_in), "bytes_out": s.map_or(0, |s| s.bytes_out)});
                    if let Some(on) = on {
                        row["nodes"] = json!(on);
                    }
                    row
                })
                .collect();
            for p in snapshot.problems.iter().filter(|p| p.path.contains("/tunnels/")) {
                eprintln!("skipped {}: {}", p.path, p.reason);
            }
            if json {
                println!("{}", serde_json::Value::Array(rows));
            } else if rows.is_empty() {
                println!("no tunnels: gatekeeper tunnel issue NAME --owner WHO --allow CLIENT");
            } else {
                println!(
                    "{:<20} {:<12} {:>6} {:<10} {:<20} {:>6} {:>12} {:>12}",
                    "NAME", "OWNER", "PORT", "STATE", "AGENT", "CONNS", "IN", "OUT"
                );
                for r in &rows {
                    let state = if r["revoked"] == true {
                        "revoked"
                    } else if r["live"] == true && r["paused"] == true {
                        "paused"
                    } else if r["live"] == true {
                        "live"
                    } else {
                        "expired"
                    };
                    let agent = if let Some(on) = r["nodes"].as_array().filter(|n| !n.is_empty()) {
                        let names: Vec<&str> = on.iter().filter_map(|n| n.as_str()).collect();
                        format!("on {}", names.join(","))
                    } else if r["connected"] == true {
                        format!("since {}", r["since"].as_u64().map(rfc3339).unwrap_or_default())
                    } else {
                        "not connected".into()
                    };
                    println!(
                        "{:<20} {:<12} {:>6} {:<10} {:<20} {:>6} {:>12} {:>12}",
                        r["name"].as_str().unwrap_or(""),
                        r["owner"].as_str().unwrap_or(""),
                        r["port"],
                        state,
                        agent,
                        r["connections"],
                        r["bytes_in"],
                        r["bytes_out"]
                    );
                }
            }
        }
        Tunnel::Pause { name, state } => {
            manage::set_paused(&*state.store()?, &name, true)?;
            say_applied(
                &state,
                &format!("paused tunnel {name}: its port is closed and its connections cut; the agent stays connected"),
            );
        }
        Tunnel::Resume { name, state } => {
            manage::set_paused(&*state.store()?, &name, false)?;
            say_applied(&state, &format!("resumed tunnel {name}: its port is open again"));
        }
        Tunnel::Update {
            name,
            allow,
            owner,
            state,
        } => {
            if allow.is_none() && owner.is_none() {
                bail!("nothing to change: pass --allow CLIENT[,CLIENT...] and/or --owner WHO");
            }
            let rec = manage::update(&*state.store()?, &name, allow, owner)?;
            say_applied(
                &state,
                &format!(
                    "updated tunnel {name}: owner {}, allowed {}",
                    rec.owner,
                    if rec.allow.is_empty() {
                        "nobody".into()
                    } else {
                        rec.allow.join(", ")
                    }
                ),
            );
        }
        Tunnel::Reissue { name, overlap, state } => {
            let nodes = advertised_nodes(&state)?;
            let (rec, token) = manage::reissue(&*state.store()?, &name, overlap.unwrap_or_default(), &nodes)?;
            let old = match &rec.previous_token {
                Some(p) => format!("the old token is accepted until {}", rfc3339(p.until)),
                None => "the old token is refused from now on".into(),
            };
            eprintln!("re-issued tunnel {name}: {old}");
            eprintln!("give this token to the private network's operator, privately:");
            println!("{}", token.encode());
            confirm(&state);
        }
        Tunnel::Revoke { name, state } => {
            let store = state.store()?;
            manage::revoke(&*store, &name)?;
            match confirm(&state) {
                Confirmed::Applied(applied) => {
                    let ended = applied.tunnels_closed.iter().any(|t| t.name == name && t.closed > 0);
                    println!(
                        "revoked tunnel {name}: applied by the running daemon{}",
                        if ended {
                            ", which closed its port and connections and told its agent to stop"
                        } else {
                            " (its agent was not connected)"
                        }
                    );
                }
                Confirmed::Nodes(nodes) => println!(
                    "revoked tunnel {name}: applied by every running node ({})",
                    nodes.join(", ")
                ),
                Confirmed::NoDaemon => println!(
                    "revoked tunnel {name}. No daemon is running for this state: the tunnel stays closed when one starts"
                ),
                Confirmed::Unconfirmed(why) => println!(
                    "revoked tunnel {name}, but the running daemon did not confirm it ({why}); it applies the change within a second"
                ),
            }
        }
    }
    Ok(())
}

/// In a cluster, the nodes that say where they can be reached on their
/// own: the agent keeps a session to each.
fn advertised_nodes(state: &StateArg) -> Result<Vec<IpAddr>> {
    let Some(cluster) = state.cluster()? else {
        return Ok(Vec::new());
    };
    let mut addrs: Vec<IpAddr> = cluster.nodes()?.into_iter().filter_map(|n| n.advertise).collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        eprintln!(
            "note: no node advertises an address of its own (run --advertise ADDR): the agent holds one session, through the shared address, and only the node it lands on serves the tunnel"
        );
    }
    Ok(addrs)
}

/// `done`, and whether the running daemon (or every node) applied it.
fn say_applied(state: &StateArg, done: &str) {
    match confirm(state) {
        Confirmed::Applied(_) => println!("{done} (applied by the running daemon)"),
        Confirmed::Nodes(nodes) => println!("{done} (applied by every running node: {})", nodes.join(", ")),
        Confirmed::NoDaemon => println!("{done} (no daemon is running for this state)"),
        Confirmed::Unconfirmed(why) => {
            println!("{done}; the running daemon did not confirm it ({why}) and applies it within a second")
        }
    }
}
