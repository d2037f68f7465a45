//! `gatekeeper relay` (the gateway's side) and `gatekeeper relay-agent`
//! (the private network's side).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gatekeeper::{
    clock::{rfc3339, unix_now},
    control::{self, Reply, Request},
    private_file,
    relay::{self, NewRelay, RelayCredential, agent},
    spec,
    store::{cluster::ClusterStore, redis_target::redact},
};
use serde_json::json;

use super::{Confirmed, StateArg, confirm};

/// Publish HTTP services from networks that reach nothing but Redis.
///
/// The agent connects only to the cluster's Redis; every node's relay
/// HTTP port (`run --relay-http`) serves its host, routed by the Host
/// header, with each request and response carried through Redis sealed
/// under keys only that node and that agent hold (see docs/relay.md).
#[derive(Subcommand, Debug)]
pub enum Relay {
    /// Create an agent's key pair and write its credential.
    ///
    /// The gateway keeps only the agent's public key. The credential holds
    /// the agent's secret key, the relay's public key and the Redis URL
    /// (with its password, if it has one): treat it as a secret.
    ///
    /// Example: gatekeeper relay issue cams --host cams.example.org --owner ops --allow laptop --out cams.relay
    Issue {
        name: String,
        /// The host name visitors ask for (the Host header).
        #[arg(long)]
        host: String,
        /// Who is responsible for the published service (for the audit log).
        #[arg(long)]
        owner: String,
        /// Enrolled clients that may knock for the relay's HTTP port.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
        #[arg(long, value_name = "DURATION", value_parser = spec::duration)]
        expires: Option<Duration>,
        /// The Redis URL the agent connects with [default: the cluster's].
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// Make the agent a Redis user of its own (Redis 6 or later),
        /// allowed only its own channels (`gatekeeper:relay:NAME:*`) and
        /// no keys, with a fresh password in the credential's URL: a
        /// stolen credential reads no other agent's traffic and touches no
        /// record. Needs a cluster user allowed to run ACL; `relay revoke`
        /// deletes the user.
        #[arg(long)]
        redis_user: bool,
        /// Write the credential to FILE (0600) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        state: StateArg,
    },
    /// List relay agents: host, owner, state, and whether the running
    /// daemon holds a session with each.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// Revoke a relay agent: every node closes its sessions and requests at
    /// once and tells the agent, which stops.
    Revoke {
        name: String,
        #[command(flatten)]
        state: StateArg,
    },
}

/// Run inside the private network: publish an HTTP service through Redis.
///
/// Needs a route to the Redis in the credential and to --forward, nothing
/// else: no gateway address, no open port. Reconnects by itself; exits
/// only when the gateway refuses it (revoked or expired).
///
/// Example: gatekeeper relay-agent --credential cams.relay --forward 127.0.0.1:8080
#[derive(Args, Debug)]
pub struct RelayAgent {
    /// The file `gatekeeper relay issue` wrote.
    #[arg(long, value_name = "FILE")]
    credential: PathBuf,
    /// The private HTTP service: HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", value_parser = spec::upstream)]
    forward: String,
}

