//! Gateways that keep their shared records in a cluster's Redis: a real
//! redis-server in a namespace of its own, the real daemon with `--cluster`,
//! the CLI working against the cluster. Needs root.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, ensure};
use gatekeeper_tests::{
    lab::{Daemon, Lab, Role, SHARED_ADDR, eventually, gw, round_trip, tcp_request},
    nmap,
    redis::RedisServer,
};

const KNOCK_PORT: u16 = 62201;

/// A lab with an echo service on tcp/22 and a Redis host on the lab
/// network.
fn lab_with_redis() -> Result<(Lab, RedisServer)> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    lab.add_host(Role::Store)?;
    let redis = RedisServer::start(&lab, Role::Store)?;
    Ok((lab, redis))
}

#[test]
fn a_node_verifies_clients_enrolled_in_the_cluster_and_applies_revocations() -> Result<()> {
    let (lab, redis) = lab_with_redis()?;
    let url = redis.url();
    let cluster = ["--cluster", url.as_str()];
    let out = lab.state_cli(&[&["init", "--public-addr", "10.77.0.1"][..], &cluster].concat())?;
    ensure!(out.contains(&url), "{out}");
    let again = lab.state_cli(&[&["init", "--public-addr", "10.77.0.1"][..], &cluster].concat());
    ensure!(
        again.as_ref().is_err_and(|e| e.to_string().contains("--force")),
        "a second init is refused: {again:?}"
    );
    let cred = lab.scratch().join("laptop.credential.toml");
    let cred_arg = cred.to_string_lossy().into_owned();
    let add = [
        &["client", "add", "laptop", "--allow", "tcp/22", "--out", &cred_arg][..],
        &cluster,
    ]
    .concat();
    let out = lab.state_cli(&add)?;
    ensure!(out.contains("enrolled laptop"), "{out}");
    ensure!(
        redis.cli(&["HEXISTS", "gatekeeper:clients", "laptop"])?.trim() == "1",
        "the record is in Redis"
    );
    ensure!(
        !lab.state_dir().join("clients").exists(),
        "and not in the state directory"
    );

    let _daemon = lab.start_daemon(&["--protect", "tcp/22", "--cluster", &url, "--node", "gw-a"])?;
    let knock = lab.with_knocker(Role::Client, &cred, |k, server| {
        Ok(k.build(server, &tcp_request(22), 0)?)
    })?;
    lab.send_udp(Role::Client, gw(KNOCK_PORT), knock)?;
    ensure!(
        eventually(Duration::from_secs(3), || lab.tcp_echo_works(
            Role::Client,
            gw(22),
            None
        ))?,
        "a client enrolled in the cluster gets in: {:?}",
        lab.audit()?
    );

    let out = lab.state_cli(&[&["client", "revoke", "laptop"][..], &cluster].concat())?;
    ensure!(out.contains("applied by every running node (gw-a)"), "{out}");
    ensure!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "revoked: shut out at once"
    );
    let status: serde_json::Value = serde_json::from_str(&lab.state_cli(&["status", "--json"])?)?;
    ensure!(status["cluster"]["nodes"][0]["name"] == "gw-a", "{status}");
    Ok(())
}

const NODES: u8 = 3;

/// A cluster of three nodes behind the router, each serving echo on
/// tcp/22 and running the daemon with `--cluster`; one client enrolled.
/// Each node's own config lifts the knock budgets, so hundreds of knocks
/// from one client in a few seconds are not rate-limited.
fn three_nodes() -> Result<(Lab, RedisServer, Vec<Daemon>, std::path::PathBuf)> {
    let mut lab = Lab::cluster(NODES)?;
    let redis = RedisServer::start(&lab, Role::Store)?;
    let url = redis.url();
    let shared = SHARED_ADDR.to_string();
    lab.state_cli_on(Role::Node(1), &["init", "--public-addr", &shared, "--cluster", &url])?;
    let cred = lab.scratch().join("laptop.credential.toml");
    let cred_arg = cred.to_string_lossy().into_owned();
    lab.state_cli_on(
        Role::Node(1),
        &[
            "client",
            "add",
            "laptop",
            "--allow",
            "tcp/22",
            "--out",
            &cred_arg,
            "--cluster",
            &url,
        ],
    )?;
    let mut daemons = Vec::new();
    for n in 1..=NODES {
        let node = Role::Node(n);
        lab.serve_tcp_echo(node, 22)?;
        let dir = lab.state_dir_of(node);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("gatekeeper.toml"),
            "[knock]\nrate = 1000\nburst = 1000\nkey_rate = 1000\nkey_burst = 1000\n",
        )?;
        let name = format!("gw-{n}");
        daemons.push(lab.start_daemon_on(node, &["--protect", "tcp/22", "--cluster", &url, "--node", &name])?);
    }
    Ok((lab, redis, daemons, cred))
}

/// Knocks from `sport` over UDP (a flow of its own, so the router may
/// hand it to any node), then connects from `sport` to tcp/22.
fn knock_and_connect(lab: &Lab, cred: &std::path::Path, sport: u16) -> Result<bool> {
    let req = gatekeeper::knock::send::Request {
        proto: gatekeeper::spec::Proto::Tcp,
        ports: gatekeeper::spec::PortRange { lo: 22, hi: 22 },
        source_port: Some(sport),
    };
    lab.with_knocker(Role::Client, cred, move |k, _| {
        k.send(SHARED_ADDR.into(), &req, gatekeeper::knock::Carrier::Udp)?;
        Ok(())
    })?;
    // What `gatekeeper connect` waits before its connection.
    std::thread::sleep(Duration::from_millis(20));
    let Some(mut s) = lab.tcp_connect(Role::Client, shared(22), Some(sport), Duration::from_secs(3))? else {
        return Ok(false);
    };
    Ok(round_trip(&mut s, b"ping").unwrap_or(false))
}

fn shared(port: u16) -> SocketAddr {
    SocketAddr::new(SHARED_ADDR.into(), port)
}

/// One counter of a node's gate.
fn stat(lab: &Lab, node: Role, name: &str) -> Result<u64> {
    let out = lab.cli_on(node, &["stats", "--json"])?;
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(stats[name].as_u64().unwrap_or(0))
}

#[test]
fn knocks_and_connections_land_on_different_nodes_and_still_get_in() -> Result<()> {
    let (lab, _redis, _daemons, cred) = three_nodes()?;
    let scan = nmap::scan(&lab, Role::Intruder, "-sS", "1-1024", &SHARED_ADDR.to_string())?;
    ensure!(scan.answered_in(22, 22).is_empty(), "a stranger sees tcp/22: {scan:?}");
    ensure!(
        !lab.tcp_echo_works(Role::Client, shared(22), None)?,
        "closed before knocking"
    );

    let rounds = 200u16;
    let mut got_in = 0;
    for i in 0..rounds {
        if knock_and_connect(&lab, &cred, 30000 + i)? {
            got_in += 1;
        }
    }
    let verified: Vec<usize> = (1..=NODES)
        .map(|n| {
            lab.audit_of(Role::Node(n))
                .map(|a| a.iter().filter(|l| l["result"] == "accepted").count())
        })
        .collect::<Result<_>>()?;
    let passed: Vec<u64> = (1..=NODES)
        .map(|n| stat(&lab, Role::Node(n), "pass_whitelisted"))
        .collect::<Result<_>>()?;
    println!(
        "{got_in} of {rounds} rounds got in; knocks verified per node {verified:?}; whitelisted packets per node {passed:?}"
    );
    ensure!(got_in == rounds, "{got_in} of {rounds} rounds got in");
    ensure!(verified.iter().sum::<usize>() == rounds as usize, "{verified:?}");
    ensure!(
        verified.iter().all(|&v| v > 0) && passed.iter().all(|&p| p > 0),
        "the router spread knocks {verified:?} and connections {passed:?} over every node"
    );
    Ok(())
}

#[test]
fn a_knock_replayed_to_another_node_is_refused() -> Result<()> {
    let (lab, _redis, _daemons, cred) = three_nodes()?;
    let knock = lab.with_knocker(Role::Client, &cred, |k, _| {
        Ok(k.build(SHARED_ADDR.into(), &tcp_request(22), 0)?)
    })?;
    let at = |n: u8| SocketAddr::new(Role::Node(n).addr().into(), KNOCK_PORT);
    lab.send_udp(Role::Client, at(1), knock.clone())?;
    ensure!(
        eventually(Duration::from_secs(3), || Ok(!lab.audit_of(Role::Node(1))?.is_empty()))?,
        "node 1 verified the knock"
    );
    ensure!(lab.audit_of(Role::Node(1))?[0]["result"] == "accepted");
    // Resent from the client's own address, as a replay must be to pass
    // every other check: only the shared replay cache can tell.
    lab.send_udp(Role::Client, at(2), knock)?;
    ensure!(
        eventually(Duration::from_secs(3), || Ok(!lab.audit_of(Role::Node(2))?.is_empty()))?,
        "node 2 saw the replay"
    );
    let line = &lab.audit_of(Role::Node(2))?[0];
    ensure!(line["result"] == "rejected" && line["reason"] == "replay", "{line}");
    Ok(())
}

#[test]
fn a_revocation_from_one_nodes_cli_shuts_the_client_out_of_every_node() -> Result<()> {
    let (lab, redis, _daemons, cred) = three_nodes()?;
    for i in 0..12 {
        ensure!(knock_and_connect(&lab, &cred, 31000 + i)?, "round {i} got in");
    }
    for n in 1..=NODES {
        let list = lab.cli_on(Role::Node(n), &["whitelist", "list", "--json"])?;
        ensure!(
            String::from_utf8_lossy(&list.stdout).contains("10.77.0.2"),
            "node {n} holds the client's grants"
        );
    }
    let url = redis.url();
    let out = lab.state_cli_on(Role::Node(3), &["client", "revoke", "laptop", "--cluster", &url])?;
    ensure!(
        out.contains("applied by every running node (gw-1, gw-2, gw-3)"),
        "{out}"
    );
    for n in 1..=NODES {
        let list = lab.cli_on(Role::Node(n), &["whitelist", "list", "--json"])?;
        let list = String::from_utf8_lossy(&list.stdout);
        ensure!(
            !list.contains("10.77.0.2"),
            "node {n} closed the client's entries: {list}"
        );
    }
    ensure!(!knock_and_connect(&lab, &cred, 32000)?, "its next knock opens nothing");
    Ok(())
}