pub fn relay(cmd: Relay) -> Result<()> {
    match cmd {
        Relay::Issue {
            name,
            host,
            owner,
            allow,
            expires,
            redis,
            redis_user,
            out,
            state,
        } => {
            let Some(url) = state.cluster_url()? else {
                bail!(
                    "relay agents reach the gateway through the cluster's Redis: pass --cluster URL, or set [cluster] url (one gateway is a cluster of one)"
                );
            };
            let cluster = ClusterStore::open(&url)?;
            let redis = redis.unwrap_or(url);
            if (redis_user || redact(&redis) != redis) && out.is_none() {
                eprintln!("note: the credential carries a Redis password; consider --out FILE (written 0600)");
            }
            let (rec, cred) = relay::issue(
                &cluster,
                &NewRelay {
                    name,
                    host,
                    owner,
                    allow,
                    expires_in: expires,
                    redis,
                    redis_user,
                },
            )?;
            eprintln!(
                "issued relay {} for host {} (owner {}); allowed: {}",
                rec.name,
                rec.host,
                rec.owner,
                if rec.allow.is_empty() {
                    "nobody yet".into()
                } else {
                    rec.allow.join(", ")
                }
            );
            match out {
                Some(path) => {
                    private_file::create(&path, &cred.to_file_text()).with_context(|| {
                        format!("writing the credential {} (it must not exist yet)", path.display())
                    })?;
                    eprintln!(
                        "wrote the agent's credential to {}: give it to the private network's operator, privately",
                        path.display()
                    );
                }
                None => print!("{}", cred.to_file_text()),
            }
        }
        Relay::List { json, state } => {
            let store = state.store()?;
            let snapshot = store.snapshot()?;
            let served = match control::ask(&state.local().control_socket(), &Request::Status) {
                Ok(Reply::Status(s)) => s.relay.map(|r| r.agents).unwrap_or_default(),
                _ => Vec::new(),
            };
            let now = unix_now();
            let rows: Vec<serde_json::Value> = snapshot
                .relays
                .iter()
                .map(|r| {
                    let session = served.iter().find(|a| a.name == r.name);
                    json!({"name": r.name, "host": r.host, "owner": r.owner, "allow": r.allow,
                           "state": r.status(now), "expires": r.expires, "created": r.created,
                           "connected": session.is_some(), "session": session.map(|s| s.session),
                           "handshakes": session.map_or(0, |s| s.handshakes)})
                })
                .collect();
            for p in snapshot.problems.iter().filter(|p| p.path.contains("relays")) {
                eprintln!("skipped {}: {}", p.path, p.reason);
            }
            if json {
                println!("{}", serde_json::Value::Array(rows));
            } else if rows.is_empty() {
                println!("no relay agents: gatekeeper relay issue NAME --host HOST --owner WHO");
            } else {
                println!(
                    "{:<20} {:<28} {:<12} {:<8} {:<14} {:<20}",
                    "NAME", "HOST", "OWNER", "STATE", "HERE", "CREATED"
                );
                for r in &rows {
                    println!(
                        "{:<20} {:<28} {:<12} {:<8} {:<14} {:<20}",
                        r["name"].as_str().unwrap_or(""),
                        r["host"].as_str().unwrap_or(""),
                        r["owner"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        if r["connected"] == true {
                            "connected"
                        } else {
                            "not connected"
                        },
                        r["created"].as_u64().map(rfc3339).unwrap_or_default(),
                    );
                }
            }
        }
        Relay::Revoke { name, state } => {
            let store = state.store()?;
            let rec = relay::revoke(&*store, &name)?;
            let confirmed = confirm(&state);
            match &confirmed {
                Confirmed::Applied(_) => println!("revoked relay {name}: applied by the running daemon"),
                Confirmed::Nodes(nodes) => println!(
                    "revoked relay {name}: applied by every running node ({}), which closed its sessions; its agent is told to stop at its next hello",
                    nodes.join(", ")
                ),
                Confirmed::NoDaemon => {
                    println!("revoked relay {name}. No node is running: its agent is refused when one starts")
                }
                Confirmed::Unconfirmed(why) => println!(
                    "revoked relay {name}, but not every node confirmed it ({why}); each applies the change within a second"
                ),
            }
            if let (Some(user), Some(cluster)) = (&rec.redis_user, state.cluster()?) {
                if matches!(confirmed, Confirmed::Nodes(_)) {
                    // Long enough for the agent's next hello to be answered
                    // with its refusal, which it could not hear without a user.
                    std::thread::sleep(Duration::from_millis(1500));
                }
                cluster.delete_relay_user(user)?;
                println!("deleted its Redis user {user}: Redis closed the agent's connections");
            }
        }
    }
    Ok(())
}

pub fn relay_agent(args: RelayAgent) -> Result<()> {
    let cred = RelayCredential::load(&args.credential)?;
    super::init_logging(super::LogFormat::Text);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(agent::run(cred, args.forward))?;
    Ok(())
}
